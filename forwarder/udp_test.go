package forwarder

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/leakcheck"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/outbound/reject"
)

var (
	appSrc  = ap("10.0.0.2:40000")
	remote1 = ap("10.233.1.1:9001")
	remote2 = ap("10.233.1.2:9002")
	remote3 = ap("10.233.1.3:9003")
)

func longUDPConfig() UDPConfig {
	return UDPConfig{IdleTimeout: time.Minute, DNSIdleTimeout: time.Minute, MaxSessions: 64}
}

// newUDPTable returns a table that replies into a recorder and is closed
// when the test ends.
func newUDPTable(t *testing.T, cfg UDPConfig, route Route) (*UDPTable, *replyRecorder) {
	t.Helper()
	rec := &replyRecorder{}
	tbl, err := NewUDPTable(cfg, route, rec.reply, nil)
	if err != nil {
		t.Fatalf("NewUDPTable(%+v): %v", cfg, err)
	}
	t.Cleanup(func() { closeWithin(t, tbl, 5*time.Second) })
	return tbl, rec
}

func sortDatagrams(ds []fakeDatagram) []fakeDatagram {
	slices.SortFunc(ds, func(a, b fakeDatagram) int {
		if a.payload < b.payload {
			return -1
		}
		if a.payload > b.payload {
			return 1
		}
		return 0
	})
	return ds
}

func TestNewUDPTableChecksConfig(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	reply := (&replyRecorder{}).reply
	good := longUDPConfig()
	for _, tc := range []struct {
		name  string
		cfg   UDPConfig
		route Route
		reply UDPReply
	}{
		{"nil route", good, nil, reply},
		{"nil reply", good, routeTo(d), nil},
		{"zero idle", UDPConfig{DNSIdleTimeout: time.Second, MaxSessions: 1}, routeTo(d), reply},
		{"zero dns idle", UDPConfig{IdleTimeout: time.Second, MaxSessions: 1}, routeTo(d), reply},
		{"zero max sessions", UDPConfig{IdleTimeout: time.Second, DNSIdleTimeout: time.Second}, routeTo(d), reply},
	} {
		if tbl, err := NewUDPTable(tc.cfg, tc.route, tc.reply, nil); err == nil {
			tbl.Close()
			t.Errorf("NewUDPTable with %s: got no error", tc.name)
		}
	}
}

// One app source reaching two destinations uses one upstream session, and
// a reply from a third remote the app never sent to reaches the app with
// that remote as its source (full cone).
func TestUDPEndpointIndependentMapping(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	tbl, rec := newUDPTable(t, longUDPConfig(), routeTo(d))

	if !tbl.Handle(appSrc, remote1, []byte("to-1")) {
		t.Fatalf("Handle(%s, %s): refused", appSrc, remote1)
	}
	if !tbl.Handle(appSrc, remote2, []byte("to-2")) {
		t.Fatalf("Handle(%s, %s): refused", appSrc, remote2)
	}
	waitFor(t, 2*time.Second, "one session with two writes", func() bool {
		s := d.sessions()
		return len(s) == 1 && len(s[0].written()) == 2
	})
	if n, _ := d.listenCount(); n != 1 {
		t.Fatalf("ListenUDP called %d times for one app source, want 1", n)
	}
	if got := tbl.Len(); got != 1 {
		t.Errorf("Len() = %d, want 1", got)
	}
	sess := d.sessions()[0]
	if sess.first != remote1 {
		t.Errorf("session opened towards %s, want the first destination %s", sess.first, remote1)
	}
	want := []fakeDatagram{{"to-1", remote1}, {"to-2", remote2}}
	if got := sortDatagrams(sess.written()); !slices.Equal(got, want) {
		t.Errorf("upstream writes = %v, want %v", got, want)
	}

	sess.inject(t, remote3, "from-3")
	sess.inject(t, remote1, "from-1")
	waitFor(t, 2*time.Second, "two replies at the app", func() bool { return len(rec.received()) == 2 })
	wantApp := []appDatagram{{"from-3", remote3, appSrc}, {"from-1", remote1, appSrc}}
	if got := rec.received(); !slices.Equal(got, wantApp) {
		t.Errorf("app received %v, want %v", got, wantApp)
	}
	st := tbl.Stats()
	if st.Opened.Load() != 1 || st.PacketsUp.Load() != 2 || st.PacketsDown.Load() != 2 || st.Dropped.Load() != 0 {
		t.Errorf("stats: opened %d up %d down %d dropped %d, want 1 2 2 0",
			st.Opened.Load(), st.PacketsUp.Load(), st.PacketsDown.Load(), st.Dropped.Load())
	}
}

