package outbound

import (
	"context"
	"fmt"
)

// Reject refuses every flow: TCP dials fail with ErrRefused (the app gets a
// RST), UDP sessions are refused (the forwarder answers with ICMP port
// unreachable).
type Reject struct {
	name string
}

// NewReject returns a reject outbound called name.
func NewReject(name string) *Reject { return &Reject{name: name} }

// Name implements Dialer.
func (r *Reject) Name() string { return r.name }

// DialTCP implements Dialer.
func (r *Reject) DialTCP(_ context.Context, dst Target) (TCPConn, error) {
	return nil, fmt.Errorf("%s: %s: rejected by rule: %w", r.name, dst, ErrRefused)
}

// ListenUDP implements Dialer.
func (r *Reject) ListenUDP(_ context.Context, first Target) (PacketConn, error) {
	return nil, fmt.Errorf("%s: %s: rejected by rule: %w", r.name, first, ErrRefused)
}

// CarriesUDP implements UDPCarrier: a reject outbound refuses every datagram.
func (r *Reject) CarriesUDP() bool { return false }
