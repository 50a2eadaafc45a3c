package dnsproxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/outbound"
)

// loopbackDialer implements outbound.Dialer with plain sockets; it counts
// what it was asked for.
type loopbackDialer struct {
	tcpDials, udpSessions atomic.Int64
}

var _ outbound.Dialer = (*loopbackDialer)(nil)

func (d *loopbackDialer) Name() string { return "loopback" }

func (d *loopbackDialer) DialTCP(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	d.tcpDials.Add(1)
	var nd net.Dialer
	c, err := nd.DialContext(ctx, "tcp", dst.Addr.String())
	if err != nil {
		return nil, err
	}
	return loopTCP{c.(*net.TCPConn)}, nil
}

func (d *loopbackDialer) ListenUDP(_ context.Context, first outbound.Target) (outbound.PacketConn, error) {
	d.udpSessions.Add(1)
	local := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}
	if first.Addr.Addr().Is6() {
		local = &net.UDPAddr{IP: net.IPv6loopback}
	}
	c, err := net.ListenUDP("udp", local)
	if err != nil {
		return nil, err
	}
	return loopUDP{c}, nil
}

type loopTCP struct{ *net.TCPConn }

func (c loopTCP) Abort() error {
	_ = c.SetLinger(0)
	return c.Close()
}

type loopUDP struct{ c *net.UDPConn }

func (u loopUDP) ReadPacket(b []byte) (int, netip.AddrPort, error) {
	n, from, err := u.c.ReadFromUDPAddrPort(b)
	return n, netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), err
}

func (u loopUDP) WritePacket(b []byte, dst outbound.Target) error {
	_, err := u.c.WriteToUDPAddrPort(b, dst.Addr)
	return err
}

func (u loopUDP) Close() error { return u.c.Close() }

// testZone is the data every test upstream serves.
var testZone = map[string][]string{
	"example.test. A":    {"example.test. 300 IN A 192.0.2.1"},
	"example.test. AAAA": {"example.test. 300 IN AAAA 2001:db8::1"},
	"short.test. A":      {"short.test. 5 IN A 192.0.2.5"},
	"a.test. A":          {"a.test. 300 IN A 192.0.2.10"},
	"b.test. A":          {"b.test. 300 IN A 192.0.2.11"},
	"c.test. A":          {"c.test. 300 IN A 192.0.2.12"},
	"host.lan. A":        {"host.lan. 300 IN A 192.168.1.7"},
	"www.test. A":        {"www.test. 300 IN CNAME edge.cdn.test.", "edge.cdn.test. 60 IN A 192.0.2.80"},
	"example.test. MX":   {"example.test. 300 IN MX 10 mail.example.test."},
	"svc.test. HTTPS":    {`svc.test. 300 IN HTTPS 1 . alpn="h2" ipv4hint="192.0.2.9" ipv6hint="2001:db8::9"`},
	"svc.lan. HTTPS":     {`svc.lan. 300 IN HTTPS 1 . alpn="h2" ipv4hint="192.168.1.9"`},
	"v6only.test. AAAA":  {"v6only.test. 300 IN AAAA 2001:db8::6"},
	"v6only.test. A":     {},
	"dns.test. A":        {"dns.test. 300 IN A 127.0.0.1"},
}

// testServer is an upstream DNS server on loopback: UDP and TCP on the same
// port, optionally DoT and DoH. It counts the queries it receives by
// question and by transport.
type testServer struct {
	t       testing.TB
	udpAddr netip.AddrPort // UDP and TCP
	delay   atomic.Int64   // nanoseconds to wait before answering
	mu      sync.Mutex
	counts  map[string]int // "name. TYPE" → queries
	byNet   map[string]int // "udp", "tcp", "doh"
	protos  []int          // HTTP major versions seen by DoH
	ids     []uint16
}

func newTestServer(t testing.TB) *testServer {
	s := &testServer{t: t, counts: map[string]int{}, byNet: map[string]int{}}
	// UDP and TCP on one port, for the TC → TCP retry.
	for i := 0; ; i++ {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("ListenPacket: %v", err)
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err != nil {
			pc.Close()
			if i < 10 {
				continue
			}
			t.Fatalf("Listen tcp on the UDP port: %v", err)
		}
		s.udpAddr = netip.MustParseAddrPort(pc.LocalAddr().String())
		s.serve(&dns.Server{PacketConn: pc, Handler: s})
		s.serve(&dns.Server{Listener: ln, Handler: s})
		return s
	}
}

func (s *testServer) serve(srv *dns.Server) {
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	s.t.Cleanup(func() { srv.Shutdown() })
}

// startDoT serves DNS over TLS with cert and returns its address.
func (s *testServer) startDoT(cert tls.Certificate) netip.AddrPort {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		s.t.Fatalf("tls.Listen: %v", err)
	}
	s.serve(&dns.Server{Listener: ln, Handler: s})
	return netip.MustParseAddrPort(ln.Addr().String())
}

// startDoH serves DNS over HTTPS with cert (HTTP/2 when h2 is true) and
// returns its address.
func (s *testServer) startDoH(cert tls.Certificate, h2 bool) netip.AddrPort {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		q := new(dns.Msg)
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/dns-message" || q.Unpack(body) != nil {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		s.protos = append(s.protos, r.ProtoMajor)
		s.mu.Unlock()
		resp := s.answer(q, "doh")
		b, _ := resp.Pack()
		w.Header().Set("Content-Type", "application/dns-message")
		w.Write(b)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.EnableHTTP2 = h2
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // rejected handshakes are expected
	srv.StartTLS()
	s.t.Cleanup(srv.Close)
	return netip.MustParseAddrPort(strings.TrimPrefix(srv.URL, "https://"))
}

