package dnsproxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func TestParseUpstream(t *testing.T) {
	tests := []struct {
		in      string
		want    string // canonical, "" for an error
		wantErr string
	}{
		{in: "udp://1.2.3.4", want: "udp://1.2.3.4:53"},
		{in: "udp://1.2.3.4:5353", want: "udp://1.2.3.4:5353"},
		{in: "tcp://[2001:db8::1]", want: "tcp://[2001:db8::1]:53"},
		{in: "tls://dns.example", want: "tls://dns.example:853"},
		{in: "TLS://Dns.Example.:8853", want: "tls://dns.example:8853"},
		{in: "https://dns.example", want: "https://dns.example:443/dns-query"},
		{in: "https://1.1.1.1/custom/path", want: "https://1.1.1.1:443/custom/path"},
		{in: "https://[::1]:8443/", want: "https://[::1]:8443/dns-query"},
		{in: "1.2.3.4", wantErr: "missing scheme"},
		{in: "quic://1.2.3.4", wantErr: "unknown scheme"},
		{in: "udp://", wantErr: "missing host"},
		{in: "udp://1.2.3.4:0", wantErr: "bad port"},
		{in: "udp://1.2.3.4:99999", wantErr: "bad port"},
		{in: "udp://1.2.3.4/path", wantErr: "only allowed for https"},
		{in: "https://user@dns.example", wantErr: "want scheme://host"},
		{in: "tls://bad_host!", wantErr: "bad host"},
	}
	for _, tt := range tests {
		u, err := ParseUpstream(tt.in)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseUpstream(%q) = %v, %v; want error containing %q", tt.in, u, err, tt.wantErr)
			}
			continue
		}
		if err != nil || u.String() != tt.want {
			t.Errorf("ParseUpstream(%q) = %q, %v; want %q", tt.in, u, err, tt.want)
		}
	}
	u, _ := ParseUpstream("tls://9.9.9.9")
	if u.Addr != netip.MustParseAddrPort("9.9.9.9:853") {
		t.Errorf("ParseUpstream(tls://9.9.9.9).Addr = %v", u.Addr)
	}
	u, _ = ParseUpstream("tls://dns.example")
	if u.Addr.IsValid() {
		t.Errorf("ParseUpstream(tls://dns.example).Addr = %v, want invalid", u.Addr)
	}
}

// TestUpstreamTransports resolves through each kind of upstream; DoT and DoH
// verify the server against a test CA, by IP SAN or by name (the name
// resolved through a bootstrap server).
func TestUpstreamTransports(t *testing.T) {
	ca := newTestCA(t, "test CA")
	cert := ca.issue(t, []string{"dns.test"}, net.IPv4(127, 0, 0, 1))
	tests := []struct {
		name      string
		upstream  func(s *testServer) string
		bootstrap bool
		net       string // where the server saw the query
		h2        int    // HTTP major version DoH must use; 0 = not DoH
	}{
		{name: "udp", upstream: func(s *testServer) string { return "udp://" + s.udpAddr.String() }, net: "udp"},
		{name: "tcp", upstream: func(s *testServer) string { return "tcp://" + s.udpAddr.String() }, net: "tcp"},
		{name: "tls by IP", upstream: func(s *testServer) string { return "tls://" + s.startDoT(cert).String() }, net: "tcp"},
		{name: "tls by name", upstream: func(s *testServer) string {
			return fmt.Sprintf("tls://dns.test:%d", s.startDoT(cert).Port())
		}, bootstrap: true, net: "tcp"},
		{name: "https http/2", upstream: func(s *testServer) string {
			return fmt.Sprintf("https://dns.test:%d/dns-query", s.startDoH(cert, true).Port())
		}, bootstrap: true, net: "doh", h2: 2},
		{name: "https http/1.1", upstream: func(s *testServer) string { return "https://" + s.startDoH(cert, false).String() }, net: "doh", h2: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			cfg := Config{Upstreams: []string{tt.upstream(s)}}
			cfg.TLSConfig = tlsClientConfig(ca)
			if tt.bootstrap {
				cfg.Bootstrap = []netip.AddrPort{s.udpAddr}
			}
			p := newProxy(t, cfg)
			r := exchange(t, p, "example.test.", dns.TypeA)
			if got := addrsOf(r.Answer); len(got) != 1 || got[0] != netip.MustParseAddr("192.0.2.1") {
				t.Fatalf("answer %v, want 192.0.2.1", r.Answer)
			}
			if r.Rcode != dns.RcodeSuccess {
				t.Fatalf("rcode %s", dns.RcodeToString[r.Rcode])
			}
			if got := s.network(tt.net); got != 1 {
				t.Errorf("server saw %d queries over %s, want 1", got, tt.net)
			}
			// A second, uncached name reuses the connection (pool or HTTP
			// keep-alive) and still works; the hostname was resolved once.
			exchange(t, p, "a.test.", dns.TypeA)
			if tt.bootstrap {
				if got := s.count("dns.test. a"); got != 1 {
					t.Errorf("bootstrap asked %d times for the upstream's name, want 1", got)
				}
			}
			if tt.h2 != 0 {
				s.mu.Lock()
				protos := append([]int(nil), s.protos...)
				s.mu.Unlock()
				for _, pr := range protos {
					if pr != tt.h2 {
						t.Errorf("DoH used HTTP/%d, want HTTP/%d", pr, tt.h2)
					}
				}
			}
			st := p.Stats()
			if st.Upstreams[0].Queries != 2 || st.Upstreams[0].Errors != 0 || st.Upstreams[0].LatencyCount != 2 {
				t.Errorf("upstream stats %+v, want 2 queries, 0 errors, 2 latencies", st.Upstreams[0])
			}
		})
	}
}

