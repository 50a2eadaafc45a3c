package dnsproxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/outbound"
)

// Upstream schemes.
const (
	SchemeUDP   = "udp"
	SchemeTCP   = "tcp"
	SchemeTLS   = "tls"
	SchemeHTTPS = "https"
)

// Upstream is one parsed upstream server.
type Upstream struct {
	Scheme string // SchemeUDP, SchemeTCP, SchemeTLS or SchemeHTTPS
	// Host is the IP literal (without brackets) or the hostname of the URL,
	// lower-case. For tls and https it is also the name the server's
	// certificate must be valid for.
	Host string
	Port uint16
	Path string // https only; "/dns-query" when the URL has none
	// Addr is Host:Port when Host is an IP literal, else invalid (the host
	// is resolved through the bootstrap servers on first use).
	Addr netip.AddrPort
}

// String returns the upstream as a canonical URL.
func (u Upstream) String() string {
	s := u.Scheme + "://" + net.JoinHostPort(u.Host, strconv.Itoa(int(u.Port)))
	if u.Scheme == SchemeHTTPS {
		s += u.Path
	}
	return s
}

// ParseUpstream parses one upstream string: udp://, tcp://, tls:// or
// https:// followed by an IP literal or a hostname, an optional port (53, 53,
// 853 and 443 by default) and, for https only, a path ("/dns-query" by
// default).
func ParseUpstream(s string) (Upstream, error) {
	u, err := url.Parse(s)
	if err != nil {
		return Upstream{}, fmt.Errorf("upstream %q: %w", s, err)
	}
	var up Upstream
	switch strings.ToLower(u.Scheme) {
	case SchemeUDP, SchemeTCP:
		up.Scheme, up.Port = strings.ToLower(u.Scheme), 53
	case SchemeTLS:
		up.Scheme, up.Port = SchemeTLS, 853
	case SchemeHTTPS:
		up.Scheme, up.Port, up.Path = SchemeHTTPS, 443, "/dns-query"
	case "":
		return Upstream{}, fmt.Errorf("upstream %q: missing scheme, want udp://, tcp://, tls:// or https://", s)
	default:
		return Upstream{}, fmt.Errorf("upstream %q: unknown scheme %q, want udp, tcp, tls or https", s, u.Scheme)
	}
	if u.Opaque != "" || u.User != nil || u.RawQuery != "" || u.Fragment != "" {
		return Upstream{}, fmt.Errorf("upstream %q: want scheme://host[:port] (and a /path for https)", s)
	}
	if u.Path != "" && u.Path != "/" {
		if up.Scheme != SchemeHTTPS {
			return Upstream{}, fmt.Errorf("upstream %q: a path is only allowed for https", s)
		}
		up.Path = u.Path
	}
	host := strings.ToLower(u.Hostname())
	if host == "" {
		return Upstream{}, fmt.Errorf("upstream %q: missing host", s)
	}
	if p := u.Port(); p != "" {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return Upstream{}, fmt.Errorf("upstream %q: bad port %q", s, p)
		}
		up.Port = uint16(n)
	} else if strings.HasSuffix(u.Host, ":") {
		return Upstream{}, fmt.Errorf("upstream %q: empty port", s)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		if a.Zone() != "" {
			return Upstream{}, fmt.Errorf("upstream %q: zoned addresses are not supported", s)
		}
		up.Host = a.Unmap().String()
		up.Addr = netip.AddrPortFrom(a.Unmap(), up.Port)
		return up, nil
	}
	host = strings.TrimSuffix(host, ".")
	if !validHostname(host) {
		return Upstream{}, fmt.Errorf("upstream %q: bad host %q", s, host)
	}
	up.Host = host
	return up, nil
}

