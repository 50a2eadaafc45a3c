package httpconnect

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/tungate/tungate/outbound"
)

// Dialer is an HTTP CONNECT outbound. It is safe for concurrent use.
type Dialer struct {
	cfg    Config
	server netip.AddrPort
	auth   string // the Proxy-Authorization header line, or ""
	base   outbound.Dialer
	log    *slog.Logger
	stats  counters
}

var _ outbound.Dialer = (*Dialer)(nil)

// New returns an HTTP CONNECT outbound that reaches the proxy through
// base.
func New(cfg Config, base outbound.Dialer, log *slog.Logger) (*Dialer, error) {
	server, err := cfg.validate()
	if err != nil {
		return nil, fmt.Errorf("http outbound %q: %w", cfg.Name, err)
	}
	if base == nil {
		return nil, fmt.Errorf("http outbound %q: no base dialer", cfg.Name)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Dialer{cfg: cfg, server: server, base: base, log: log}
	if cfg.Username != "" {
		d.auth = "Proxy-Authorization: Basic " +
			base64.StdEncoding.EncodeToString([]byte(cfg.Username+":"+cfg.Password)) + "\r\n"
	}
	return d, nil
}

// Name implements outbound.Dialer.
func (d *Dialer) Name() string { return d.cfg.Name }

// DialTCP implements outbound.Dialer with a CONNECT. The connection
// returned is the one to the proxy, past the response header: CloseWrite
// and Abort act on it directly, so a half-close or a RST reaches the
// proxy.
func (d *Dialer) DialTCP(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	d.stats.dials.Add(1)
	conn, err := d.connect(ctx, dst)
	if err != nil {
		if errors.Is(err, outbound.ErrRefused) {
			d.stats.refused.Add(1)
		} else {
			d.stats.dialFailures.Add(1)
		}
		return nil, fmt.Errorf("http %s: connect %s: %w", d.cfg.Name, dst, err)
	}
	return conn, nil
}

// ListenUDP implements outbound.Dialer: it always fails, with an error
// wrapping outbound.ErrRefused.
func (d *Dialer) ListenUDP(_ context.Context, first outbound.Target) (outbound.PacketConn, error) {
	return nil, fmt.Errorf("http %s: udp to %s: %w", d.cfg.Name, first, refusal("http outbound carries TCP only"))
}

// CarriesUDP implements outbound.UDPCarrier: HTTP CONNECT carries TCP only.
func (d *Dialer) CarriesUDP() bool { return false }

// authority returns the request target for dst: host:port with the name
// when known, else the IP (IPv6 in brackets).
func authority(dst outbound.Target) (string, error) {
	host := dst.Domain
	if host != "" {
		// The name goes into the request line: nothing in it may end
		// the line or the field early.
		if strings.ContainsFunc(host, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
			return "", fmt.Errorf("name %q contains a space or control character", host)
		}
	} else {
		ip := dst.Addr.Addr().Unmap().WithZone("")
		if !ip.IsValid() {
			return "", errors.New("destination has neither an address nor a name")
		}
		host = ip.String()
	}
	return net.JoinHostPort(host, strconv.Itoa(int(dst.Addr.Port()))), nil
}

// connect dials the proxy and sends the CONNECT for dst, bounded as
// outbound.DialProxy bounds it.
func (d *Dialer) connect(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	target, err := authority(dst)
	if err != nil {
		return nil, err
	}
	_, tunnel, err := outbound.DialProxy(ctx, d.base, d.server, func(conn outbound.TCPConn) (outbound.TCPConn, error) {
		return d.exchange(conn, target)
	})
	return tunnel, err
}

// exchange sends the request and reads the response. Bytes the proxy sent
// after its response header are kept: the connection returned reads them
// first.
func (d *Dialer) exchange(conn outbound.TCPConn, target string) (outbound.TCPConn, error) {
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n" + d.auth + "\r\n"
	if _, err := conn.Write([]byte(req)); err != nil {
		return nil, err
	}
	br := bufio.NewReader(conn)
	code, status, err := readResponse(br)
	if err != nil {
		return nil, err
	}
	switch {
	case code == 407 && d.cfg.Username == "":
		return nil, refusal(fmt.Sprintf("authentication failed: proxy requires credentials and none are configured (%q)", truncate([]byte(status))))
	case code == 407:
		return nil, refusal(fmt.Sprintf("authentication failed: proxy rejected the credentials (%q)", truncate([]byte(status))))
	case code < 200 || code > 299:
		return nil, fmt.Errorf("proxy answered %q", truncate([]byte(status)))
	}
	if n := br.Buffered(); n > 0 {
		early, _ := br.Peek(n)
		return &earlyConn{TCPConn: conn, early: bytes.Clone(early)}, nil
	}
	return conn, nil
}

// refusal is an error that satisfies errors.Is(err, outbound.ErrRefused)
// without "connection refused" in its text: a failed authentication or a
// UDP session. Retrying will not help; the app gets a RST (or an ICMP
// unreachable).
type refusal string

func (r refusal) Error() string        { return string(r) }
func (r refusal) Is(target error) bool { return target == outbound.ErrRefused }

// earlyConn is a tunnel whose first bytes came in with the response
// header.
type earlyConn struct {
	outbound.TCPConn
	early []byte
}

func (c *earlyConn) Read(b []byte) (int, error) {
	if len(c.early) > 0 {
		n := copy(b, c.early)
		c.early = c.early[n:]
		return n, nil
	}
	return c.TCPConn.Read(b)
}

// Stats is a snapshot of an outbound's counters, totals since New.
type Stats struct {
	// Dials counts CONNECT attempts.
	Dials uint64
	// DialFailures counts attempts that failed other than by a refusal:
	// the proxy unreachable or silent, a non-2xx answer, a bad response.
	DialFailures uint64
	// Refused counts attempts refused: 407 or the proxy's port closed.
	Refused uint64
}

type counters struct {
	dials, dialFailures, refused atomic.Uint64
}

// Stats returns a snapshot of the counters.
func (d *Dialer) Stats() Stats {
	return Stats{
		Dials:        d.stats.dials.Load(),
		DialFailures: d.stats.dialFailures.Load(),
		Refused:      d.stats.refused.Load(),
	}
}
