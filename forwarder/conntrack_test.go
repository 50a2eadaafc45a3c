package forwarder

import (
	"context"
	"io"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tungate/tungate/outbound"
)

// Every relayed flow is tracked with a stable id, its route's metadata
// and its bytes; Close(id) resets it on both sides; it is forgotten when
// it ends.
func TestTrackerTCP(t *testing.T) {
	tr := NewTracker()
	up := listenLoopback(t)
	d := newDirect(t)
	route := func(f *Flow) outbound.Dialer {
		f.Rule, f.RulePayload, f.Chain, f.Domain, f.DomainSource = "rules[1]", "port 80", []string{"direct"}, "example.org", "fake-ip"
		return d
	}
	relay := newTCP(t, TCPConfig{DialTimeout: time.Second, Tracker: tr}, route)

	a := startFlow(t, relay, up)
	// A flow is tracked once the app's handshake is done, after the
	// upstream accepted: wait, so that ids follow the order here.
	waitFor(t, 2*time.Second, "the first flow tracked", func() bool { return tr.Len() == 1 })
	b := startFlow(t, relay, up)
	waitFor(t, 2*time.Second, "two tracked flows", func() bool { return tr.Len() == 2 })
	roundTrip(t, a.app, a.up, "hello")        // 5 bytes up
	roundTrip(t, a.up, a.app, "hello, world") // 12 bytes down
	// The relay counts a read after writing it on: the peer may have the
	// bytes a moment before the counter does.
	waitFor(t, 2*time.Second, "the first flow's bytes counted", func() bool {
		s := tr.Snapshot()
		return len(s) == 2 && s[0].Upload == 5 && s[0].Download == 12
	})
	snap := tr.Snapshot()
	if len(snap) != 2 || snap[0].ID >= snap[1].ID {
		t.Fatalf("Snapshot = %+v, want two flows, oldest first with increasing ids", snap)
	}
	first := snap[0]
	if first.Network != "tcp" || first.Inbound != "tun" || first.Outbound != "direct" || first.Rule != "rules[1]" || first.RulePayload != "port 80" ||
		first.Domain != "example.org" || first.DomainSource != "fake-ip" || len(first.Chain) != 1 || first.UID != -1 {
		t.Errorf("tracked metadata = %+v", first)
	}
	if first.Src != a.flow.Src().String() || first.Dst != up.Addr().String() {
		t.Errorf("tracked %s → %s, want %s → %s", first.Src, first.Dst, a.flow.Src(), up.Addr())
	}
	if first.Upload != 5 || first.Download != 12 || snap[1].Upload != 0 {
		t.Errorf("counters: first %d up / %d down, second %d up; want 5 / 12, 0", first.Upload, first.Download, snap[1].Upload)
	}
	if time.Since(first.Start) > 5*time.Second || first.Start.IsZero() {
		t.Errorf("start time %v", first.Start)
	}

	if !tr.Close(first.ID) {
		t.Fatal("Close(live id) = false")
	}
	expectReset(t, a.app, "app")
	expectReset(t, a.up, "upstream")
	waitFor(t, 2*time.Second, "the closed flow untracked", func() bool { return tr.Len() == 1 })
	if tr.Close(first.ID) {
		t.Error("Close of an ended flow = true")
	}
	roundTrip(t, b.app, b.up, "still here")
	waitFor(t, 2*time.Second, "the second flow's bytes counted", func() bool {
		s := tr.Snapshot()
		return len(s) == 1 && s[0].Upload == 10
	})
	if got := tr.Snapshot(); len(got) != 1 || got[0].ID != snap[1].ID || got[0].Upload != 10 {
		t.Errorf("after Close: %+v, want the second flow with 10 bytes up", got)
	}
}

// Retire resets the flows of a replaced outbound, keeps the others, and
// refuses a flow of it that was still dialling.
func TestTrackerRetire(t *testing.T) {
	tr := NewTracker()
	up := listenLoopback(t)
	old, kept := newDirect(t), newDirect(t)
	var use atomic.Pointer[outbound.Direct]
	use.Store(old)
	relay := newTCP(t, TCPConfig{DialTimeout: time.Second, Tracker: tr}, func(*Flow) outbound.Dialer { return use.Load() })
	a := startFlow(t, relay, up)
	use.Store(kept)
	b := startFlow(t, relay, up)
	waitFor(t, 2*time.Second, "two tracked flows", func() bool { return tr.Len() == 2 })
	if n := tr.Retire(old); n != 1 {
		t.Fatalf("Retire ended %d flows, want 1", n)
	}
	expectReset(t, a.app, "app of the retired outbound")
	roundTrip(t, b.app, b.up, "kept")

	use.Store(old) // a flow that routed to old before the reload
	c := startFlow(t, relay, up)
	expectReset(t, c.app, "app of a flow dialled through a retired outbound")
	waitFor(t, 2*time.Second, "one tracked flow", func() bool { return tr.Len() == 1 })
}