// In symmetric mode each destination gets its own session, and a datagram
// from any other remote is dropped, not delivered to the app.
func TestUDPSymmetricMapping(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	cfg := longUDPConfig()
	cfg.Symmetric = true
	tbl, rec := newUDPTable(t, cfg, routeTo(d))

	tbl.Handle(appSrc, remote1, []byte("to-1"))
	tbl.Handle(appSrc, remote2, []byte("to-2"))
	waitFor(t, 2*time.Second, "two sessions written to", func() bool {
		s1, s2 := d.sessionFor(remote1), d.sessionFor(remote2)
		return s1 != nil && s2 != nil && len(s1.written()) == 1 && len(s2.written()) == 1
	})
	if n, _ := d.listenCount(); n != 2 {
		t.Fatalf("ListenUDP called %d times for two destinations, want 2", n)
	}
	if got := tbl.Len(); got != 2 {
		t.Errorf("Len() = %d, want 2", got)
	}
	s1, s2 := d.sessionFor(remote1), d.sessionFor(remote2)
	if got, want := s1.written(), []fakeDatagram{{"to-1", remote1}}; !slices.Equal(got, want) {
		t.Errorf("session towards %s wrote %v, want %v", remote1, got, want)
	}
	if got, want := s2.written(), []fakeDatagram{{"to-2", remote2}}; !slices.Equal(got, want) {
		t.Errorf("session towards %s wrote %v, want %v", remote2, got, want)
	}

	// Read in order: once "answer" is at the app, both strays were seen.
	s1.inject(t, remote3, "stray-3")
	s1.inject(t, remote2, "stray-2") // the other mapping's remote, not this one's
	s1.inject(t, remote1, "answer")
	waitFor(t, 2*time.Second, "the answer at the app", func() bool { return len(rec.received()) > 0 })
	if got, want := rec.received(), []appDatagram{{"answer", remote1, appSrc}}; !slices.Equal(got, want) {
		t.Errorf("app received %v, want only %v", got, want)
	}
	if got := tbl.Stats().Dropped.Load(); got != 2 {
		t.Errorf("Stats().Dropped = %d after two datagrams from foreign remotes, want 2", got)
	}
}

