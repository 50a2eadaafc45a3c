//go:build linux

package outbound

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// boundDevice returns the SO_BINDTODEVICE of the socket under c ("" for
// none).
func boundDevice(t *testing.T, c syscall.Conn) string {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var (
		dev  string
		gerr error
	)
	if err := raw.Control(func(fd uintptr) {
		dev, gerr = unix.GetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE)
	}); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatalf("getsockopt(SO_BINDTODEVICE): %v", gerr)
	}
	return dev
}

// followDirect returns a Direct whose InterfaceFor answers what iface
// holds and counts its calls. It skips t where sockets cannot be bound.
func followDirect(t *testing.T, iface *atomic.Value, calls *atomic.Int32) *Direct {
	t.Helper()
	d, err := NewDirect(DirectConfig{Name: "direct", InterfaceFor: func(dst netip.Addr) string {
		calls.Add(1)
		if !dst.Is4() {
			t.Errorf("InterfaceFor(%s): want the unmapped IPv4 destination", dst)
		}
		return iface.Load().(string)
	}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	probe, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	raw, _ := probe.(*net.UDPConn).SyscallConn()
	var berr error
	raw.Control(func(fd uintptr) { berr = unix.BindToDevice(int(fd), "lo") })
	if errors.Is(berr, unix.EPERM) {
		t.Skip("SO_BINDTODEVICE needs CAP_NET_RAW here")
	}
	return d
}

// loopbackTCP accepts connections on 127.0.0.1 and hands them out.
func loopbackTCP(t *testing.T) (netip.AddrPort, <-chan net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns := make(chan net.Conn, 8)
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- c
		}
	})
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
		close(conns)
		for c := range conns {
			c.Close()
		}
	})
	return netip.MustParseAddrPort(ln.Addr().String()), conns
}

func TestDirectFollowsInterfaceTCP(t *testing.T) {
	var iface atomic.Value
	iface.Store("lo")
	var calls atomic.Int32
	d := followDirect(t, &iface, &calls)
	addr, accepted := loopbackTCP(t)
	ctx := context.Background()

	up, err := d.DialTCP(ctx, Target{Addr: addr})
	if err != nil {
		t.Fatalf("DialTCP: %v", err)
	}
	srv := <-accepted
	if calls.Load() != 1 {
		t.Errorf("InterfaceFor called %d times, want once per dial", calls.Load())
	}
	if dev := boundDevice(t, up.(*boundTCP).TCPConn); dev != "lo" {
		t.Errorf("socket bound to %q, want lo", dev)
	}
	if n := d.bound.count(); n != 1 {
		t.Fatalf("%d sockets tracked, want 1", n)
	}

	// Another family, another interface: nothing ended.
	if n := d.AbortInterface("lo", true); n != 0 {
		t.Errorf("AbortInterface(lo, IPv6) ended %d, want 0", n)
	}
	if n := d.AbortInterface("eth9", false); n != 0 {
		t.Errorf("AbortInterface(eth9, IPv4) ended %d, want 0", n)
	}

	readErr := make(chan error, 1)
	go func() {
		_, err := up.Read(make([]byte, 1))
		readErr <- err
	}()
	if n := d.AbortInterface("lo", false); n != 1 {
		t.Fatalf("AbortInterface(lo, IPv4) ended %d, want 1", n)
	}
	select {
	case err := <-readErr:
		if err == nil {
			t.Error("the relay's upstream read succeeded after the abort")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the relay's upstream read still blocked 2 s after the abort")
	}
	srv.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadAll(srv); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the server's read after the abort: %v, want ECONNRESET", err)
	}
	up.Abort() // as the relay does: harmless after the abort
	if n := d.bound.count(); n != 0 {
		t.Errorf("%d sockets tracked after the abort, want 0", n)
	}

	// Closed normally: no longer tracked.
	up, err = d.DialTCP(ctx, Target{Addr: addr})
	if err != nil {
		t.Fatalf("DialTCP: %v", err)
	}
	<-accepted
	up.Close()
	if n := d.bound.count(); n != 0 {
		t.Errorf("%d sockets tracked after Close, want 0", n)
	}

	// No interface known: not bound, not tracked.
	iface.Store("")
	up, err = d.DialTCP(ctx, Target{Addr: addr})
	if err != nil {
		t.Fatalf("DialTCP with no interface: %v", err)
	}
	<-accepted
	if _, ok := up.(*boundTCP); ok {
		t.Error("a socket with no interface was tracked")
	}
	if dev := boundDevice(t, up.(directTCP).TCPConn); dev != "" {
		t.Errorf("socket bound to %q, want none", dev)
	}
	up.Close()

	// The answer changes: the next dial follows it at once.
	iface.Store("tgnone0")
	if _, err := d.DialTCP(ctx, Target{Addr: addr}); !errors.Is(err, unix.ENODEV) {
		t.Errorf("DialTCP bound to a missing interface: %v, want ENODEV", err)
	}
}