// validHostname accepts lower-case LDH names (underscores allowed).
func validHostname(h string) bool {
	if len(h) == 0 || len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if len(label) == 0 || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// upstream is the runtime side of one Upstream: its connections and
// counters.
type upstream struct {
	spec    Upstream
	name    string // as configured, for errors and stats
	dialer  outbound.Dialer
	timeout time.Duration
	tls     *tls.Config // tls and https

	// resolve finds the address of a hostname upstream (bootstrap).
	resolve func(ctx context.Context, host string) (netip.Addr, error)
	addrMu  sync.Mutex
	addr    netip.AddrPort

	pool streamPool   // tcp and tls (and udp's TC retries)
	http *http.Client // https

	queries, errors     atomic.Uint64
	latencyNs, latencyN atomic.Uint64
}

func newUpstream(spec Upstream, name string, dialer outbound.Dialer, timeout time.Duration, base *tls.Config) *upstream {
	u := &upstream{spec: spec, name: name, dialer: dialer, timeout: timeout, addr: spec.Addr}
	if spec.Scheme == SchemeTLS || spec.Scheme == SchemeHTTPS {
		var c *tls.Config
		if base != nil {
			c = base.Clone()
		} else {
			c = &tls.Config{}
		}
		// A literal IP as ServerName makes crypto/tls check the IP SANs and
		// leave SNI out, as RFC 6066 wants.
		c.ServerName = spec.Host
		if c.MinVersion < tls.VersionTLS12 {
			c.MinVersion = tls.VersionTLS12
		}
		if c.ClientSessionCache == nil {
			c.ClientSessionCache = tls.NewLRUClientSessionCache(8)
		}
		c.NextProtos = nil
		if spec.Scheme == SchemeHTTPS {
			c.NextProtos = []string{"h2", "http/1.1"}
		}
		u.tls = c
	}
	if spec.Scheme == SchemeHTTPS {
		tr := &http.Transport{
			DialContext: func(context.Context, string, string) (net.Conn, error) {
				return nil, errors.New("plain http is not used for DNS-over-HTTPS")
			},
			DialTLSContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return u.dialStream(ctx)
			},
			ForceAttemptHTTP2:   true, // a custom DialTLSContext turns HTTP/2 off unless forced; ALPN then picks h2 or http/1.1
			MaxIdleConnsPerHost: 4,
			IdleConnTimeout:     60 * time.Second,
		}
		u.http = &http.Client{Transport: tr}
	}
	return u
}

// close drops idle connections.
func (u *upstream) close() {
	u.pool.closeAll()
	if u.http != nil {
		u.http.CloseIdleConnections()
	}
}

// address returns the upstream's IP address, resolving its hostname through
// the bootstrap servers on first use.
func (u *upstream) address(ctx context.Context) (netip.AddrPort, error) {
	if u.spec.Addr.IsValid() {
		return u.spec.Addr, nil
	}
	u.addrMu.Lock()
	defer u.addrMu.Unlock()
	if u.addr.IsValid() {
		return u.addr, nil
	}
	a, err := u.resolve(ctx, u.spec.Host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bootstrap %s: %w", u.spec.Host, err)
	}
	u.addr = netip.AddrPortFrom(a, u.spec.Port)
	return u.addr, nil
}

func (u *upstream) target(addr netip.AddrPort) outbound.Target {
	t := outbound.Target{Addr: addr}
	if !u.spec.Addr.IsValid() {
		t.Domain = u.spec.Host
	}
	return t
}

// exchange sends m (which has a fresh ID and one question) to the upstream
// and returns the matching response. One attempt is bounded by the timeout;
// a truncated UDP answer is asked again over TCP, as a second attempt.
// Resolving a hostname upstream (bootstrap, first use only) has timeouts of
// its own.
func (u *upstream) exchange(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
	u.queries.Add(1)
	start := time.Now()
	resp, err := u.exchangeOnce(ctx, m)
	if err != nil {
		u.errors.Add(1)
		return nil, fmt.Errorf("upstream %s: %w", u.name, err)
	}
	u.latencyNs.Add(uint64(time.Since(start)))
	u.latencyN.Add(1)
	return resp, nil
}

func (u *upstream) exchangeOnce(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
	addr, err := u.address(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := u.attempt(ctx, u.spec.Scheme, addr, m)
	if err == nil && resp.Truncated && u.spec.Scheme == SchemeUDP {
		resp, err = u.attempt(ctx, SchemeTCP, addr, m)
		if err != nil {
			err = fmt.Errorf("truncated over udp, then over tcp: %w", err)
		}
	}
	return resp, err
}

func (u *upstream) attempt(ctx context.Context, scheme string, addr netip.AddrPort, m *dns.Msg) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	var resp *dns.Msg
	var err error
	if scheme == SchemeUDP && !carriesUDP(u.dialer) {
		scheme = SchemeTCP // the outbound carries TCP only (New said so)
	}
	switch scheme {
	case SchemeUDP:
		resp, err = exchangeUDP(ctx, u.dialer, u.target(addr), m)
	case SchemeTCP, SchemeTLS:
		resp, err = u.exchangeStream(ctx, m)
	case SchemeHTTPS:
		resp, err = u.exchangeHTTPS(ctx, m)
	}
	return resp, timeoutError(ctx, err, u.timeout)
}

