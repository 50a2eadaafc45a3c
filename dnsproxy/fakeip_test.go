package dnsproxy

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

var (
	testRange4 = netip.MustParsePrefix("198.18.0.0/15")
	testRange6 = netip.MustParsePrefix("fc00::/18")
)

func fakeProxy(t *testing.T, s *testServer, mutate ...func(*Config)) *Proxy {
	t.Helper()
	cfg := Config{
		Mode:        ModeFakeIP,
		Upstreams:   []string{"udp://" + s.udpAddr.String()},
		FakeRange4:  testRange4,
		FakeRange6:  testRange6,
		FakeTTL:     2 * time.Second,
		FakeExclude: []string{"*.lan", "exact.test"},
	}
	for _, m := range mutate {
		m(&cfg)
	}
	return newProxy(t, cfg)
}

// fakeAddr asks p for name's address of the family and checks the answer's
// shape.
func fakeAddr(t *testing.T, p *Proxy, name string, qtype uint16) netip.Addr {
	t.Helper()
	r := exchange(t, p, name, qtype)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("%s %s: rcode %s answer %v", name, dns.TypeToString[qtype], dns.RcodeToString[r.Rcode], r.Answer)
	}
	if r.Answer[0].Header().Rrtype != qtype || r.Answer[0].Header().Name != name {
		t.Fatalf("%s: answer %v", name, r.Answer[0])
	}
	return rrAddr(r.Answer[0])
}

func TestFakeIPAnswers(t *testing.T) {
	s := newTestServer(t)
	p := fakeProxy(t, s)
	a4 := fakeAddr(t, p, "example.test.", dns.TypeA)
	a6 := fakeAddr(t, p, "example.test.", dns.TypeAAAA)
	if !testRange4.Contains(a4) || a4 == testRange4.Addr() {
		t.Errorf("A %v not a usable address of %v", a4, testRange4)
	}
	if !testRange6.Contains(a6) || a6 == testRange6.Addr() {
		t.Errorf("AAAA %v not a usable address of %v", a6, testRange6)
	}
	if got := fakeAddr(t, p, "Example.TEST.", dns.TypeA); got != a4 {
		t.Errorf("same name got %v then %v", a4, got)
	}
	if other := fakeAddr(t, p, "other.test.", dns.TypeA); other == a4 {
		t.Errorf("two names share %v", a4)
	}
	for _, a := range []netip.Addr{a4, a6, netip.AddrFrom16(a4.As16())} {
		if name, ok := p.Domain(a); !ok || name != "example.test" {
			t.Errorf("Domain(%v) = %q, %v; want example.test", a, name, ok)
		}
		if !p.IsFake(a) {
			t.Errorf("IsFake(%v) = false", a)
		}
	}
	if p.IsFake(netip.MustParseAddr("192.0.2.1")) {
		t.Error("IsFake(192.0.2.1) = true")
	}
	if r := exchange(t, p, "example.test.", dns.TypeA); r.Answer[0].Header().Ttl != 2 {
		t.Errorf("TTL %d, want FakeTTL 2", r.Answer[0].Header().Ttl)
	}
	if s.total() != 0 {
		t.Errorf("fake answers reached the upstream %d times", s.total())
	}
	// Other types are resolved for real.
	r := exchange(t, p, "example.test.", dns.TypeMX)
	if len(r.Answer) != 1 || r.Answer[0].Header().Rrtype != dns.TypeMX {
		t.Errorf("MX answer %v", r.Answer)
	}
	if st := p.Stats(); st.FakeIPMappings != 3 {
		t.Errorf("FakeIPMappings = %d, want 3", st.FakeIPMappings)
	}
}

