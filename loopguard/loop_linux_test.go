package loopguard

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/netlab"
	"github.com/tungate/tungate/internal/testlog"
)

// dialFrom opens a TCP connection from the lab's app namespace with the
// given socket options (mark 0 = none, dev "" = unbound).
func dialFrom(t *testing.T, ns *netlab.NS, network, addr string, mark int, dev string) net.Conn {
	t.Helper()
	var c net.Conn
	err := ns.Do(func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second, Control: sockopts(mark, dev)}
		c, err = d.Dial(network, addr)
		return err
	})
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func sockopts(mark int, dev string) func(string, string, syscall.RawConn) error {
	return func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if mark != 0 {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
			}
			if serr == nil && dev != "" {
				serr = unix.BindToDevice(int(fd), dev)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

func newTestDetector(t *testing.T, ns *netlab.NS, cfg Config) (*Detector, *testlog.Buffer) {
	t.Helper()
	log, logs := testLogger(t)
	var d *Detector
	// The detector's netlink socket belongs to the namespace it is made in.
	err := ns.Do(func() (err error) {
		d, err = New(cfg, log)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, logs
}

func addrPort(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.AddrPort()
	case *net.UDPAddr:
		return a.AddrPort()
	}
	panic(a)
}

// TestLoopDetectorKernel asks the real kernel (sock_diag) about sockets in
// a lab namespace.
func TestLoopDetectorKernel(t *testing.T) {
	lab := netlab.New(t)
	ln4, err := lab.Wan.Listen("tcp", netip.AddrPortFrom(netlab.Remote4(1), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln4.Close()
	ln6, err := lab.Wan.Listen("tcp", netip.AddrPortFrom(netlab.Remote6(1), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln6.Close()
	r4, r6 := addrPort(ln4.Addr()), addrPort(ln6.Addr())

	marked := Config{Marks: []uint32{0x2e7}, Tun: netlab.VethName}
	unmarked := Config{Marks: []uint32{0x2e7}, Unmarked: true, Tun: netlab.VethName}
	d, logs := newTestDetector(t, lab.App, marked)
	du, _ := newTestDetector(t, lab.App, unmarked)

	tests := []struct {
		name string
		d    *Detector
		conn net.Conn
		dst  netip.AddrPort
		want bool
	}{
		{"marked IPv4 socket", d, dialFrom(t, lab.App, "tcp", r4.String(), 0x2e7, ""), r4, true},
		{"marked IPv6 socket", d, dialFrom(t, lab.App, "tcp", r6.String(), 0x2e7, ""), r6, true},
		{"socket with another mark", d, dialFrom(t, lab.App, "tcp", r4.String(), 0x55, ""), r4, false},
		{"marked socket bound to the device", d, dialFrom(t, lab.App, "tcp", r4.String(), 0x2e7, netlab.VethName), r4, true},
		{"unmarked socket, every outbound marked", d, dialFrom(t, lab.App, "tcp", r4.String(), 0, ""), r4, false},
		{"unmarked socket of this process, an unmarked outbound", du, dialFrom(t, lab.App, "tcp", r4.String(), 0, ""), r4, true},
	}
	own := map[netip.AddrPort]bool{}
	for _, tc := range tests {
		own[addrPort(tc.conn.LocalAddr())] = true
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			src := addrPort(tc.conn.LocalAddr())
			if got := tc.d.Loop("tcp", src, tc.dst); got != tc.want {
				t.Errorf("Loop(tcp, %s, %s) = %v, want %v", src, tc.dst, got, tc.want)
			}
		})
	}
	if n := strings.Count(logs.String(), "routing loop"); n != 1 {
		t.Errorf("%d log lines about loops, want 1:\n%s", n, logs)
	}

	t.Run("unmarked socket of another process", func(t *testing.T) {
		// bash holds a connection; its source address is what the
		// listener sees as the peer.
		p := lab.App.Start(t, "bash", "-c", "exec 3<>/dev/tcp/"+r4.Addr().String()+"/"+strconv.Itoa(int(r4.Port()))+"; sleep 30")
		defer p.Stop(time.Second)
		ln4.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
		// Skip the connections the subtests above made.
		for {
			c, err := ln4.Accept()
			if err != nil {
				t.Fatalf("accept: %v\n%s", err, p.Log())
			}
			defer c.Close()
			src := addrPort(c.RemoteAddr())
			if own[src] {
				continue
			}
			if du.Loop("tcp", src, r4) {
				t.Errorf("Loop(tcp, %s, %s) = true for bash's socket", src, r4)
			}
			return
		}
	})

	t.Run("udp", func(t *testing.T) {
		var pc net.PacketConn
		err := lab.App.Do(func() (err error) {
			lc := net.ListenConfig{Control: sockopts(0x2e7, "")}
			pc, err = lc.ListenPacket(context.Background(), "udp4", "0.0.0.0:0")
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		dst := netip.AddrPortFrom(netlab.Remote4(2), 53)
		src := netip.AddrPortFrom(netlab.AppAddr4, addrPort(pc.LocalAddr()).Port())
		if !d.Loop("udp", src, dst) {
			t.Errorf("Loop(udp, %s, %s) = false for a marked UDP socket", src, dst)
		}
		free := netip.AddrPortFrom(netlab.AppAddr4, 9) // nothing bound
		if d.Loop("udp", free, dst) {
			t.Errorf("Loop(udp, %s, %s) = true with no socket", free, dst)
		}
	})
}