// timeoutError says "no answer within T" instead of a bare deadline error.
func timeoutError(ctx context.Context, err error, timeout time.Duration) error {
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("no answer within %v: %w", timeout, err)
	}
	return err
}

// exchangeUDP sends m from a fresh UDP session (so a fresh source port) and
// waits for a reply from dst that carries m's ID and question; anything else
// arriving on the session is ignored. ctx bounds the wait; an ICMP error
// from dst that the outbound reports (port unreachable: the upstream
// refused) ends it at once.
func exchangeUDP(ctx context.Context, d outbound.Dialer, dst outbound.Target, m *dns.Msg) (*dns.Msg, error) {
	packed, err := m.Pack()
	if err != nil {
		return nil, fmt.Errorf("pack query: %w", err)
	}
	pc, err := d.ListenUDP(ctx, dst)
	if err != nil {
		return nil, err
	}
	defer pc.Close()
	stop := context.AfterFunc(ctx, func() { pc.Close() })
	defer stop()
	if err := pc.WritePacket(packed, dst); err != nil {
		return nil, fmt.Errorf("send: %w", err)
	}
	bp := udpBufPool.Get().(*[]byte)
	defer udpBufPool.Put(bp)
	buf := *bp
	for {
		n, from, err := pc.ReadPacket(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			var unreachable *outbound.UnreachableError
			if errors.As(err, &unreachable) && netip.AddrPortFrom(unreachable.From.Addr().Unmap(), unreachable.From.Port()) != dst.Addr {
				continue // about some other datagram: not ours to fail on
			}
			// An ICMP error from dst (port unreachable: the upstream
			// refused) fails the attempt at once, not at the timeout.
			return nil, fmt.Errorf("receive: %w", err)
		}
		if from.Addr().Unmap() != dst.Addr.Addr() || from.Port() != dst.Addr.Port() {
			continue
		}
		resp := new(dns.Msg)
		if resp.Unpack(buf[:n]) != nil || !isResponseTo(resp, m) {
			continue // spoofed, stale or garbled: keep waiting for ours
		}
		return resp, nil
	}
}

// carriesUDP reports whether d can open UDP sessions: false for outbounds
// that say they carry TCP only (outbound.UDPCarrier).
func carriesUDP(d outbound.Dialer) bool {
	c, ok := d.(outbound.UDPCarrier)
	return !ok || c.CarriesUDP()
}

var udpBufPool = sync.Pool{New: func() any { b := make([]byte, dns.MaxMsgSize); return &b }}

// isResponseTo reports whether resp answers q: the ID, the QR bit and the
// question (name case-insensitively) match.
func isResponseTo(resp, q *dns.Msg) bool {
	if resp.Id != q.Id || !resp.Response || len(resp.Question) != 1 {
		// Some servers send FORMERR/NOTIMP/REFUSED without the question.
		return resp.Id == q.Id && resp.Response && len(resp.Question) == 0 && resp.Rcode != dns.RcodeSuccess
	}
	a, b := resp.Question[0], q.Question[0]
	return a.Qtype == b.Qtype && a.Qclass == b.Qclass && strings.EqualFold(a.Name, b.Name)
}

// dialStream opens a TCP connection to the upstream through the dialer and,
// for tls and https, completes the TLS handshake.
func (u *upstream) dialStream(ctx context.Context) (net.Conn, error) {
	addr, err := u.address(ctx)
	if err != nil {
		return nil, err
	}
	c, err := u.dialer.DialTCP(ctx, u.target(addr))
	if err != nil {
		return nil, err
	}
	if u.tls == nil {
		return c, nil
	}
	tc := tls.Client(c, u.tls)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		var cv *tls.CertificateVerificationError
		if errors.As(err, &cv) {
			return nil, fmt.Errorf("tls: server certificate rejected for %q: %w", u.spec.Host, err)
		}
		return nil, fmt.Errorf("tls handshake: %w", err)
	}
	return tc, nil
}

// exchangeStream sends m over a pooled or new TCP (or TLS) connection with
// RFC 1035 length framing. A failure on a reused connection (the server may
// have closed it while idle) is retried once on a fresh one.
func (u *upstream) exchangeStream(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
	packed, err := m.Pack()
	if err != nil {
		return nil, fmt.Errorf("pack query: %w", err)
	}
	for {
		c, reused := u.pool.get()
		if c == nil {
			if c, err = u.dialStream(ctx); err != nil {
				return nil, err
			}
		}
		resp, err := streamRoundTrip(ctx, c, packed, m)
		if err != nil {
			c.Close()
			if reused && ctx.Err() == nil {
				continue
			}
			return nil, err
		}
		u.pool.put(c)
		return resp, nil
	}
}