func tlsClientConfig(ca *testCA) *tls.Config {
	return &tls.Config{RootCAs: ca.pool}
}

// TestUpstreamWrongCertificate: a certificate from another CA, or for
// another name, fails with an error that says so.
func TestUpstreamWrongCertificate(t *testing.T) {
	ca := newTestCA(t, "trusted CA")
	other := newTestCA(t, "other CA")
	tests := []struct {
		name      string
		up        func(s *testServer) string
		bootstrap bool
	}{
		{"tls name mismatch", func(s *testServer) string {
			return fmt.Sprintf("tls://dns.test:%d", s.startDoT(ca.issue(t, []string{"elsewhere.test"})).Port())
		}, true},
		{"tls other CA", func(s *testServer) string {
			return "tls://" + s.startDoT(other.issue(t, []string{"dns.test"}, net.IPv4(127, 0, 0, 1))).String()
		}, false},
		{"tls no IP SAN", func(s *testServer) string {
			return "tls://" + s.startDoT(ca.issue(t, []string{"elsewhere.test"})).String()
		}, false},
		{"https other CA", func(s *testServer) string {
			return "https://" + s.startDoH(other.issue(t, nil, net.IPv4(127, 0, 0, 1)), true).String()
		}, false},
		{"https wrong IP", func(s *testServer) string {
			return "https://" + s.startDoH(ca.issue(t, nil, net.IPv4(127, 0, 0, 2)), true).String()
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t)
			up := tt.up(s)
			cfg := Config{Upstreams: []string{up}, TLSConfig: tlsClientConfig(ca)}
			if tt.bootstrap {
				cfg.Bootstrap = []netip.AddrPort{s.udpAddr}
			}
			p := newProxy(t, cfg)
			_, err := p.Exchange(context.Background(), query("example.test.", dns.TypeA))
			if err == nil {
				t.Fatal("Exchange succeeded with a bad certificate")
			}
			msg := err.Error()
			t.Logf("error: %s", msg)
			if !strings.Contains(msg, "certificate") || !strings.Contains(msg, up) {
				t.Fatalf("error %q does not name the upstream and the certificate problem", msg)
			}
			if got := s.network("tcp") + s.network("doh"); got != 0 {
				t.Fatalf("server answered %d queries over a rejected connection", got)
			}
			if st := p.Stats(); st.UpstreamErrors != 1 {
				t.Errorf("UpstreamErrors = %d, want 1", st.UpstreamErrors)
			}
		})
	}
}

