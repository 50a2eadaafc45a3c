package dnsproxy

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

func storeConfig(s *testServer, path string) Config {
	return Config{
		Mode:       ModeFakeIP,
		Upstreams:  []string{"udp://" + s.udpAddr.String()},
		FakeRange4: testRange4,
		FakeRange6: testRange6,
		Store:      path,
	}
}

func TestStoreSurvivesRestart(t *testing.T) {
	s := newTestServer(t)
	path := filepath.Join(t.TempDir(), "fakeip.store")
	p1 := newProxy(t, storeConfig(s, path))
	a4 := fakeAddr(t, p1, "example.test.", dns.TypeA)
	a6 := fakeAddr(t, p1, "example.test.", dns.TypeAAAA)
	b4 := fakeAddr(t, p1, "other.test.", dns.TypeA)
	if err := p1.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	p2 := newProxy(t, storeConfig(s, path))
	for a, want := range map[netip.Addr]string{a4: "example.test", a6: "example.test", b4: "other.test"} {
		if got, ok := p2.Domain(a); !ok || got != want {
			t.Errorf("after restart Domain(%v) = %q, %v; want %q", a, got, ok, want)
		}
	}
	if got := fakeAddr(t, p2, "example.test.", dns.TypeA); got != a4 {
		t.Errorf("after restart example.test got %v, want %v", got, a4)
	}
	// New names do not collide with the restored ones.
	if c4 := fakeAddr(t, p2, "third.test.", dns.TypeA); c4 == a4 || c4 == b4 {
		t.Errorf("new name got a restored address %v", c4)
	}
}

// TestStoreSurvivesKill opens a second proxy on the store of a first one
// that was never closed, as after SIGKILL: the mapping the first answered is
// there.
func TestStoreSurvivesKill(t *testing.T) {
	s := newTestServer(t)
	path := filepath.Join(t.TempDir(), "fakeip.store")
	p1 := newProxy(t, storeConfig(s, path))
	a := fakeAddr(t, p1, "killed.test.", dns.TypeA)
	p2 := newProxy(t, storeConfig(s, path))
	if got, ok := p2.Domain(a); !ok || got != "killed.test" {
		t.Fatalf("Domain(%v) after kill = %q, %v; want killed.test", a, got, ok)
	}
}

func TestStoreTornTailIgnored(t *testing.T) {
	s := newTestServer(t)
	path := filepath.Join(t.TempDir(), "fakeip.store")
	header := storeHeader(testRange4, testRange6)
	writeFile(t, path, header+"\n198.18.0.5 good.test\nnot a record\n198.18.0.6 torn.te")
	h := &recordHandler{}
	p, err := New(storeConfig(s, path), &loopbackDialer{}, slog.New(h))
	if err != nil {
		t.Fatalf("New on a torn store: %v", err)
	}
	if got, ok := p.Domain(netip.MustParseAddr("198.18.0.5")); !ok || got != "good.test" {
		t.Errorf("good record lost: %q, %v", got, ok)
	}
	if got, ok := p.Domain(netip.MustParseAddr("198.18.0.6")); ok {
		t.Errorf("torn record restored as %q", got)
	}
	for _, r := range h.all() {
		if r.Level > slog.LevelDebug {
			t.Errorf("torn tail logged at %v: %s", r.Level, r.Message)
		}
	}
	// The next mapping is appended cleanly, not glued to the torn bytes.
	a := fakeAddr(t, p, "next.test.", dns.TypeA)
	p.Close()
	p2 := newProxy(t, storeConfig(s, path))
	if got, ok := p2.Domain(a); !ok || got != "next.test" {
		t.Errorf("mapping made after a torn tail: %q, %v", got, ok)
	}
	if got, _ := p2.Domain(netip.MustParseAddr("198.18.0.5")); got != "good.test" {
		t.Errorf("good record lost on the second restart: %q", got)
	}
}

func TestStoreRangeChangeDiscards(t *testing.T) {
	s := newTestServer(t)
	path := filepath.Join(t.TempDir(), "fakeip.store")
	p1 := newProxy(t, storeConfig(s, path))
	a := fakeAddr(t, p1, "example.test.", dns.TypeA)
	p1.Close()

	h := &recordHandler{}
	cfg := storeConfig(s, path)
	cfg.FakeRange4 = netip.MustParsePrefix("10.64.0.0/16")
	p2, err := New(cfg, &loopbackDialer{}, slog.New(h))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p2.Close() })
	recs := h.all()
	if len(recs) != 1 || recs[0].Level != slog.LevelWarn {
		for _, r := range recs {
			t.Logf("log: %v %s", r.Level, r.Message)
		}
		t.Fatalf("%d log records, want exactly one warning", len(recs))
	}
	if !strings.Contains(recs[0].Message, "other ranges") {
		t.Errorf("warning %q does not say why", recs[0].Message)
	}
	if _, ok := p2.Domain(a); ok {
		t.Errorf("old mapping of %v survived a range change", a)
	}
	if st := p2.Stats(); st.FakeIPMappings != 0 {
		t.Errorf("FakeIPMappings = %d after discard", st.FakeIPMappings)
	}
	// The store now carries the new ranges: no warning on the next start.
	b := fakeAddr(t, p2, "example.test.", dns.TypeA)
	p2.Close()
	h2 := &recordHandler{}
	p3, err := New(cfg, &loopbackDialer{}, slog.New(h2))
	if err != nil {
		t.Fatal(err)
	}
	defer p3.Close()
	if n := len(h2.all()); n != 0 {
		t.Errorf("%d log records on a matching store", n)
	}
	if got, _ := p3.Domain(b); got != "example.test" {
		t.Errorf("Domain(%v) = %q", b, got)
	}
}

