package dnsproxy

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func realProxy(t *testing.T, s *testServer, mutate ...func(*Config)) *Proxy {
	t.Helper()
	cfg := Config{Upstreams: []string{"udp://" + s.udpAddr.String()}}
	for _, m := range mutate {
		m(&cfg)
	}
	return newProxy(t, cfg)
}

func TestCacheHitWithinTTL(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)
	clock := withClock(p)
	r1 := exchange(t, p, "example.test.", dns.TypeA)
	clock.Advance(10 * time.Second)
	r2 := exchange(t, p, "EXAMPLE.test.", dns.TypeA) // case does not matter
	if got := s.count("example.test. a"); got != 1 {
		t.Fatalf("upstream saw %d queries, want 1", got)
	}
	if r1.Answer[0].Header().Ttl != 300 {
		t.Errorf("first TTL %d, want 300", r1.Answer[0].Header().Ttl)
	}
	if got := r2.Answer[0].Header().Ttl; got != 290 {
		t.Errorf("TTL after 10s = %d, want 290", got)
	}
	// The owner name is written as the client wrote the question.
	if got := r2.Answer[0].Header().Name; got != "EXAMPLE.test." {
		t.Errorf("owner %q, want the question's spelling", got)
	}
	if r2.Question[0].Name != "EXAMPLE.test." {
		t.Errorf("question %q changed", r2.Question[0].Name)
	}
	st := p.Stats()
	if st.CacheHits != 1 || st.CacheMisses != 1 || st.Queries != 2 {
		t.Errorf("stats %+v, want 1 hit, 1 miss, 2 queries", st)
	}
	// Past the TTL (and the stale window) the upstream is asked again.
	clock.Advance(300*time.Second + staleWindow)
	exchange(t, p, "example.test.", dns.TypeA)
	if got := s.count("example.test. a"); got != 2 {
		t.Fatalf("upstream saw %d queries after expiry, want 2", got)
	}
}

func TestCacheKeyedByDOBitAndType(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)
	exchange(t, p, "example.test.", dns.TypeA)
	exchange(t, p, "example.test.", dns.TypeAAAA)
	q := query("example.test.", dns.TypeA)
	q.SetEdns0(1232, true)
	r, err := p.Exchange(context.Background(), q)
	if err != nil {
		t.Fatal(err)
	}
	if opt := r.IsEdns0(); opt == nil || !opt.Do() {
		t.Errorf("answer to a DO query has OPT %v", opt)
	}
	if got := s.total(); got != 3 {
		t.Errorf("upstream saw %d queries, want 3 (A, AAAA, A+DO)", got)
	}
}

func TestNegativeCache(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)
	clock := withClock(p)
	for i := 0; i < 3; i++ {
		r := exchange(t, p, "missing.test.", dns.TypeA)
		if r.Rcode != dns.RcodeNameError {
			t.Fatalf("rcode %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
		}
		if len(r.Ns) != 1 {
			t.Fatalf("authority %v, want the SOA", r.Ns)
		}
	}
	// NODATA too.
	exchange(t, p, "v6only.test.", dns.TypeA)
	exchange(t, p, "v6only.test.", dns.TypeA)
	if got := s.count("missing.test. a") + s.count("v6only.test. a"); got != 2 {
		t.Fatalf("upstream saw %d queries, want 1 per name", got)
	}
	// The negative TTL is min(SOA TTL 60, MINIMUM 30) = 30s.
	clock.Advance(29 * time.Second)
	exchange(t, p, "missing.test.", dns.TypeA)
	if got := s.count("missing.test. a"); got != 1 {
		t.Fatalf("upstream asked again within the negative TTL")
	}
	clock.Advance(2*time.Second + staleWindow)
	exchange(t, p, "missing.test.", dns.TypeA)
	if got := s.count("missing.test. a"); got != 2 {
		t.Fatalf("upstream saw %d queries after the negative TTL, want 2", got)
	}
}