// UDP sessions are tracked too, with their bytes, and Close(id) ends one.
func TestTrackerUDP(t *testing.T) {
	tr := NewTracker()
	d := &fakeDialer{name: "fake", echo: true}
	var rec replyRecorder
	table, err := NewUDPTable(UDPConfig{IdleTimeout: time.Minute, DNSIdleTimeout: time.Minute, MaxSessions: 8, Tracker: tr}, routeTo(d), rec.reply, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer table.Close()
	table.Handle(ap("10.0.0.1:1000"), ap("10.9.0.1:53"), []byte("abc"))
	table.Flush()
	waitFor(t, 2*time.Second, "the echo, counted", func() bool {
		s := tr.Snapshot()
		return len(rec.received()) == 1 && len(s) == 1 && s[0].Download == 3
	})
	snap := tr.Snapshot()
	if len(snap) != 1 || snap[0].Network != "udp" || snap[0].Upload != 3 || snap[0].Download != 3 || snap[0].Outbound != "fake" {
		t.Fatalf("Snapshot = %+v, want one udp session with 3 bytes each way", snap)
	}
	tr.Close(snap[0].ID)
	waitFor(t, 2*time.Second, "the session gone", func() bool { return table.Len() == 0 && tr.Len() == 0 })
}

// endRecorder collects what Tracker.OnEnd is given.
type endRecorder struct {
	mu    sync.Mutex
	ends  []ConnInfo
	lived []time.Duration
}

func (r *endRecorder) onEnd(c ConnInfo, lived time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ends = append(r.ends, c)
	r.lived = append(r.lived, lived)
}

func (r *endRecorder) got() ([]ConnInfo, []time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.ends), slices.Clone(r.lived)
}

// OnEnd gets each ended TCP flow once, after both directions finished:
// its metadata, its final byte counts and how long it lived.
func TestTrackerOnEndTCP(t *testing.T) {
	tr := NewTracker()
	var rec endRecorder
	tr.OnEnd = rec.onEnd
	up := listenLoopback(t)
	d := newDirect(t)
	route := func(f *Flow) outbound.Dialer {
		f.Rule, f.Domain, f.DomainSource = "rules[0]", "example.org", "fake-ip"
		return d
	}
	relay := newTCP(t, TCPConfig{DialTimeout: time.Second, Tracker: tr}, route)
	a := startFlow(t, relay, up)
	roundTrip(t, a.app, a.up, "hello")        // 5 bytes up
	roundTrip(t, a.up, a.app, "hello, world") // 12 bytes down
	const hold = 50 * time.Millisecond
	time.Sleep(hold)
	// Both sides close: the relay ends by FIN in each direction.
	a.app.CloseWrite()
	a.up.CloseWrite()
	io.Copy(io.Discard, a.app)
	io.Copy(io.Discard, a.up)
	waitClosed(t, a.done, 2*time.Second, "the relay")
	waitFor(t, 2*time.Second, "OnEnd called", func() bool { e, _ := rec.got(); return len(e) == 1 })
	ends, lived := rec.got()
	e := ends[0]
	if e.Network != "tcp" || e.Rule != "rules[0]" || e.Domain != "example.org" || e.Outbound != "direct" ||
		e.Src != a.flow.Src().String() || e.Dst != up.Addr().String() {
		t.Errorf("OnEnd metadata = %+v", e)
	}
	if e.Upload != 5 || e.Download != 12 {
		t.Errorf("OnEnd bytes = %d up / %d down, want 5 / 12", e.Upload, e.Download)
	}
	if lived[0] < hold || lived[0] > 5*time.Second {
		t.Errorf("OnEnd lived = %v, want between %v and 5s", lived[0], hold)
	}
	if tr.Len() != 0 {
		t.Errorf("tracker still holds %d flows", tr.Len())
	}
	time.Sleep(50 * time.Millisecond)
	if e, _ := rec.got(); len(e) != 1 {
		t.Errorf("OnEnd called %d times for one flow, want 1", len(e))
	}
}