func streamRoundTrip(ctx context.Context, c net.Conn, packed []byte, m *dns.Msg) (*dns.Msg, error) {
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	msg := make([]byte, 2+len(packed))
	binary.BigEndian.PutUint16(msg, uint16(len(packed)))
	copy(msg[2:], packed)
	if _, err := c.Write(msg); err != nil {
		return nil, fmt.Errorf("send: %w", err)
	}
	for {
		b, err := readFramed(c)
		if err != nil {
			return nil, fmt.Errorf("receive: %w", err)
		}
		resp := new(dns.Msg)
		if err := resp.Unpack(b); err != nil {
			return nil, fmt.Errorf("bad response: %w", err)
		}
		if resp.Id != m.Id {
			continue // a late answer to an earlier, abandoned query
		}
		if !isResponseTo(resp, m) {
			return nil, errors.New("response does not match the query")
		}
		if !stop() {
			return nil, ctx.Err()
		}
		c.SetDeadline(time.Time{})
		return resp, nil
	}
}

// readFramed reads one length-prefixed DNS message.
func readFramed(r io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	b := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}

// url is the DoH request URL, without the port when it is 443.
func (u *upstream) url() string {
	host := u.spec.Host
	if u.spec.Port != 443 || strings.Contains(host, ":") {
		host = net.JoinHostPort(host, strconv.Itoa(int(u.spec.Port)))
		if u.spec.Port == 443 {
			host = "[" + u.spec.Host + "]"
		}
	}
	return (&url.URL{Scheme: "https", Host: host, Path: u.spec.Path}).String()
}

// exchangeHTTPS posts m as application/dns-message (RFC 8484, ID 0).
func (u *upstream) exchangeHTTPS(ctx context.Context, m *dns.Msg) (*dns.Msg, error) {
	id := m.Id
	wire := *m // shallow copy: only the ID differs
	wire.Id = 0
	packed, err := wire.Pack()
	if err != nil {
		return nil, fmt.Errorf("pack query: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u.url(), bytes.NewReader(packed))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/dns-message")
	req.Header.Set("Accept", "application/dns-message")
	hr, err := u.http.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL is in our own error already
		}
		return nil, err
	}
	defer hr.Body.Close()
	if hr.StatusCode != http.StatusOK {
		io.Copy(io.Discard, io.LimitReader(hr.Body, 4096))
		return nil, fmt.Errorf("http status %s", hr.Status)
	}
	if ct := hr.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/dns-message") {
		return nil, fmt.Errorf("http content-type %q, want application/dns-message", ct)
	}
	b, err := io.ReadAll(io.LimitReader(hr.Body, dns.MaxMsgSize+1))
	if err != nil {
		return nil, fmt.Errorf("receive: %w", err)
	}
	if len(b) > dns.MaxMsgSize {
		return nil, errors.New("response larger than 64 KiB")
	}
	resp := new(dns.Msg)
	if err := resp.Unpack(b); err != nil {
		return nil, fmt.Errorf("bad response: %w", err)
	}
	resp.Id = id
	if !isResponseTo(resp, m) {
		return nil, errors.New("response does not match the query")
	}
	return resp, nil
}

// streamPool keeps a few idle TCP/TLS connections to one upstream so that
// sequential queries skip the handshakes (RFC 7766, RFC 7858 §3.4).
type streamPool struct {
	mu     sync.Mutex
	idle   []idleConn
	closed bool
}

type idleConn struct {
	c     net.Conn
	since time.Time
}

const (
	maxIdleStreams  = 4
	maxStreamIdling = 10 * time.Second
)

// get returns an idle connection (reused=true) or nil.
func (p *streamPool) get() (c net.Conn, reused bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.idle) > 0 {
		ic := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		if time.Since(ic.since) < maxStreamIdling {
			return ic.c, true
		}
		ic.c.Close()
	}
	return nil, false
}

func (p *streamPool) put(c net.Conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || len(p.idle) >= maxIdleStreams {
		c.Close()
		return
	}
	p.idle = append(p.idle, idleConn{c, time.Now()})
}

func (p *streamPool) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, ic := range p.idle {
		ic.c.Close()
	}
	p.idle = nil
}