// TestStoreCompaction recycles a tiny pool many times: the log is rewritten
// instead of growing without bound, and still restores the live mappings.
func TestStoreCompaction(t *testing.T) {
	s := newTestServer(t)
	path := filepath.Join(t.TempDir(), "fakeip.store")
	cfg := storeConfig(s, path)
	cfg.FakeRange4 = netip.MustParsePrefix("10.99.0.0/29")
	p := newProxy(t, cfg)
	live := map[string]netip.Addr{}
	for i := 0; i < 1000; i++ {
		name := fmt.Sprintf("n%d.test", i)
		a := fakeAddr(t, p, name+".", dns.TypeA)
		live[name] = a
		if i >= 6 {
			delete(live, fmt.Sprintf("n%d.test", i-6))
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if lines := bytes.Count(data, []byte("\n")); lines > compactMin+2 {
		t.Errorf("store has %d lines for 6 live mappings, want compaction", lines)
	}
	p.Close()
	p2 := newProxy(t, cfg)
	for name, a := range live {
		if got, ok := p2.Domain(a); !ok || got != name {
			t.Errorf("Domain(%v) = %q, %v; want %q", a, got, ok, name)
		}
	}
	if st := p2.Stats(); st.FakeIPMappings != 6 {
		t.Errorf("FakeIPMappings = %d, want 6", st.FakeIPMappings)
	}
}

// TestStoreRecycledMappingReplay: after an address is recycled, replay
// gives it to the new name only (last write wins).
func TestStoreRecycledMappingReplay(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fakeip.store")
	header := storeHeader(netip.MustParsePrefix("10.99.0.0/29"), netip.Prefix{})
	writeFile(t, path, header+"\n10.99.0.1 a.test\n10.99.0.2 b.test\n10.99.0.1 c.test\n10.99.0.3 b.test\n10.99.0.7 bcast.test\n")
	pool := newFakeIPPool(netip.MustParsePrefix("10.99.0.0/29"), netip.Prefix{}, slog.New(slog.DiscardHandler))
	st, err := openFakeIPStore(path, pool, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	want := map[string]string{"10.99.0.1": "c.test", "10.99.0.3": "b.test"}
	for a, name := range want {
		if got, ok := pool.lookup(netip.MustParseAddr(a)); !ok || got != name {
			t.Errorf("lookup(%s) = %q, %v; want %q", a, got, ok, name)
		}
	}
	for _, a := range []string{"10.99.0.2", "10.99.0.7"} {
		if got, ok := pool.lookup(netip.MustParseAddr(a)); ok {
			t.Errorf("lookup(%s) = %q, want none", a, got)
		}
	}
	if pool.len() != 2 {
		t.Errorf("%d mappings, want 2", pool.len())
	}
}

// Flushing drops the unpinned mappings, keeps the pinned one, rewrites
// the store so a restart does not bring them back, and hands out no
// flushed address before the never-used ones.
func TestFakeIPFlush(t *testing.T) {
	path := filepath.Join(t.TempDir(), "fakeip.store")
	r4 := netip.MustParsePrefix("10.99.0.0/29")
	pool := newFakeIPPool(r4, netip.Prefix{}, slog.New(slog.DiscardHandler))
	st, err := openFakeIPStore(path, pool, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	pool.store = st
	a, _ := pool.assign("a.test", false)
	b, _ := pool.assign("b.test", false)
	pool.pin(b)
	if n, err := pool.flush(); n != 1 || err != nil {
		t.Fatalf("flush = %d, %v; want 1 dropped", n, err)
	}
	if _, ok := pool.lookup(a); ok {
		t.Error("the unpinned mapping survived the flush")
	}
	if name, ok := pool.lookup(b); !ok || name != "b.test" {
		t.Error("the pinned mapping was flushed")
	}
	if c, _ := pool.assign("c.test", false); c == a {
		t.Errorf("a flushed address (%s) was handed out before the never-used ones", a)
	}
	st.close()
	again := newFakeIPPool(r4, netip.Prefix{}, slog.New(slog.DiscardHandler))
	st2, err := openFakeIPStore(path, again, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer st2.close()
	if _, ok := again.lookup(a); ok {
		t.Error("a flushed mapping came back from the store")
	}
	if name, ok := again.lookup(b); !ok || name != "b.test" {
		t.Error("the pinned mapping is not in the store")
	}
}