// OnEnd gets an ended UDP session once, with its bytes each way.
func TestTrackerOnEndUDP(t *testing.T) {
	tr := NewTracker()
	var rec endRecorder
	tr.OnEnd = rec.onEnd
	d := &fakeDialer{name: "fake", echo: true}
	var replies replyRecorder
	table, err := NewUDPTable(UDPConfig{IdleTimeout: time.Minute, DNSIdleTimeout: time.Minute, MaxSessions: 8, Tracker: tr}, routeTo(d), replies.reply, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer table.Close()
	table.Handle(ap("10.0.0.1:1000"), ap("10.9.0.1:5000"), []byte("abcd"))
	table.Flush()
	waitFor(t, 2*time.Second, "the echo, counted", func() bool {
		s := tr.Snapshot()
		return len(replies.received()) == 1 && len(s) == 1 && s[0].Download == 4
	})
	if e, _ := rec.got(); len(e) != 0 {
		t.Fatalf("OnEnd called for a live session: %+v", e)
	}
	tr.Close(tr.Snapshot()[0].ID)
	waitFor(t, 2*time.Second, "OnEnd called", func() bool { e, _ := rec.got(); return len(e) == 1 })
	ends, lived := rec.got()
	if e := ends[0]; e.Network != "udp" || e.Src != "10.0.0.1:1000" || e.Dst != "10.9.0.1:5000" || e.Outbound != "fake" || e.Rule != "final" ||
		e.Upload != 4 || e.Download != 4 {
		t.Errorf("OnEnd = %+v, want udp 10.0.0.1:1000 → 10.9.0.1:5000 via fake, rule final, 4 bytes each way", e)
	}
	if lived[0] <= 0 || lived[0] > 5*time.Second {
		t.Errorf("OnEnd lived = %v", lived[0])
	}
}

// countedReader returns n bytes a Read, forever.
type countedReader struct{ n int }

func (r countedReader) Read(b []byte) (int, error) { return min(r.n, len(b)), nil }

type discardCloser struct{ io.Writer }

func (discardCloser) CloseWrite() error { return nil }

// BenchmarkTrackedCopy is the relay's per-read work with the tracker's
// counters: it must allocate nothing per read.
func BenchmarkTrackedCopy(b *testing.B) {
	tr := NewTracker()
	r := &tcpRelay{}
	r.conn = tr.track(&Flow{Network: "tcp"}, outbound.Dialer(nil), func() {})
	var total atomic.Uint64
	src := io.LimitReader(countedReader{n: 1400}, int64(b.N)*1400)
	b.ReportAllocs()
	b.SetBytes(1400)
	b.ResetTimer()
	r.copy(discardCloser{io.Discard}, src, &total, &r.conn.up, false)
	b.StopTimer()
	if r.conn.up.Load() != uint64(b.N)*1400 {
		b.Fatalf("counted %d bytes, want %d", r.conn.up.Load(), b.N*1400)
	}
}

// batchSink is an upstream session that takes every batch and never
// receives.
type batchSink struct{ closed chan struct{} }

func (s *batchSink) ReadPacket([]byte) (int, netip.AddrPort, error) {
	<-s.closed
	return 0, netip.AddrPort{}, io.EOF
}
func (s *batchSink) WritePacket([]byte, outbound.Target) error { return nil }
func (s *batchSink) WriteBatch(ds []outbound.Datagram) (int, error) {
	return len(ds), nil
}
func (s *batchSink) Close() error {
	select {
	case <-s.closed:
	default:
		close(s.closed)
	}
	return nil
}

type sinkDialer struct{}

func (sinkDialer) Name() string { return "sink" }
func (sinkDialer) DialTCP(context.Context, outbound.Target) (outbound.TCPConn, error) {
	return nil, outbound.ErrRefused
}
func (sinkDialer) ListenUDP(context.Context, outbound.Target) (outbound.PacketConn, error) {
	return &batchSink{closed: make(chan struct{})}, nil
}

// BenchmarkTrackedUDP is a tracked session's per-datagram work on the
// packet path (Handle, and Flush as the TUN runs dry): no allocation.
func BenchmarkTrackedUDP(b *testing.B) {
	tr := NewTracker()
	table, err := NewUDPTable(UDPConfig{IdleTimeout: time.Minute, DNSIdleTimeout: time.Minute, MaxSessions: 8, Tracker: tr}, routeTo(sinkDialer{}), func([]byte, netip.AddrPort, netip.AddrPort) error { return nil }, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer table.Close()
	src, dst, payload := ap("10.0.0.1:1000"), ap("10.9.0.1:443"), make([]byte, 1200)
	table.Handle(src, dst, payload)
	waitFor(b, 2*time.Second, "the session open", func() bool { table.Flush(); return table.stats.PacketsUp.Load() == 1 })
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		table.Handle(src, dst, payload)
		table.Flush()
	}
	b.StopTimer()
	if got := tr.Snapshot()[0].Upload; got < uint64(b.N)*1200 {
		b.Fatalf("tracked %d bytes up, want at least %d", got, b.N*1200)
	}
}