// TestUpstreamFailover: a dead first upstream costs one attempt, the second
// answers, and later queries start with the one that answered.
func TestUpstreamFailover(t *testing.T) {
	for _, dead := range []string{"tcp", "udp"} {
		t.Run("dead "+dead, func(t *testing.T) {
			s := newTestServer(t)
			deadAddr := closedPort(t, dead)
			p := newProxy(t, Config{
				Upstreams: []string{dead + "://" + deadAddr, "udp://" + s.udpAddr.String()},
				Timeout:   300 * time.Millisecond,
			})
			r := exchange(t, p, "example.test.", dns.TypeA)
			if len(r.Answer) != 1 {
				t.Fatalf("answer %v", r.Answer)
			}
			exchange(t, p, "a.test.", dns.TypeA)
			st := p.Stats()
			if st.Upstreams[0].Errors != 1 || st.Upstreams[0].Queries != 1 {
				t.Errorf("dead upstream stats %+v, want exactly one failed attempt", st.Upstreams[0])
			}
			if st.Upstreams[1].Queries != 2 {
				t.Errorf("live upstream stats %+v, want 2 queries", st.Upstreams[1])
			}
		})
	}
}

// closedPort returns a loopback address where nothing listens.
func closedPort(t *testing.T, network string) string {
	t.Helper()
	if network == "udp" {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer pc.Close()
		return pc.LocalAddr().String()
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func TestUpstreamAllFail(t *testing.T) {
	p := newProxy(t, Config{
		Upstreams: []string{"tcp://" + closedPort(t, "tcp"), "udp://" + closedPort(t, "udp")},
		Timeout:   200 * time.Millisecond,
	})
	_, err := p.Exchange(context.Background(), query("example.test.", dns.TypeA))
	if err == nil {
		t.Fatal("Exchange succeeded with dead upstreams")
	}
	if !strings.Contains(err.Error(), "every upstream failed") || !strings.Contains(err.Error(), "no answer within 200ms") {
		t.Errorf("error %q", err)
	}
	if st := p.Stats(); st.UpstreamErrors != 2 {
		t.Errorf("UpstreamErrors = %d, want 2", st.UpstreamErrors)
	}
}

// TestUpstreamTruncatedRetriesTCP: a UDP answer with TC is asked again over
// TCP at the same server.
func TestUpstreamTruncatedRetriesTCP(t *testing.T) {
	s := newTestServer(t)
	p := newProxy(t, Config{Upstreams: []string{"udp://" + s.udpAddr.String()}})
	r := exchange(t, p, "big.test.", dns.TypeA)
	if r.Truncated || len(r.Answer) != 1 {
		t.Fatalf("answer TC=%v %v, want the full answer", r.Truncated, r.Answer)
	}
	if s.network("udp") != 1 || s.network("tcp") != 1 {
		t.Errorf("server saw udp=%d tcp=%d, want 1 and 1", s.network("udp"), s.network("tcp"))
	}
}

// TestUpstreamUDPIgnoresStrayReplies: a reply with another ID (spoofed or
// late) is skipped and the real one is taken.
func TestUpstreamUDPIgnoresStrayReplies(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := new(dns.Msg)
			if q.Unpack(buf[:n]) != nil {
				continue
			}
			r := new(dns.Msg).SetReply(q)
			r.Answer = mustRRs("example.test. 300 IN A 192.0.2.66")
			r.Id = q.Id + 1 // stray
			b, _ := r.Pack()
			pc.WriteTo(b, from)
			wrong := r.Copy()
			wrong.Id = q.Id
			wrong.Question[0].Name = "other.test." // right ID, wrong question
			b, _ = wrong.Pack()
			pc.WriteTo(b, from)
			r.Id = q.Id
			r.Answer = mustRRs("example.test. 300 IN A 192.0.2.1")
			b, _ = r.Pack()
			pc.WriteTo(b, from)
		}
	}()
	p := newProxy(t, Config{Upstreams: []string{"udp://" + pc.LocalAddr().String()}})
	r := exchange(t, p, "example.test.", dns.TypeA)
	if got := addrsOf(r.Answer); len(got) != 1 || got[0] != netip.MustParseAddr("192.0.2.1") {
		t.Fatalf("answer %v, want the reply that matches", r.Answer)
	}
}

