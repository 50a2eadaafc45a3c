package gateway

import (
	"testing"

	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/outbound/reject"
)

// TestSwappableDialerCarriesUDP: the DNS proxy's dialer says whether the
// outbound it currently points at carries UDP, so that dnsproxy asks udp://
// upstreams over TCP through one that does not.
func TestSwappableDialerCarriesUDP(t *testing.T) {
	direct, err := outbound.NewDirect(outbound.DirectConfig{Name: "direct"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	var s swappableDialer
	var _ outbound.UDPCarrier = &s
	s.set(direct)
	if !s.CarriesUDP() {
		t.Errorf("CarriesUDP() through a direct outbound = false, want true")
	}
	s.set(reject.New("block"))
	if s.CarriesUDP() {
		t.Errorf("CarriesUDP() through an outbound that carries no UDP = true, want false")
	}
}
