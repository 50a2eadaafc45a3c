//go:build linux

package e2e

import (
	"bytes"
	"errors"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// recordingUDPServer echoes every datagram and reports each sender, so the
// test learns the address tungate mapped the app to.
func recordingUDPServer(t *testing.T, ns *netlab.NS, addr string) <-chan netip.AddrPort {
	t.Helper()
	pc, err := ns.ListenPacket("udp", addr)
	if err != nil {
		t.Fatalf("listen udp %s: %v", addr, err)
	}
	senders := make(chan netip.AddrPort, 64)
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, from, err := pc.(*net.UDPConn).ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			select {
			case senders <- from:
			default:
			}
			pc.(*net.UDPConn).WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	return senders
}

func listenApp(t testing.TB, lab *netlab.Lab, network string) *net.UDPConn {
	t.Helper()
	pc, err := lab.App.ListenPacket(network, "")
	if err != nil {
		t.Fatalf("listen %s in app: %v", network, err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc.(*net.UDPConn)
}

// readFrom reads one datagram with a deadline.
func readFrom(c *net.UDPConn, d time.Duration) ([]byte, netip.AddrPort, error) {
	buf := make([]byte, 65535)
	c.SetReadDeadline(time.Now().Add(d))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	return buf[:n], netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), err
}

func TestUDP(t *testing.T) {
	lab := netlab.New(t)
	cfg := baseConfig()
	// Short enough to watch a mapping expire, long enough for the test's
	// own exchanges to keep it alive.
	cfg["stack"] = map[string]any{"udp": map[string]any{"idle_timeout": "1500ms"}}
	g := startGateway(t, lab, cfg)

	for _, tc := range []struct {
		name, network string
		server        netip.AddrPort
		second        netip.AddrPort
	}{
		{"ipv4", "udp4", netip.AddrPortFrom(netlab.Remote4(1), 7), netip.AddrPortFrom(netlab.Remote4(2), 9999)},
		{"ipv6", "udp6", netip.AddrPortFrom(netlab.Remote6(1), 7), netip.AddrPortFrom(netlab.Remote6(2), 9999)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			senders := recordingUDPServer(t, lab.Wan, tc.server.String())
			app := listenApp(t, lab, tc.network)

			// Echo: sizes from 1 byte to one that needs fragments
			// on the way back (over the 9000-byte MTU).
			for _, size := range []int{1, 1400, 8000, 20000} {
				msg := bytes.Repeat([]byte{byte(size)}, size)
				if _, err := app.WriteToUDPAddrPort(msg, tc.server); err != nil {
					t.Fatalf("send %d bytes: %v", size, err)
				}
				got, from, err := readFrom(app, 3*time.Second)
				if err != nil {
					t.Fatalf("echo of %d bytes: %v", size, err)
				}
				if from != tc.server || !bytes.Equal(got, msg) {
					t.Fatalf("echo of %d bytes: got %d bytes from %s, want %d from %s", size, len(got), from, size, tc.server)
				}
			}
			var mapped netip.AddrPort
			select {
			case mapped = <-senders:
			case <-time.After(time.Second):
				t.Fatal("server saw no sender")
			}
			if mapped.Addr() == netlab.AppAddr4 || mapped.Addr() == netlab.AppAddr6 {
				t.Logf("mapped to %s", mapped)
			} else {
				t.Fatalf("server saw sender %s, want tungate's socket on the app veth", mapped)
			}

			// Full cone: a second remote, never contacted by the
			// app, reaches it through the same mapping.
			other, err := lab.Wan.ListenPacket("udp", tc.second.String())
			if err != nil {
				t.Fatal(err)
			}
			defer other.Close()
			if _, err := other.(*net.UDPConn).WriteToUDPAddrPort([]byte("from elsewhere"), mapped); err != nil {
				t.Fatal(err)
			}
			got, from, err := readFrom(app, 3*time.Second)
			if err != nil {
				t.Fatalf("datagram from a second remote: %v", err)
			}
			if string(got) != "from elsewhere" || from != tc.second {
				t.Fatalf("got %q from %s, want %q from %s", got, from, "from elsewhere", tc.second)
			}

			// Expiry: once idle past the timeout the mapping is
			// gone and its port no longer reaches the app.
			g.waitMetric("tungate_udp_sessions_active", 5*time.Second, "0", func(v float64) bool { return v == 0 })
			other.(*net.UDPConn).WriteToUDPAddrPort([]byte("too late"), mapped)
			if got, from, err := readFrom(app, 500*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("after expiry the app got %q from %s (%v); want nothing", got, from, err)
			}
		})
	}
	if v := g.metric("tungate_udp_sessions_expired_total"); v < 2 {
		t.Errorf("tungate_udp_sessions_expired_total = %v, want ≥ 2", v)
	}
}

func TestRejectOutbound(t *testing.T) {
	lab := netlab.New(t)
	cfg := baseConfig()
	cfg["outbounds"] = []any{
		map[string]any{"name": "direct", "type": "direct", "fwmark": fwmark},
		map[string]any{"name": "block", "type": "reject"},
	}
	cfg["rules"] = []any{map[string]any{"ip_cidr": []string{netlab.Remote4(3).String() + "/32"}, "outbound": "block"}}
	g := startGateway(t, lab, cfg)
	lab.Wan.TCPEcho(t, remote4(3, 80))
	lab.Wan.TCPEcho(t, remote4(2, 80))

	start := time.Now()
	_, err := lab.App.DialTimeout("tcp", remote4(3, 80), 5*time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial a rejected destination: %v; want ECONNREFUSED", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("rejected after %v, want under 1 s", d)
	}
	// The rule is per destination: the others still go direct.
	c := dialApp(t, lab, remote4(2, 80))
	c.Close()

	// UDP to a rejected destination: ICMP port unreachable, which a
	// connected socket reports as ECONNREFUSED.
	var uc net.Conn
	uc, err = lab.App.Dial("udp", remote4(3, 53))
	if err != nil {
		t.Fatal(err)
	}
	defer uc.Close()
	uc.Write([]byte("q"))
	uc.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := uc.Read(make([]byte, 16)); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("udp to a rejected destination: %v; want ECONNREFUSED (ICMP port unreachable)", err)
	}
	if v := g.metric("tungate_tcp_refused_total"); v != 1 {
		t.Errorf("tungate_tcp_refused_total = %v, want 1", v)
	}
}