func TestDirectFollowsInterfaceUDP(t *testing.T) {
	var iface atomic.Value
	iface.Store("lo")
	var calls atomic.Int32
	d := followDirect(t, &iface, &calls)
	echo, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	dst := netip.MustParseAddrPort(echo.LocalAddr().String())

	pc, err := d.ListenUDP(context.Background(), Target{Addr: dst})
	if err != nil {
		t.Fatalf("ListenUDP: %v", err)
	}
	u := pc.(*directUDP)
	if dev := boundDevice(t, u.conn); dev != "lo" {
		t.Errorf("socket bound to %q, want lo", dev)
	}
	if err := pc.WritePacket([]byte("x"), Target{Addr: dst}); err != nil {
		t.Fatalf("WritePacket: %v", err)
	}
	readErr := make(chan error, 1)
	go func() {
		_, _, err := pc.ReadPacket(make([]byte, 64))
		readErr <- err
	}()
	if n := d.AbortInterface("lo", false); n != 1 {
		t.Fatalf("AbortInterface ended %d, want 1", n)
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("ReadPacket after the abort: %v, want net.ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("ReadPacket still blocked 2 s after the abort")
	}
	pc.Close()
	if n := d.bound.count(); n != 0 {
		t.Errorf("%d sockets tracked, want 0", n)
	}
}

// TestDirectFixedInterface: a configured interface wins over
// InterfaceFor, which is never asked.
func TestDirectFixedInterface(t *testing.T) {
	var iface atomic.Value
	iface.Store("tgnone0")
	var calls atomic.Int32
	followDirect(t, &iface, &calls) // skips where binding is not allowed
	d, err := NewDirect(DirectConfig{Name: "direct", Interface: "lo", InterfaceFor: func(netip.Addr) string {
		calls.Add(1)
		return "tgnone0"
	}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	addr, accepted := loopbackTCP(t)
	up, err := d.DialTCP(context.Background(), Target{Addr: addr})
	if err != nil {
		t.Fatalf("DialTCP: %v", err)
	}
	<-accepted
	defer up.Close()
	if dev := boundDevice(t, up.(directTCP).TCPConn); dev != "lo" {
		t.Errorf("socket bound to %q, want lo", dev)
	}
	if calls.Load() != 0 || d.bound.count() != 0 {
		t.Errorf("InterfaceFor called %d times, %d sockets tracked; want neither", calls.Load(), d.bound.count())
	}
}

// closedUDPPort returns a loopback address with no socket behind it: a
// datagram sent there is answered with ICMP port unreachable.
func closedUDPPort(t *testing.T, network, host string) netip.AddrPort {
	t.Helper()
	c, err := net.ListenPacket(network, net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("%s on %s: %v", network, host, err)
	}
	addr := c.LocalAddr().(*net.UDPAddr).AddrPort()
	c.Close()
	return netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())
}

// TestDirectUDPPortUnreachable: an ICMP port unreachable answering a
// session's datagram comes out of ReadPacket at once as an
// *UnreachableError that matches ErrRefused and names the closed port; the
// session stays usable, and a send made while the error is pending is not
// lost.
func TestDirectUDPPortUnreachable(t *testing.T) {
	for _, tc := range []struct{ network, host string }{{"udp4", "127.0.0.1"}, {"udp6", "::1"}} {
		t.Run(tc.network, func(t *testing.T) {
			dead := closedUDPPort(t, tc.network, tc.host)
			echo, err := net.ListenPacket(tc.network, net.JoinHostPort(tc.host, "0"))
			if err != nil {
				t.Fatal(err)
			}
			defer echo.Close()
			echoAddr := echo.LocalAddr().(*net.UDPAddr).AddrPort()
			go func() {
				buf := make([]byte, 1500)
				for {
					n, from, err := echo.ReadFrom(buf)
					if err != nil {
						return
					}
					echo.WriteTo(buf[:n], from)
				}
			}()

			d, err := NewDirect(DirectConfig{Name: "direct"}, nil)
			if err != nil {
				t.Fatal(err)
			}
			pc, err := d.ListenUDP(context.Background(), Target{Addr: dead})
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			timer := time.AfterFunc(2*time.Second, func() { pc.Close() })
			defer timer.Stop()
			buf := make([]byte, 1500)

			// The refusal is read.
			start := time.Now()
			if err := pc.WritePacket([]byte("to the dead port"), Target{Addr: dead}); err != nil {
				t.Fatalf("WritePacket(%s): %v", dead, err)
			}
			_, from, err := pc.ReadPacket(buf)
			took := time.Since(start)
			var unreachable *UnreachableError
			if !errors.As(err, &unreachable) || !errors.Is(err, ErrRefused) || !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("ReadPacket after a datagram to %s: err = %v (%T), want an *UnreachableError matching ErrRefused", dead, err, err)
			}
			if from != dead || unreachable.From != dead {
				t.Errorf("ReadPacket: from = %s, UnreachableError.From = %s, want %s", from, unreachable.From, dead)
			}
			if took > 500*time.Millisecond {
				t.Errorf("the refusal took %v to surface, want it at once", took)
			}

			// The refusal is pending when the next datagram is sent: that
			// datagram still goes out.
			if err := pc.WritePacket([]byte("again to the dead port"), Target{Addr: dead}); err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond) // the ICMP error arrives
			if err := pc.WritePacket([]byte("ping"), Target{Addr: echoAddr}); err != nil {
				t.Fatalf("WritePacket(%s) with an ICMP error pending: %v", echoAddr, err)
			}
			for {
				n, from, err := pc.ReadPacket(buf)
				if errors.As(err, &unreachable) {
					continue // the send took it, or it is reported now: either is right
				}
				if err != nil {
					t.Fatalf("ReadPacket: %v, want the echo from %s", err, echoAddr)
				}
				if from != echoAddr || string(buf[:n]) != "ping" {
					t.Fatalf("ReadPacket = %q from %s, want \"ping\" from %s", buf[:n], from, echoAddr)
				}
				break
			}
		})
	}
}