func TestUDPIdleExpiry(t *testing.T) {
	t.Run("mapping", func(t *testing.T) {
		leakcheck.Check(t)
		d := &fakeDialer{name: "fake"}
		const idle = 200 * time.Millisecond
		tbl, _ := newUDPTable(t, UDPConfig{IdleTimeout: idle, DNSIdleTimeout: time.Minute, MaxSessions: 8}, routeTo(d))

		start := time.Now()
		tbl.Handle(appSrc, remote1, []byte("x"))
		waitFor(t, 2*time.Second, "the session opened", func() bool { return len(d.sessions()) == 1 })
		sess := d.sessions()[0]
		waitFor(t, 2*time.Second, "the mapping to expire", func() bool { return tbl.Len() == 0 })
		if elapsed := time.Since(start); elapsed < idle {
			t.Errorf("mapping expired after %v, before its idle timeout %v", elapsed, idle)
		}
		st := tbl.Stats()
		if st.Expired.Load() != 1 || st.Active.Load() != 0 {
			t.Errorf("Stats(): expired %d active %d, want 1 0", st.Expired.Load(), st.Active.Load())
		}
		waitFor(t, time.Second, "the expired session's conn closed", func() bool { return sess.closeCount() > 0 })

		// The app's next datagram opens a fresh mapping.
		tbl.Handle(appSrc, remote1, []byte("y"))
		waitFor(t, 2*time.Second, "a second session with the new datagram", func() bool {
			s := d.sessions()
			return len(s) == 2 && len(s[1].written()) == 1
		})
		if got := d.sessions()[1].written()[0].payload; got != "y" {
			t.Errorf("new session wrote %q, want %q", got, "y")
		}
	})

	t.Run("dns", func(t *testing.T) {
		leakcheck.Check(t)
		d := &fakeDialer{name: "fake"}
		tbl, _ := newUDPTable(t, UDPConfig{IdleTimeout: 10 * time.Second, DNSIdleTimeout: 200 * time.Millisecond, MaxSessions: 8}, routeTo(d))

		dnsServer := ap("10.233.1.53:53")
		tbl.Handle(ap("10.0.0.2:41000"), dnsServer, []byte("query"))
		tbl.Handle(ap("10.0.0.2:41001"), remote1, []byte("data"))
		waitFor(t, 2*time.Second, "two sessions opened", func() bool {
			return d.sessionFor(dnsServer) != nil && d.sessionFor(remote1) != nil
		})
		waitFor(t, 2*time.Second, "the DNS mapping to expire", func() bool { return tbl.Len() == 1 })
		if got := tbl.Stats().Expired.Load(); got != 1 {
			t.Errorf("Stats().Expired = %d, want 1", got)
		}
		waitFor(t, time.Second, "the DNS session's conn closed", func() bool { return d.sessionFor(dnsServer).closeCount() > 0 })
		if d.sessionFor(remote1).closeCount() != 0 {
			t.Errorf("the non-DNS mapping (idle timeout 10s) was closed along with the DNS one")
		}
	})
}

// Datagrams in either direction keep a mapping alive past its idle timeout,
// and once they stop it expires.
func TestUDPActivityKeepsMappingAlive(t *testing.T) {
	for _, dir := range []string{"app sends", "remote replies"} {
		t.Run(dir, func(t *testing.T) {
			leakcheck.Check(t)
			d := &fakeDialer{name: "fake"}
			// A timeout 20 gaps long: a loaded machine (or -race)
			// can stretch one 50 ms sleep several times over.
			tbl, rec := newUDPTable(t, UDPConfig{IdleTimeout: time.Second, DNSIdleTimeout: time.Minute, MaxSessions: 8}, routeTo(d))

			tbl.Handle(appSrc, remote1, []byte("open"))
			waitFor(t, 2*time.Second, "the session opened", func() bool { return len(d.sessions()) == 1 })
			sess := d.sessions()[0]
			for i := range 30 { // 1.5 s at one datagram per 50 ms
				time.Sleep(50 * time.Millisecond)
				if dir == "app sends" {
					tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
				} else {
					sess.inject(t, remote1, strconv.Itoa(i))
				}
			}
			if got := tbl.Stats().Expired.Load(); got != 0 {
				t.Fatalf("mapping expired %d times while datagrams flowed every 50ms (idle timeout 1s)", got)
			}
			if n, _ := d.listenCount(); n != 1 || sess.closeCount() != 0 || tbl.Len() != 1 {
				t.Fatalf("after 1.5s of traffic: ListenUDP calls %d, session closed %d times, Len() %d; want 1, 0, 1",
					n, sess.closeCount(), tbl.Len())
			}
			if dir == "app sends" {
				waitFor(t, time.Second, "31 upstream writes", func() bool { return len(sess.written()) == 31 })
			} else {
				waitFor(t, time.Second, "30 replies at the app", func() bool { return len(rec.received()) == 30 })
			}
			waitFor(t, 5*time.Second, "expiry once traffic stopped", func() bool { return tbl.Len() == 0 })
		})
	}
}