// TestUpstreamServfailTriesNext: SERVFAIL from the first upstream is not
// final while another may answer.
func TestUpstreamServfailTriesNext(t *testing.T) {
	s1, s2 := newTestServer(t), newTestServer(t)
	p := newProxy(t, Config{Upstreams: []string{"udp://" + s1.udpAddr.String(), "udp://" + s2.udpAddr.String()}})
	r := exchange(t, p, "servfail.test.", dns.TypeA)
	if r.Rcode != dns.RcodeServerFailure {
		t.Fatalf("rcode %s, want SERVFAIL once both said so", dns.RcodeToString[r.Rcode])
	}
	if s1.total() != 1 || s2.total() != 1 {
		t.Errorf("queries %d and %d, want 1 and 1", s1.total(), s2.total())
	}
}

func TestNewErrors(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"hostname without bootstrap", Config{Upstreams: []string{"tls://dns.example"}}, "give bootstrap servers"},
		{"bad upstream", Config{Upstreams: []string{"ftp://1.2.3.4"}}, "unknown scheme"},
		{"bad mode", Config{Mode: "magic", Upstreams: []string{"udp://1.2.3.4"}}, `mode "magic"`},
		{"fake without ranges", Config{Mode: ModeFakeIP, Upstreams: []string{"udp://1.2.3.4"}}, "needs range4 or range6"},
		{"v6 range4", Config{Mode: ModeFakeIP, Upstreams: []string{"udp://1.2.3.4"}, FakeRange4: netip.MustParsePrefix("fc00::/64")}, "want an IPv4 prefix"},
		{"tiny range", Config{Mode: ModeFakeIP, Upstreams: []string{"udp://1.2.3.4"}, FakeRange4: netip.MustParsePrefix("198.18.0.0/31")}, "too small"},
		{"bad exclude", Config{Mode: ModeFakeIP, Upstreams: []string{"udp://1.2.3.4"}, FakeRange4: netip.MustParsePrefix("198.18.0.0/15"), FakeExclude: []string{"*"}}, ""},
		{"bad exclude 2", Config{Mode: ModeFakeIP, Upstreams: []string{"udp://1.2.3.4"}, FakeRange4: netip.MustParsePrefix("198.18.0.0/15"), FakeExclude: []string{"a.*.b"}}, "fake-ip exclude"},
		{"negative cache", Config{Upstreams: []string{"udp://1.2.3.4"}, CacheSize: -1}, "cache size"},
	}
	for _, tt := range tests {
		p, err := New(tt.cfg, &loopbackDialer{}, nil)
		if tt.want == "" {
			if err != nil {
				t.Errorf("%s: New: %v", tt.name, err)
			} else {
				p.Close()
			}
			continue
		}
		if err == nil {
			p.Close()
			t.Errorf("%s: New succeeded, want error containing %q", tt.name, tt.want)
			continue
		}
		if !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: New: %v, want error containing %q", tt.name, err, tt.want)
		}
	}
	if _, err := New(Config{Upstreams: []string{"udp://1.2.3.4"}}, nil, nil); err == nil {
		t.Error("New with a nil dialer succeeded")
	}
}

func TestSystemUpstreams(t *testing.T) {
	path := t.TempDir() + "/resolv.conf"
	writeFile(t, path, "# comment\nnameserver 10.0.0.1\nnameserver fe80::1%eth0\nnameserver 2001:db8::53\nsearch lan\n")
	got, err := SystemUpstreams(path)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"udp://10.0.0.1:53", "udp://[fe80::1]:53", "udp://[2001:db8::53]:53"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("SystemUpstreams = %v, want %v", got, want)
	}
	writeFile(t, path, "search lan\n")
	if _, err := SystemUpstreams(path); err == nil {
		t.Error("SystemUpstreams without nameservers succeeded")
	}
}
