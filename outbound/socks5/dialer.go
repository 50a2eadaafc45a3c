package socks5

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync/atomic"

	"github.com/tungate/tungate/outbound"
)

// Dialer is a SOCKS5 outbound. It is safe for concurrent use.
type Dialer struct {
	cfg    Config
	server netip.AddrPort
	base   outbound.Dialer
	log    *slog.Logger
	stats  counters
}

var _ outbound.Dialer = (*Dialer)(nil)

// New returns a SOCKS5 outbound that reaches the proxy through base.
func New(cfg Config, base outbound.Dialer, log *slog.Logger) (*Dialer, error) {
	server, err := cfg.validate()
	if err != nil {
		return nil, fmt.Errorf("socks5 outbound %q: %w", cfg.Name, err)
	}
	if base == nil {
		return nil, fmt.Errorf("socks5 outbound %q: no base dialer", cfg.Name)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Dialer{cfg: cfg, server: server, base: base, log: log}, nil
}

// Name implements outbound.Dialer.
func (d *Dialer) Name() string { return d.cfg.Name }

// DialTCP implements outbound.Dialer with a CONNECT. The connection
// returned is the one to the proxy, past the handshake: CloseWrite and
// Abort act on it directly, so a half-close or a RST reaches the proxy.
func (d *Dialer) DialTCP(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	d.stats.dials.Add(1)
	conn, _, err := d.open(ctx, cmdConnect, dst)
	if err != nil {
		d.countFailure(err)
		return nil, fmt.Errorf("socks5 %s: connect %s: %w", d.cfg.Name, dst, err)
	}
	return conn, nil
}

// CarriesUDP implements outbound.UDPCarrier: UDP goes through UDP
// ASSOCIATE unless the outbound has udp: false.
func (d *Dialer) CarriesUDP() bool { return d.cfg.UDP }

// ListenUDP implements outbound.Dialer with a UDP ASSOCIATE: one
// association per session, living as long as its control connection.
func (d *Dialer) ListenUDP(ctx context.Context, first outbound.Target) (outbound.PacketConn, error) {
	if !d.cfg.UDP {
		return nil, fmt.Errorf("socks5 %s: udp to %s: %w", d.cfg.Name, first, refusal("UDP is disabled for this outbound"))
	}
	d.stats.dials.Add(1)
	a, err := d.associate(ctx)
	if err != nil {
		d.countFailure(err)
		return nil, fmt.Errorf("socks5 %s: udp associate for %s: %w", d.cfg.Name, first, err)
	}
	d.stats.associations.Add(1)
	d.log.Debug("udp association", "outbound", d.cfg.Name, "first", first, "relay", a.relay)
	return a, nil
}

func (d *Dialer) countFailure(err error) {
	if errors.Is(err, outbound.ErrRefused) {
		d.stats.refused.Add(1)
	} else {
		d.stats.dialFailures.Add(1)
	}
}

// open connects to the proxy and runs the handshake for cmd to dst,
// bounded as outbound.DialProxy bounds it.
func (d *Dialer) open(ctx context.Context, cmd byte, dst outbound.Target) (outbound.TCPConn, socksAddr, error) {
	return outbound.DialProxy(ctx, d.base, d.server, func(conn outbound.TCPConn) (socksAddr, error) {
		return d.handshake(conn, cmd, dst)
	})
}

// handshake runs method selection, authentication and the request for
// cmd to dst, and returns the reply's bound address.
func (d *Dialer) handshake(conn io.ReadWriter, cmd byte, dst outbound.Target) (socksAddr, error) {
	buf := make([]byte, 0, 3+255*2)
	method := byte(methodNoAuth)
	if d.cfg.Username != "" {
		method = methodUserPass
	}
	if _, err := conn.Write(append(buf, socksVersion, 1, method)); err != nil {
		return socksAddr{}, err
	}
	chosen, err := readMethodReply(conn)
	if err != nil {
		return socksAddr{}, err
	}
	switch {
	case chosen == methodNone && method == methodUserPass:
		return socksAddr{}, authFailed("proxy refuses username/password authentication")
	case chosen == methodNone:
		return socksAddr{}, authFailed("proxy requires authentication and no username is configured")
	case chosen != method:
		return socksAddr{}, fmt.Errorf("proxy chose authentication method %#02x, which was not offered", chosen)
	}
	if method == methodUserPass {
		b := append(buf, authVersion, byte(len(d.cfg.Username)))
		b = append(b, d.cfg.Username...)
		b = append(b, byte(len(d.cfg.Password)))
		b = append(b, d.cfg.Password...)
		if _, err := conn.Write(b); err != nil {
			return socksAddr{}, err
		}
		if err := readAuthReply(conn); err != nil {
			return socksAddr{}, err
		}
	}
	req, err := appendAddr(append(buf, socksVersion, cmd, 0), dst)
	if err != nil {
		return socksAddr{}, err
	}
	if _, err := conn.Write(req); err != nil {
		return socksAddr{}, err
	}
	return readReply(conn)
}

// Stats is a snapshot of an outbound's counters, totals since New.
type Stats struct {
	// Dials counts CONNECT and UDP ASSOCIATE attempts.
	Dials uint64
	// DialFailures counts attempts that failed other than by a refusal:
	// the proxy unreachable or silent, a failure reply, a protocol error.
	DialFailures uint64
	// Refused counts attempts refused by the proxy: reply 0x05, failed
	// authentication, or the proxy's port closed. UDP sessions refused
	// because UDP is disabled are not counted (the caller counts them).
	Refused uint64
	// UDPAssociations counts associations opened.
	UDPAssociations uint64
	// Datagrams from the relay dropped: fragments (FRAG≠0), replies whose
	// source is a name, and malformed ones (bad header, or not from the
	// relay).
	UDPDroppedFragment, UDPDroppedName, UDPDroppedMalformed uint64
}

type counters struct {
	dials, dialFailures, refused, associations atomic.Uint64
	dropFragment, dropName, dropMalformed      atomic.Uint64
}

// Stats returns a snapshot of the counters.
func (d *Dialer) Stats() Stats {
	return Stats{
		Dials:               d.stats.dials.Load(),
		DialFailures:        d.stats.dialFailures.Load(),
		Refused:             d.stats.refused.Load(),
		UDPAssociations:     d.stats.associations.Load(),
		UDPDroppedFragment:  d.stats.dropFragment.Load(),
		UDPDroppedName:      d.stats.dropName.Load(),
		UDPDroppedMalformed: d.stats.dropMalformed.Load(),
	}
}