func (s *testServer) ServeDNS(w dns.ResponseWriter, q *dns.Msg) {
	network := "udp"
	if _, ok := w.LocalAddr().(*net.TCPAddr); ok {
		network = "tcp"
	}
	resp := s.answer(q, network)
	if network == "udp" && resp.Len() > 512 && q.IsEdns0() == nil {
		resp.Truncate(512)
	}
	w.WriteMsg(resp)
}

func (s *testServer) answer(q *dns.Msg, network string) *dns.Msg {
	if d := time.Duration(s.delay.Load()); d > 0 {
		time.Sleep(d)
	}
	resp := new(dns.Msg).SetReply(q)
	resp.RecursionAvailable = true
	if len(q.Question) != 1 {
		resp.Rcode = dns.RcodeFormatError
		return resp
	}
	key := q.Question[0].Name + " " + dns.TypeToString[q.Question[0].Qtype]
	s.mu.Lock()
	s.counts[strings.ToLower(key)]++
	s.byNet[network]++
	s.ids = append(s.ids, q.Id)
	s.mu.Unlock()
	if opt := q.IsEdns0(); opt != nil {
		resp.SetEdns0(1232, opt.Do())
	}
	name := strings.ToLower(q.Question[0].Name)
	switch {
	case name == "big.test.":
		if network == "udp" {
			resp.Truncated = true
			return resp
		}
		resp.Answer = mustRRs("big.test. 300 IN A 192.0.2.99")
		return resp
	case name == "servfail.test.":
		resp.Rcode = dns.RcodeServerFailure
		return resp
	case name == "many.test." && q.Question[0].Qtype == dns.TypeTXT:
		for i := 0; i < 40; i++ {
			resp.Answer = append(resp.Answer, mustRRs(`many.test. 300 IN TXT "a fairly long text record to fill the answer up"`)...)
		}
		return resp
	}
	data, ok := testZone[strings.ToLower(q.Question[0].Name)+" "+dns.TypeToString[q.Question[0].Qtype]]
	if !ok {
		// NXDOMAIN with a SOA: negative TTL min(60, 30) = 30s.
		resp.Rcode = dns.RcodeNameError
		resp.Ns = mustRRs("test. 60 IN SOA ns.test. admin.test. 1 7200 3600 1209600 30")
		return resp
	}
	resp.Answer = mustRRs(data...)
	if len(data) == 0 {
		resp.Ns = mustRRs("test. 60 IN SOA ns.test. admin.test. 1 7200 3600 1209600 30")
	}
	// A real server adds glue-like extras; fake-ip must strip them.
	if q.Question[0].Qtype == dns.TypeHTTPS {
		resp.Extra = append(resp.Extra, mustRRs(q.Question[0].Name+" 300 IN A 192.0.2.9")...)
	}
	return resp
}

func (s *testServer) count(nameType string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.counts[nameType]
}

func (s *testServer) total() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.counts {
		n += c
	}
	return n
}

func (s *testServer) network(n string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.byNet[n]
}

// mustRRs parses fixed test records (in server goroutines, where t is off
// limits).
func mustRRs(lines ...string) []dns.RR {
	var out []dns.RR
	for _, l := range lines {
		out = append(out, mustRR(l))
	}
	return out
}

func mustRR(l string) dns.RR {
	rr, err := dns.NewRR(l)
	if err != nil {
		panic(fmt.Sprintf("NewRR(%q): %v", l, err))
	}
	return rr
}

func rrs(t testing.TB, lines ...string) []dns.RR {
	t.Helper()
	var out []dns.RR
	for _, l := range lines {
		rr, err := dns.NewRR(l)
		if err != nil {
			t.Fatalf("NewRR(%q): %v", l, err)
		}
		out = append(out, rr)
	}
	return out
}

// testCA is a throwaway certificate authority.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t *testing.T, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue returns a server certificate for the names and IPs.
func (ca *testCA) issue(t *testing.T, names []string, ips ...net.IP) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "server"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     names,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// recordHandler is a slog.Handler that keeps every record.
type recordHandler struct {
	mu      sync.Mutex
	records []slog.Record
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = append(h.records, r)
	return nil
}
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

func (h *recordHandler) all() []slog.Record {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]slog.Record(nil), h.records...)
}

// fakeClock is a settable clock for the cache.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// newProxy returns a proxy closed at the end of the test.
func newProxy(t *testing.T, cfg Config) *Proxy {
	t.Helper()
	p, err := New(cfg, &loopbackDialer{}, nil)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// withClock makes p's cache use a fake clock.
func withClock(p *Proxy) *fakeClock {
	c := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	p.now = c.Now
	return c
}

func query(name string, qtype uint16) *dns.Msg {
	return new(dns.Msg).SetQuestion(name, qtype)
}

// exchange runs p.Exchange and fails the test on error.
func exchange(t *testing.T, p *Proxy, name string, qtype uint16) *dns.Msg {
	t.Helper()
	q := query(name, qtype)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := p.Exchange(ctx, q)
	if err != nil {
		t.Fatalf("Exchange(%s %s): %v", name, dns.TypeToString[qtype], err)
	}
	if r.Id != q.Id {
		t.Fatalf("Exchange(%s %s): answer ID %d, query ID %d", name, dns.TypeToString[qtype], r.Id, q.Id)
	}
	return r
}

// addrsOf returns the A and AAAA addresses in rrs.
func addrsOf(rrs []dns.RR) []netip.Addr {
	var out []netip.Addr
	for _, rr := range rrs {
		if a := rrAddr(rr); a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// waitFor polls cond until it holds or the test's patience ends.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