func TestUDPSessionCap(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	tbl, _ := newUDPTable(t, UDPConfig{IdleTimeout: time.Minute, DNSIdleTimeout: time.Minute, MaxSessions: 3}, routeTo(d))

	for i := range 4 {
		src := netip.AddrPortFrom(appSrc.Addr(), uint16(41000+i))
		dst := netip.AddrPortFrom(remote1.Addr(), uint16(9000+i))
		tbl.Handle(src, dst, []byte(strconv.Itoa(i)))
	}
	if got := tbl.Len(); got != 3 {
		t.Errorf("Len() = %d with MaxSessions 3 and four sources, want 3", got)
	}
	if got := tbl.Stats().RefusedOverCap.Load(); got != 1 {
		t.Errorf("Stats().RefusedOverCap = %d, want 1", got)
	}
	waitFor(t, 2*time.Second, "three sessions written to", func() bool {
		s := d.sessions()
		return len(s) == 3 && len(s[0].written())+len(s[1].written())+len(s[2].written()) == 3
	})
	if n, _ := d.listenCount(); n != 3 {
		t.Errorf("ListenUDP called %d times, want 3: the source over the cap must not be dialled", n)
	}
	if s := d.sessionFor(netip.AddrPortFrom(remote1.Addr(), 9003)); s != nil {
		t.Errorf("a session was opened for the source over the cap")
	}
}

// An upstream session that takes long to open never holds up the packet
// path: Handle returns while ListenUDP is still blocked, the datagrams
// queued meanwhile go out in order once it opens, and those past
// pendingMax are dropped and counted.
func TestUDPSlowOpenDoesNotBlockHandle(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "slow", gate: make(chan struct{})}
	tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))

	const extra = 8
	var slowest time.Duration
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range pendingMax + extra {
			start := time.Now()
			tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
			slowest = max(slowest, time.Since(start))
		}
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		close(d.gate)
		t.Fatalf("Handle blocked while the upstream session was opening")
	}
	t.Logf("slowest Handle while opening: %v", slowest)
	if slowest > 50*time.Millisecond {
		t.Errorf("a Handle call took %v while the upstream session was opening, want it immediate", slowest)
	}
	waitFor(t, 2*time.Second, "ListenUDP entered", func() bool { n, _ := d.listenCount(); return n > 0 })
	if entered, returned := d.listenCount(); entered != 1 || returned != 0 {
		t.Fatalf("ListenUDP entered %d returned %d, want 1 0", entered, returned)
	}
	if got := tbl.Stats().Dropped.Load(); got != extra {
		t.Errorf("Stats().Dropped = %d after %d datagrams past pendingMax, want %d", got, extra, extra)
	}

	close(d.gate)
	waitFor(t, 2*time.Second, "the queued datagrams written", func() bool {
		s := d.sessions()
		return len(s) == 1 && len(s[0].written()) == pendingMax
	})
	var want []fakeDatagram
	for i := range pendingMax {
		want = append(want, fakeDatagram{strconv.Itoa(i), remote1})
	}
	if got := d.sessions()[0].written(); !slices.Equal(got, want) {
		t.Errorf("flushed %v, want %v in order", got, want)
	}
	st := tbl.Stats()
	if st.PacketsUp.Load() != pendingMax || st.Dropped.Load() != extra {
		t.Errorf("stats: up %d dropped %d, want %d %d", st.PacketsUp.Load(), st.Dropped.Load(), pendingMax, extra)
	}
}

