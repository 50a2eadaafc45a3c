package direct

import (
	"context"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/tungate/tungate/outbound"
)

func TestKind(t *testing.T) {
	k, ok := outbound.Lookup(Type)
	if !ok {
		t.Fatal("direct is not registered")
	}
	cfg := k.NewConfig().(*Config)
	if cfg.FWMark != DefaultFWMark || cfg.Interface != "" {
		t.Errorf("defaults = %+v, want fwmark %#x and the default interface", cfg, DefaultFWMark)
	}
	cfg.Interface = "eth1"
	if s := cfg.Socket(); s.FWMark != DefaultFWMark || s.Interface != "eth1" {
		t.Errorf("Socket = %+v", s)
	}
	if got, want := cfg.String(), "direct, fwmark 0x2e7, interface eth1"; got != want {
		t.Errorf("String = %q, want %q", got, want)
	}
	dst := netip.MustParseAddrPort("192.0.2.1:443")
	if u := cfg.Upstream(dst, "udp"); u.Addr != dst.String() || u.Network != "udp" || u.Transport || u.None {
		t.Errorf("Upstream = %+v, want its own socket to the destination", u)
	}
}

// A direct outbound reports each socket to Deps.Dialing with the
// destination it connects to, before it connects, and done after.
func TestDialingReported(t *testing.T) {
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.Copy(io.Discard, c)
			c.Close()
		}
	}()
	dst := ln.Addr().(*net.TCPAddr).AddrPort()
	var reported []netip.AddrPort
	pending := 0
	deps := outbound.Deps{Dialing: func(to netip.AddrPort) func() {
		reported = append(reported, to)
		pending++
		return func() { pending-- }
	}}
	d, err := (&Config{}).New("direct", deps) // no mark: no privilege needed
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := d.DialTCP(ctx, outbound.Target{Addr: dst})
	if err != nil {
		t.Fatalf("DialTCP(%s): %v", dst, err)
	}
	c.Close()
	if len(reported) != 1 || reported[0] != dst || pending != 0 {
		t.Errorf("reported %v, %d pending; want [%s], 0", reported, pending, dst)
	}
	u, err := d.ListenUDP(ctx, outbound.Target{Addr: netip.MustParseAddrPort("127.0.0.1:9")})
	if err != nil {
		t.Fatal(err)
	}
	if pending != 1 {
		t.Errorf("an open UDP session: %d pending, want 1 until it closes", pending)
	}
	u.Close()
	u.Close()
	if pending != 0 {
		t.Errorf("after Close (twice): %d pending, want 0", pending)
	}
	if err := d.(*Dialer).Close(); err != nil {
		t.Error(err)
	}
}
