// Package reject is the reject outbound kind: it refuses every flow, TCP
// with a RST and UDP with ICMP port unreachable.
package reject

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/tungate/tungate/outbound"
)

// Type is the value of outbounds[].type for this kind.
const Type = "reject"

func init() {
	outbound.Register(outbound.Kind{Type: Type, NewConfig: func() outbound.Config { return &Config{} }})
}

// Config is a reject outbound's entry: it has no keys of its own.
type Config struct{}

// Validate implements outbound.Config.
func (*Config) Validate() []outbound.Problem { return nil }

// New implements outbound.Config.
func (*Config) New(name string, _ outbound.Deps) (outbound.Dialer, error) { return New(name), nil }

// Upstream implements outbound.Explainer: no socket is opened.
func (*Config) Upstream(netip.AddrPort, string) outbound.Upstream {
	return outbound.Upstream{None: true, Note: "a reject outbound refuses the flow (TCP: RST, UDP: ICMP port unreachable)"}
}

// Dialer refuses every flow: TCP dials fail with outbound.ErrRefused (the
// app gets a RST), UDP sessions are refused (the forwarder answers with
// ICMP port unreachable).
type Dialer struct {
	name string
}

// New returns a reject outbound called name.
func New(name string) *Dialer { return &Dialer{name: name} }

// Name implements outbound.Dialer.
func (r *Dialer) Name() string { return r.name }

// DialTCP implements outbound.Dialer.
func (r *Dialer) DialTCP(_ context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	return nil, fmt.Errorf("%s: %s: rejected by rule: %w", r.name, dst, outbound.ErrRefused)
}

// ListenUDP implements outbound.Dialer.
func (r *Dialer) ListenUDP(_ context.Context, first outbound.Target) (outbound.PacketConn, error) {
	return nil, fmt.Errorf("%s: %s: rejected by rule: %w", r.name, first, outbound.ErrRefused)
}

// CarriesUDP implements outbound.UDPCarrier: a reject outbound refuses
// every datagram.
func (r *Dialer) CarriesUDP() bool { return false }