// A datagram the app sends while the queued ones are being flushed must not
// overtake them: the first datagrams of a flow leave in the order sent.
func TestUDPQueuedDatagramsNotOvertaken(t *testing.T) {
	leakcheck.Check(t)
	var tbl *UDPTable
	lateDone := make(chan struct{})
	d := &fakeDialer{name: "slow", gate: make(chan struct{})}
	d.onWrite = func(n int) {
		if n != 1 {
			return
		}
		// The first queued datagram is going out: the app sends another.
		go func() {
			defer close(lateDone)
			tbl.Handle(appSrc, remote1, []byte("late"))
		}()
		select {
		case <-lateDone:
		case <-time.After(300 * time.Millisecond):
		}
	}
	tbl, _ = newUDPTable(t, longUDPConfig(), routeTo(d))

	for _, p := range []string{"q0", "q1", "q2"} {
		tbl.Handle(appSrc, remote1, []byte(p))
	}
	close(d.gate)
	waitFor(t, 2*time.Second, "four datagrams written", func() bool {
		s := d.sessions()
		return len(s) == 1 && len(s[0].written()) == 4
	})
	<-lateDone
	var got []string
	for _, w := range d.sessions()[0].written() {
		got = append(got, w.payload)
	}
	if want := []string{"q0", "q1", "q2", "late"}; !slices.Equal(got, want) {
		t.Errorf("upstream got %q, want %q: a datagram sent during the flush overtook queued ones", got, want)
	}
}

// A mapping that expires while its upstream session is still opening must
// not leave the open running: with a proxy that never answers, every such
// mapping would otherwise keep a goroutine (and a proxy handshake) until
// the table closes, and the app's next datagram starts yet another.
func TestUDPExpiryCancelsPendingOpen(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "hung", gate: make(chan struct{})} // never released
	tbl, _ := newUDPTable(t, UDPConfig{IdleTimeout: 200 * time.Millisecond, DNSIdleTimeout: time.Minute, MaxSessions: 8}, routeTo(d))

	tbl.Handle(appSrc, remote1, []byte("x"))
	waitFor(t, 2*time.Second, "the mapping to expire", func() bool { return tbl.Len() == 0 })
	if got := tbl.Stats().Expired.Load(); got != 1 {
		t.Errorf("Stats().Expired = %d, want 1", got)
	}
	waitFor(t, 2*time.Second, "ListenUDP of the expired mapping to return (its ctx cancelled)", func() bool {
		_, returned := d.listenCount()
		return returned == 1
	})
}

// Datagrams held for a mapping that expires before its session opens are
// lost: they must show in Stats().Dropped, and the late session is closed.
func TestUDPExpiredWhileOpeningCountsHeldDatagrams(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "slow", gate: make(chan struct{})}
	tbl, _ := newUDPTable(t, UDPConfig{IdleTimeout: 200 * time.Millisecond, DNSIdleTimeout: time.Minute, MaxSessions: 8}, routeTo(d))

	for i := range 3 {
		tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
	}
	waitFor(t, 2*time.Second, "the mapping to expire", func() bool { return tbl.Len() == 0 })
	close(d.gate)
	waitFor(t, 2*time.Second, "ListenUDP to return", func() bool {
		_, returned := d.listenCount()
		return returned == 1
	})
	// The session either never opened (ctx cancelled) or was closed unused.
	waitFor(t, 2*time.Second, "the late session closed", func() bool {
		for _, s := range d.sessions() {
			if s.closeCount() == 0 {
				return false
			}
		}
		return true
	})
	for _, s := range d.sessions() {
		if w := s.written(); len(w) != 0 {
			t.Errorf("expired mapping's session wrote %v", w)
		}
	}
	if got := tbl.Stats().Dropped.Load(); got != 3 {
		t.Errorf("Stats().Dropped = %d, want 3: the datagrams held for the expired mapping were lost", got)
	}
}

