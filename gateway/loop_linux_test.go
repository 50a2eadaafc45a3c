//go:build linux

package gateway

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/netlab"
	"github.com/tungate/tungate/outbound"
)

// TestLoopGuard runs the routing step's loop guard in a lab namespace
// against real sockets: a flow from a socket carrying tungate's mark is
// refused while tungate dials its destination, an app's flow is routed,
// and no flow to a destination nobody dials is looked up at all.
func TestLoopGuard(t *testing.T) {
	lab := netlab.New(t)
	ln, err := lab.Wan.Listen("tcp", netip.AddrPortFrom(netlab.Remote4(1), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst := ln.Addr().(*net.TCPAddr).AddrPort()

	cfg := loadConfig(t, "outbounds: [{name: direct, type: direct, fwmark: 0x2e7}]\ndns: {enabled: false}\nroute: {auto: false}\n")
	cfg.Tun.Name = netlab.VethName
	g := running(t, cfg, nil)
	lab.App.Do(func() error {
		g.loop = g.startLoopGuard(cfg)
		return nil
	})
	if g.loop == nil {
		t.Fatal("no loop detector")
	}
	defer g.loop.Close()

	dial := func(mark int) netip.AddrPort {
		var c net.Conn
		err := lab.App.Do(func() (err error) {
			d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
				return rc.Control(func(fd uintptr) {
					if mark != 0 {
						unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
					}
				})
			}}
			c, err = d.Dial("tcp", dst.String())
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c.LocalAddr().(*net.TCPAddr).AddrPort()
	}
	route := func(src netip.AddrPort) Decision {
		return g.Route(Meta{Network: "tcp", Src: src, Dst: dst})
	}

	own := dial(0x2e7)
	if d := route(own); d.Loop {
		t.Errorf("a flow to a destination tungate is not dialling was taken for a loop: %+v", d)
	}
	done := g.loop.Dialing(dst)
	if d := route(dial(0)); d.Loop || d.Outbound != "direct" {
		t.Errorf("an app's flow while tungate dials the same destination: %+v, want direct", d)
	}
	d, dialer := g.route(Meta{Network: "tcp", Src: own, Dst: dst})
	if !d.Loop || d.Outbound != "loop-guard" {
		t.Fatalf("a flow from a socket with tungate's mark while it dials: %+v, want the loop refusal", d)
	}
	if _, err := dialer.DialTCP(context.Background(), outbound.Target{Addr: dst}); !errors.Is(err, outbound.ErrRefused) {
		t.Errorf("loop refusal DialTCP: %v, want ErrRefused (a RST to the socket)", err)
	}
	if c, ok := dialer.(outbound.UDPCarrier); !ok || c.CarriesUDP() {
		t.Error("loop refusal must refuse UDP at once")
	}
	done()
	if d := route(own); d.Loop {
		t.Errorf("after the dial returned: %+v, want no lookup", d)
	}
	if n := g.loop.Loops(); n != 1 {
		t.Errorf("Loops() = %d, want 1", n)
	}
}
