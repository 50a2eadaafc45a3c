package reject

import (
	"context"
	"errors"
	"net/netip"
	"testing"

	"github.com/tungate/tungate/outbound"
)

func TestReject(t *testing.T) {
	k, ok := outbound.Lookup(Type)
	if !ok {
		t.Fatal("reject is not registered")
	}
	cfg := k.NewConfig()
	if p := cfg.Validate(); p != nil {
		t.Errorf("Validate = %v", p)
	}
	d, err := cfg.New("block", outbound.Deps{})
	if err != nil || d.Name() != "block" {
		t.Fatalf("New = %v, %v", d, err)
	}
	dst := outbound.Target{Addr: netip.MustParseAddrPort("192.0.2.1:443")}
	if _, err := d.DialTCP(context.Background(), dst); !errors.Is(err, outbound.ErrRefused) {
		t.Errorf("DialTCP: %v, want ErrRefused (a RST to the app)", err)
	}
	if _, err := d.ListenUDP(context.Background(), dst); !errors.Is(err, outbound.ErrRefused) {
		t.Errorf("ListenUDP: %v, want ErrRefused", err)
	}
	if c, ok := d.(outbound.UDPCarrier); !ok || c.CarriesUDP() {
		t.Error("a reject outbound must refuse UDP up front (ICMP port unreachable)")
	}
	if u := cfg.(outbound.Explainer).Upstream(dst.Addr, "tcp"); !u.None || u.Note == "" {
		t.Errorf("Upstream = %+v, want none with a note", u)
	}
}