func TestCacheTTL(t *testing.T) {
	tests := []struct {
		name string
		msg  *dns.Msg
		want time.Duration
		ok   bool
	}{
		{"positive min", &dns.Msg{Answer: rrs(t, "a. 300 IN CNAME b.", "b. 60 IN A 192.0.2.1")}, 60 * time.Second, true},
		{"zero ttl", &dns.Msg{Answer: rrs(t, "a. 0 IN A 192.0.2.1")}, 0, false},
		{"nxdomain soa", &dns.Msg{MsgHdr: dns.MsgHdr{Rcode: dns.RcodeNameError}, Ns: rrs(t, "a. 600 IN SOA ns. h. 1 2 3 4 120")}, 120 * time.Second, true},
		{"nodata soa ttl", &dns.Msg{Ns: rrs(t, "a. 50 IN SOA ns. h. 1 2 3 4 120")}, 50 * time.Second, true},
		{"capped", &dns.Msg{Ns: rrs(t, "a. 86400 IN SOA ns. h. 1 2 3 4 86400")}, time.Hour, true},
		{"no soa", &dns.Msg{MsgHdr: dns.MsgHdr{Rcode: dns.RcodeNameError}}, 30 * time.Second, true},
		{"servfail", &dns.Msg{MsgHdr: dns.MsgHdr{Rcode: dns.RcodeServerFailure}}, 0, false},
		{"truncated", &dns.Msg{MsgHdr: dns.MsgHdr{Truncated: true}}, 0, false},
	}
	for _, tt := range tests {
		got, ok := cacheTTL(tt.msg)
		if got != tt.want || ok != tt.ok {
			t.Errorf("%s: cacheTTL = %v, %v; want %v, %v", tt.name, got, ok, tt.want, tt.ok)
		}
	}
}

// TestInFlightDeduplication: 50 concurrent identical questions make one
// upstream query.
func TestInFlightDeduplication(t *testing.T) {
	s := newTestServer(t)
	s.delay.Store(int64(200 * time.Millisecond))
	p := realProxy(t, s)
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := query("example.test.", dns.TypeA)
			r, err := p.Exchange(context.Background(), q)
			switch {
			case err != nil:
				errs <- err
			case r.Id != q.Id || len(r.Answer) != 1:
				errs <- errBadAnswer
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := s.count("example.test. a"); got != 1 {
		t.Fatalf("upstream saw %d queries, want 1", got)
	}
	st := p.Stats()
	if st.Deduplicated+st.CacheHits != 49 || st.Deduplicated == 0 {
		t.Errorf("stats %+v: want 49 deduplicated or cached", st)
	}
}

var errBadAnswer = errorString("answer with a wrong ID or no records")

type errorString string

func (e errorString) Error() string { return string(e) }

func TestCacheLRUBound(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s, func(c *Config) { c.CacheSize = 2 })
	exchange(t, p, "a.test.", dns.TypeA)
	exchange(t, p, "b.test.", dns.TypeA)
	exchange(t, p, "a.test.", dns.TypeA) // a is now the most recent
	exchange(t, p, "c.test.", dns.TypeA) // evicts b
	if st := p.Stats(); st.CacheEntries != 2 {
		t.Errorf("CacheEntries = %d, want 2", st.CacheEntries)
	}
	exchange(t, p, "a.test.", dns.TypeA)
	exchange(t, p, "b.test.", dns.TypeA)
	if got := s.count("a.test. a"); got != 1 {
		t.Errorf("a.test asked %d times, want 1 (recently used, kept)", got)
	}
	if got := s.count("b.test. a"); got != 2 {
		t.Errorf("b.test asked %d times, want 2 (evicted)", got)
	}
}

// TestServeStale: an answer expired less than staleWindow ago is served
// with TTL 1 and refreshed once in the background.
func TestServeStale(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)
	clock := withClock(p)
	exchange(t, p, "short.test.", dns.TypeA) // TTL 5
	clock.Advance(10 * time.Second)
	s.delay.Store(int64(100 * time.Millisecond)) // keep the refresh in flight
	var wg sync.WaitGroup
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := p.Exchange(context.Background(), query("short.test.", dns.TypeA))
			if err != nil {
				t.Error(err)
				return
			}
			if len(r.Answer) != 1 || r.Answer[0].Header().Ttl > 1 {
				t.Errorf("stale answer %v, want the old record with TTL <= 1", r.Answer)
			}
		}()
	}
	wg.Wait()
	waitFor(t, "the background refresh", func() bool { return s.count("short.test. a") == 2 })
	waitFor(t, "the refreshed entry", func() bool {
		r := exchange(t, p, "short.test.", dns.TypeA)
		return r.Answer[0].Header().Ttl == 5
	})
	if got := s.count("short.test. a"); got != 2 {
		t.Errorf("upstream saw %d queries, want 2 (one refresh)", got)
	}
	if st := p.Stats(); st.StaleHits < 10 {
		t.Errorf("StaleHits = %d, want >= 10", st.StaleHits)
	}
}