func TestUDPFailedOpen(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "flaky", listenErrs: []error{errors.New("proxy: udp associate refused")}}
	tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))

	tbl.Handle(appSrc, remote1, []byte("lost"))
	waitFor(t, 2*time.Second, "the failed mapping removed", func() bool {
		return tbl.Len() == 0 && tbl.Stats().Failed.Load() == 1
	})
	st := tbl.Stats()
	if st.Active.Load() != 0 || st.Dropped.Load() != 1 || st.PacketsUp.Load() != 0 {
		t.Errorf("stats after a failed open: active %d dropped %d up %d, want 0 1 0",
			st.Active.Load(), st.Dropped.Load(), st.PacketsUp.Load())
	}

	tbl.Handle(appSrc, remote1, []byte("retry"))
	waitFor(t, 2*time.Second, "a new session with the retried datagram", func() bool {
		s := d.sessions()
		return len(s) == 1 && len(s[0].written()) == 1
	})
	if n, _ := d.listenCount(); n != 2 {
		t.Errorf("ListenUDP called %d times, want 2 (the failure, then the retry)", n)
	}
	if got, want := d.sessions()[0].written(), []fakeDatagram{{"retry", remote1}}; !slices.Equal(got, want) {
		t.Errorf("retry session wrote %v, want %v", got, want)
	}
	if got := tbl.Len(); got != 1 {
		t.Errorf("Len() = %d, want 1", got)
	}
}

func TestUDPReject(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	blocked := ap("10.233.1.9:443")
	tbl, _ := newUDPTable(t, longUDPConfig(), func(f *Flow) outbound.Dialer {
		if f.Dst == blocked {
			return reject.New("block")
		}
		return d
	})

	if tbl.Handle(appSrc, blocked, []byte("x")) {
		t.Errorf("Handle(%s, %s) to a reject outbound = true, want false", appSrc, blocked)
	}
	if got := tbl.Len(); got != 0 {
		t.Errorf("Len() = %d after a rejected datagram, want 0", got)
	}
	if !tbl.Handle(appSrc, remote1, []byte("y")) {
		t.Errorf("Handle(%s, %s) to an allowed destination = false, want true", appSrc, remote1)
	}
	if got := tbl.Stats().Opened.Load(); got != 1 {
		t.Errorf("Stats().Opened = %d, want 1 (only the allowed destination)", got)
	}
}

// Many senders, many sources, mappings expiring and the cap reached all at
// once, then Close: no race, nothing left open, nothing left running.
func TestUDPConcurrentHandleExpireClose(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "echo", echo: true}
	rec := &replyRecorder{}
	cfg := UDPConfig{IdleTimeout: 50 * time.Millisecond, DNSIdleTimeout: 50 * time.Millisecond, MaxSessions: 20}
	tbl, err := NewUDPTable(cfg, routeTo(d), rec.reply, nil)
	if err != nil {
		t.Fatalf("NewUDPTable: %v", err)
	}

	const senders, perSender, sources = 16, 500, 64
	var wg sync.WaitGroup
	for g := range senders {
		wg.Go(func() {
			for i := range perSender {
				// Sources move on in phases, so earlier ones go quiet
				// and expire while later ones are busy.
				phase := i / 100
				src := netip.AddrPortFrom(appSrc.Addr(), uint16(41000+(phase*13+(g+i)%13)%sources))
				dst := netip.AddrPortFrom(remote1.Addr(), uint16(9000+i%5))
				if i%3 == 0 {
					dst = netip.AddrPortFrom(remote1.Addr(), 53)
				}
				tbl.Handle(src, dst, fmt.Appendf(nil, "%d/%d", g, i))
				if i%25 == 0 {
					time.Sleep(10 * time.Millisecond)
				}
			}
		})
	}
	wg.Wait()
	waitFor(t, 2*time.Second, "some mapping to expire", func() bool { return tbl.Stats().Expired.Load() > 0 })

	closeWithin(t, tbl, 5*time.Second)
	if got := tbl.Len(); got != 0 {
		t.Errorf("Len() = %d after Close, want 0", got)
	}
	st := tbl.Stats()
	if got := st.Active.Load(); got != 0 {
		t.Errorf("Stats().Active = %d after Close, want 0", got)
	}
	entered, returned := d.listenCount()
	if entered != returned || uint64(entered) != st.Opened.Load() {
		t.Errorf("ListenUDP entered %d returned %d, Stats().Opened %d: want all equal", entered, returned, st.Opened.Load())
	}
	for i, s := range d.sessions() {
		if s.closeCount() == 0 {
			t.Errorf("upstream session %d (towards %s) left open after Close", i, s.first)
		}
	}
	if tbl.Handle(appSrc, remote1, []byte("late")) {
		t.Errorf("Handle after Close = true, want false")
	}
	t.Logf("opened %d expired %d over cap %d up %d down %d dropped %d",
		st.Opened.Load(), st.Expired.Load(), st.RefusedOverCap.Load(), st.PacketsUp.Load(), st.PacketsDown.Load(), st.Dropped.Load())
	if st.PacketsDown.Load() == 0 || st.RefusedOverCap.Load() == 0 {
		t.Errorf("the read path or the cap was not exercised: the test load is too light")
	}
}

