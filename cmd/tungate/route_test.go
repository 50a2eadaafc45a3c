//go:build linux

package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"reflect"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/forwarder"
	"github.com/tungate/tungate/internal/netlab"
	"github.com/tungate/tungate/outbound"
)

func TestOwnMarks(t *testing.T) {
	tests := []struct {
		name      string
		outbounds []configs.Outbound
		marks     []uint32
		unmarked  bool
	}{
		{"default", []configs.Outbound{{Name: "direct", Type: "direct", FWMark: 0x2e7}}, []uint32{0x2e7}, false},
		{"two direct, one unmarked", []configs.Outbound{{Name: "a", Type: "direct", FWMark: 0x2e7}, {Name: "b", Type: "direct"}}, []uint32{0x2e7}, true},
		{"proxies only: the transport's default mark", []configs.Outbound{{Name: "p", Type: "socks5"}}, []uint32{0x2e7}, false},
		{"marks of every direct outbound", []configs.Outbound{{Name: "a", Type: "direct", FWMark: 1}, {Name: "r", Type: "reject"}, {Name: "b", Type: "direct", FWMark: 2}}, []uint32{1, 2}, false},
	}
	for _, tc := range tests {
		cfg := configs.Default()
		cfg.Outbounds = tc.outbounds
		marks, unmarked := ownMarks(cfg)
		if !reflect.DeepEqual(marks, tc.marks) || unmarked != tc.unmarked {
			t.Errorf("%s: ownMarks = %v, %v; want %v, %v", tc.name, marks, unmarked, tc.marks, tc.unmarked)
		}
	}
	rc := routeConfig(configs.Default(), "tungate0")
	if rc.TunName != "tungate0" || rc.Table != 2022 || rc.Priority != 9000 || rc.Journal != "/run/tungate/route.journal" || !reflect.DeepEqual(rc.FWMarks, []uint32{0x2e7}) {
		t.Errorf("routeConfig(default) = %+v", rc)
	}
}

// TestLoopGuard runs the guard in a lab namespace against a real socket
// carrying tungate's mark.
func TestLoopGuard(t *testing.T) {
	lab := netlab.New(t)
	ln, err := lab.Wan.Listen("tcp", netip.AddrPortFrom(netlab.Remote4(1), 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dst := ln.Addr().(*net.TCPAddr).AddrPort()

	cfg := configs.Default()
	cfg.Tun.Name = netlab.VethName
	g := &gateway{log: slog.New(slog.DiscardHandler)}
	routed := 0
	direct := outbound.NewReject("stand-in")
	var guarded forwarder.Route
	lab.App.Do(func() error {
		guarded = g.loopGuard(cfg, func(*forwarder.Flow) outbound.Dialer { routed++; return direct })
		return nil
	})

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

	app := dial(0)
	if d := guarded(&forwarder.Flow{Network: "tcp", Src: app, Dst: dst}); d != direct || routed != 1 {
		t.Errorf("an app's flow: dialer %v (routed %d), want the routed one", d.Name(), routed)
	}
	own := dial(0x2e7)
	d := guarded(&forwarder.Flow{Network: "tcp", Src: own, Dst: dst})
	if _, ok := d.(loopRefusal); !ok || routed != 1 {
		t.Fatalf("a flow from a socket with tungate's mark: dialer %v (routed %d), want the loop refusal", d.Name(), routed)
	}
	if _, err := d.DialTCP(context.Background(), outbound.Target{Addr: dst}); !errors.Is(err, outbound.ErrRefused) {
		t.Errorf("loop refusal DialTCP: %v, want ErrRefused (a RST to the socket)", err)
	}
	if c, ok := d.(outbound.UDPCarrier); !ok || c.CarriesUDP() {
		t.Error("loop refusal must refuse UDP at once")
	}
}