func TestFakeIPExclude(t *testing.T) {
	s := newTestServer(t)
	p := fakeProxy(t, s)
	r := exchange(t, p, "host.lan.", dns.TypeA)
	if got := addrsOf(r.Answer); len(got) != 1 || got[0] != netip.MustParseAddr("192.168.1.7") {
		t.Fatalf("excluded name answered %v, want the upstream's 192.168.1.7", r.Answer)
	}
	if name, ok := p.Domain(netip.MustParseAddr("192.168.1.7")); !ok || name != "host.lan" {
		t.Errorf("Domain(192.168.1.7) = %q, %v; want host.lan from the real answer", name, ok)
	}
	// "exact.test" is excluded, "sub.exact.test" is not; "lan" itself is not
	// below "*.lan".
	r = exchange(t, p, "exact.test.", dns.TypeA)
	if r.Rcode != dns.RcodeNameError {
		t.Errorf("exact.test: rcode %s, want the upstream's NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
	for _, name := range []string{"sub.exact.test.", "lan."} {
		if a := fakeAddr(t, p, name, dns.TypeA); !p.IsFake(a) {
			t.Errorf("%s got %v, want a fake address", name, a)
		}
	}
}

func TestNameMatcher(t *testing.T) {
	m := newNameMatcher([]string{"*.lan", "Exact.Test.", "*.a.b"})
	for name, want := range map[string]bool{
		"x.lan": true, "x.y.lan": true, "lan": false, "xlan": false,
		"exact.test": true, "sub.exact.test": false,
		"c.a.b": true, "a.b": false, "": false,
	} {
		if got := m.match(name); got != want {
			t.Errorf("match(%q) = %v, want %v", name, got, want)
		}
	}
	if !newNameMatcher([]string{"*"}).match("anything") {
		t.Error(`"*" does not match everything`)
	}
}

func TestFakeIPHTTPSHintsStripped(t *testing.T) {
	s := newTestServer(t)
	p := fakeProxy(t, s)
	r := exchange(t, p, "svc.test.", dns.TypeHTTPS)
	if len(r.Answer) != 1 {
		t.Fatalf("answer %v", r.Answer)
	}
	h := r.Answer[0].(*dns.HTTPS)
	text := h.String()
	if strings.Contains(text, "ipv4hint") || strings.Contains(text, "ipv6hint") {
		t.Errorf("hints left in %s", text)
	}
	if !strings.Contains(text, `alpn="h2"`) {
		t.Errorf("other SvcParams lost: %s", text)
	}
	for _, rr := range r.Extra {
		if rr.Header().Rrtype == dns.TypeA || rr.Header().Rrtype == dns.TypeAAAA {
			t.Errorf("real address left in the additional section: %v", rr)
		}
	}
	// Cached copies are stripped as well, excluded names keep their hints.
	if r := exchange(t, p, "svc.test.", dns.TypeHTTPS); strings.Contains(r.Answer[0].String(), "hint") {
		t.Errorf("cached answer has hints: %v", r.Answer[0])
	}
	if r := exchange(t, p, "svc.lan.", dns.TypeHTTPS); !strings.Contains(r.Answer[0].String(), "ipv4hint") {
		t.Errorf("excluded name lost its hints: %v", r.Answer[0])
	}
}

// TestFakeIPPinnedNeverRecycled exhausts a /29 (6 usable addresses).
func TestFakeIPPinnedNeverRecycled(t *testing.T) {
	s := newTestServer(t)
	p := fakeProxy(t, s, func(c *Config) { c.FakeRange4 = netip.MustParsePrefix("10.99.0.0/29") })
	addr := map[string]netip.Addr{}
	for i := 1; i <= 6; i++ {
		name := fmt.Sprintf("n%d.test", i)
		a := fakeAddr(t, p, name+".", dns.TypeA)
		if a == netip.MustParseAddr("10.99.0.0") || a == netip.MustParseAddr("10.99.0.7") {
			t.Fatalf("handed out the first or last address %v", a)
		}
		addr[name] = a
	}
	p.Pin(addr["n1.test"])
	p.Pin(addr["n2.test"])
	p.Pin(addr["n2.test"]) // nested
	p.Unpin(addr["n2.test"])
	// Four more names recycle n3..n6 (least recently used first), never
	// n1 or n2.
	for i := 7; i <= 10; i++ {
		a := fakeAddr(t, p, fmt.Sprintf("n%d.test.", i), dns.TypeA)
		if a == addr["n1.test"] || a == addr["n2.test"] {
			t.Fatalf("n%d got pinned address %v", i, a)
		}
		if want := addr[fmt.Sprintf("n%d.test", i-4)]; a != want {
			t.Errorf("n%d got %v, want the least recently used %v", i, a, want)
		}
	}
	for _, n := range []string{"n1.test", "n2.test"} {
		if got, ok := p.Domain(addr[n]); !ok || got != n {
			t.Errorf("Domain(%v) = %q, %v; pinned mapping lost", addr[n], got, ok)
		}
	}
	if _, ok := p.Domain(addr["n3.test"]); !ok {
		t.Error("recycled address has no name")
	} else if got, _ := p.Domain(addr["n3.test"]); got != "n7.test" {
		t.Errorf("Domain(recycled) = %q, want n7.test", got)
	}
	// Pin everything: the pool is exhausted, the answer is an error (and
	// SERVFAIL on the wire), and nothing pinned moved.
	for i := 7; i <= 10; i++ {
		p.Pin(addr[fmt.Sprintf("n%d.test", i-4)])
	}
	if _, err := p.Exchange(context.Background(), query("n11.test.", dns.TypeA)); err == nil || !strings.Contains(err.Error(), "exhausted") {
		t.Fatalf("Exchange on an exhausted pool: %v, want an exhausted error", err)
	}
	if got, _ := p.Domain(addr["n1.test"]); got != "n1.test" {
		t.Errorf("n1 mapping moved to %q", got)
	}
	p.Unpin(addr["n1.test"])
	if a := fakeAddr(t, p, "n11.test.", dns.TypeA); a != addr["n1.test"] {
		t.Errorf("after Unpin, n11 got %v, want the one unpinned address %v", a, addr["n1.test"])
	}
}

func TestFakeIPPTR(t *testing.T) {
	s := newTestServer(t)
	p := fakeProxy(t, s)
	a4 := fakeAddr(t, p, "example.test.", dns.TypeA)
	a6 := fakeAddr(t, p, "example.test.", dns.TypeAAAA)
	for _, a := range []netip.Addr{a4, a6} {
		arpa, _ := dns.ReverseAddr(a.String())
		r := exchange(t, p, arpa, dns.TypePTR)
		if len(r.Answer) != 1 || r.Answer[0].(*dns.PTR).Ptr != "example.test." {
			t.Errorf("PTR %s: %v, want example.test.", arpa, r.Answer)
		}
	}
	arpa, _ := dns.ReverseAddr("198.19.255.1")
	if r := exchange(t, p, arpa, dns.TypePTR); r.Rcode != dns.RcodeNameError {
		t.Errorf("PTR of an unmapped fake address: %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
	if s.total() != 0 {
		t.Errorf("PTR for fake addresses reached the upstream")
	}
}

func TestParseReverseName(t *testing.T) {
	for _, a := range []string{"198.18.0.1", "0.0.0.0", "255.255.255.255", "fc00::1", "2001:db8:1:2:3:4:5:6"} {
		want := netip.MustParseAddr(a)
		arpa, _ := dns.ReverseAddr(a)
		if got, ok := parseReverseName(arpa); !ok || got != want {
			t.Errorf("parseReverseName(%q) = %v, %v; want %v", arpa, got, ok, want)
		}
	}
	for _, bad := range []string{"1.2.3.in-addr.arpa.", "01.2.3.4.in-addr.arpa.", "256.2.3.4.in-addr.arpa.", "x.ip6.arpa.", "example.test."} {
		if got, ok := parseReverseName(bad); ok {
			t.Errorf("parseReverseName(%q) = %v, want no address", bad, got)
		}
	}
}

func TestFakeIPFamilyDisabled(t *testing.T) {
	s := newTestServer(t)
	p := fakeProxy(t, s, func(c *Config) { c.FakeRange6 = netip.Prefix{} })
	r := exchange(t, p, "example.test.", dns.TypeAAAA)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
		t.Errorf("AAAA without range6: %s %v, want NODATA", dns.RcodeToString[r.Rcode], r.Answer)
	}
}

func TestFakeAddrMath(t *testing.T) {
	base := netip.MustParseAddr("fc00::ffff:ffff:ffff:ffff")
	if got := addrAdd(base, 1); got != netip.MustParseAddr("fc00:0:0:1::") {
		t.Errorf("addrAdd carry = %v", got)
	}
	if off, ok := addrOffset(base, netip.MustParseAddr("fc00:0:0:1::1")); !ok || off != 2 {
		t.Errorf("addrOffset borrow = %d, %v", off, ok)
	}
	if _, ok := addrOffset(netip.MustParseAddr("10.0.0.5"), netip.MustParseAddr("10.0.0.4")); ok {
		t.Error("addrOffset below base ok")
	}
	r := newFakeRange(netip.MustParsePrefix("10.0.0.0/30"))
	if r.size != 2 || r.first != netip.MustParseAddr("10.0.0.1") {
		t.Errorf("/30: size %d first %v", r.size, r.first)
	}
	if r := newFakeRange(testRange6); r.size != maxFakeAddrs {
		t.Errorf("/18 size %d, want the cap", r.size)
	}
}