func TestUDPCloseIsIdempotent(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
	tbl.Handle(appSrc, remote1, []byte("x"))
	waitFor(t, 2*time.Second, "the session opened", func() bool { return len(d.sessions()) == 1 })

	closeWithin(t, tbl, 2*time.Second)
	closeWithin(t, tbl, 2*time.Second)
	if got := d.sessions()[0].closeCount(); got != 1 {
		t.Errorf("upstream session closed %d times, want 1", got)
	}
	if tbl.Handle(appSrc, remote1, []byte("y")) {
		t.Errorf("Handle after Close = true, want false")
	}
	if got := tbl.Len(); got != 0 {
		t.Errorf("Len() = %d after Close, want 0", got)
	}
	if n, _ := d.listenCount(); n != 1 {
		t.Errorf("ListenUDP called %d times, want 1: Handle after Close opened a session", n)
	}
}

// Close does not wait for an upstream session that is still opening: it
// cancels it.
func TestUDPCloseCancelsOpen(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "hung", gate: make(chan struct{})} // never released
	tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
	tbl.Handle(appSrc, remote1, []byte("x"))
	waitFor(t, 2*time.Second, "ListenUDP entered", func() bool { n, _ := d.listenCount(); return n == 1 })

	closeWithin(t, tbl, 2*time.Second)
	if got := tbl.Len(); got != 0 {
		t.Errorf("Len() = %d after Close, want 0", got)
	}
}

// TestUDPUnreachableRemoteKeepsMapping: an ICMP error from one remote
// (ReadPacket's *outbound.UnreachableError) does not end the mapping:
// replies from the others still reach the app, and the app's next
// datagram goes out on the same session.
func TestUDPUnreachableRemoteKeepsMapping(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	tbl, rec := newUDPTable(t, longUDPConfig(), routeTo(d))
	if !tbl.Handle(appSrc, remote1, []byte("to-1")) {
		t.Fatalf("Handle(%s, %s): refused", appSrc, remote1)
	}
	waitFor(t, 2*time.Second, "one session", func() bool { return len(d.sessions()) == 1 })
	sess := d.sessions()[0]
	sess.inErr <- &outbound.UnreachableError{From: remote1, Err: syscall.ECONNREFUSED}
	sess.inject(t, remote2, "from-2")
	waitFor(t, 2*time.Second, "the reply from the other remote at the app", func() bool { return len(rec.received()) == 1 })
	if got, want := rec.received()[0], (appDatagram{"from-2", remote2, appSrc}); got != want {
		t.Errorf("app received %v, want %v", got, want)
	}
	if !tbl.Handle(appSrc, remote2, []byte("to-2")) {
		t.Fatalf("Handle(%s, %s): refused", appSrc, remote2)
	}
	waitFor(t, 2*time.Second, "the second datagram on the same session", func() bool { return len(sess.written()) == 2 })
	if n, _ := d.listenCount(); n != 1 || sess.closeCount() != 0 {
		t.Errorf("ListenUDP called %d times, session closed %d times; want 1 and 0", n, sess.closeCount())
	}
}
