package forwarder

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/leakcheck"
	"github.com/tungate/tungate/outbound"
)

// sentDatagram is one datagram a batchConn was handed.
type sentDatagram struct {
	payload string
	dst     outbound.Target
	batched bool // by WriteBatch, not WritePacket
	sent    bool // reported sent (WritePacket always is)
}

func (d sentDatagram) String() string {
	return fmt.Sprintf("%q@%s(%s) batched=%v sent=%v", d.payload, d.dst.Addr, d.dst.Domain, d.batched, d.sent)
}

var errShortBatch = errors.New("batchConn: short write")

// batchConn is an outbound.PacketConn that is also an
// outbound.BatchWriter. Like the real one, WriteBatch never waits. It
// records every call and every datagram it is handed, in order.
type batchConn struct {
	first outbound.Target
	// short makes each WriteBatch report its last short datagrams (all of
	// a smaller batch) as not sent.
	short int
	// onPacket, when set, is called after the n-th WritePacket (from 1)
	// is recorded.
	onPacket func(n int)

	closed    chan struct{}
	closeOnce sync.Once

	mu      sync.Mutex
	batches []int // sizes of the WriteBatch calls, in order
	log     []sentDatagram
	packets int // WritePacket calls
	closes  int
}

var _ outbound.BatchWriter = (*batchConn)(nil)

func (c *batchConn) WriteBatch(ds []outbound.Datagram) (int, error) {
	isClosed := false
	select {
	case <-c.closed:
		isClosed = true
	default:
	}
	sent := max(len(ds)-c.short, 0)
	if isClosed {
		sent = 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.batches = append(c.batches, len(ds))
	for i, d := range ds { // ds is the table's, reused after we return
		c.log = append(c.log, sentDatagram{payload: string(d.Payload), dst: d.Dst, batched: true, sent: i < sent})
	}
	switch {
	case isClosed:
		return 0, errClosed
	case sent < len(ds):
		return sent, errShortBatch
	}
	return sent, nil
}

func (c *batchConn) WritePacket(b []byte, dst outbound.Target) error {
	select {
	case <-c.closed:
		return errClosed
	default:
	}
	c.mu.Lock()
	c.log = append(c.log, sentDatagram{payload: string(b), dst: dst, sent: true})
	c.packets++
	n, hook := c.packets, c.onPacket
	c.mu.Unlock()
	if hook != nil {
		hook(n)
	}
	return nil
}

func (c *batchConn) ReadPacket([]byte) (int, netip.AddrPort, error) {
	<-c.closed
	return 0, netip.AddrPort{}, errClosed
}

func (c *batchConn) Close() error {
	c.mu.Lock()
	c.closes++
	c.mu.Unlock()
	c.closeOnce.Do(func() { close(c.closed) })
	return nil
}

// batchMark is a point in a batchConn's record.
type batchMark struct{ batches, log int }

func (c *batchConn) mark() batchMark {
	c.mu.Lock()
	defer c.mu.Unlock()
	return batchMark{len(c.batches), len(c.log)}
}

// since returns copies of the batch sizes and the datagrams recorded after m.
func (c *batchConn) since(m batchMark) (batches []int, log []sentDatagram) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.batches[m.batches:]), slices.Clone(c.log[m.log:])
}

func (c *batchConn) closeCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closes
}

// batchDialer opens a batchConn per session.
type batchDialer struct {
	short    int
	onPacket func(n int)
	// gate, when not nil, holds ListenUDP until it is closed or ctx ends.
	gate chan struct{}

	mu      sync.Mutex
	listens int
	conns   []*batchConn
}

func (d *batchDialer) Name() string { return "batch" }

func (d *batchDialer) DialTCP(context.Context, outbound.Target) (outbound.TCPConn, error) {
	return nil, errors.New("batchDialer: no TCP")
}

func (d *batchDialer) ListenUDP(ctx context.Context, first outbound.Target) (outbound.PacketConn, error) {
	d.mu.Lock()
	d.listens++
	d.mu.Unlock()
	if d.gate != nil {
		select {
		case <-d.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	c := &batchConn{first: first, short: d.short, onPacket: d.onPacket, closed: make(chan struct{})}
	d.mu.Lock()
	d.conns = append(d.conns, c)
	d.mu.Unlock()
	return c, nil
}

func (d *batchDialer) listenCount() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.listens
}

func (d *batchDialer) sessions() []*batchConn {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.conns)
}

// sessionFor returns the session opened towards first, or nil.
func (d *batchDialer) sessionFor(first netip.AddrPort) *batchConn {
	for _, c := range d.sessions() {
		if c.first.Addr == first {
			return c
		}
	}
	return nil
}

// openBatchSession sends a first datagram from src to first and flushes
// until it is at the upstream (by WritePacket if it was held while the
// session opened, by WriteBatch otherwise): from then on the session is
// open, and what Handle gets for it is held for Flush.
func openBatchSession(t *testing.T, tbl *UDPTable, d *batchDialer, src, first netip.AddrPort) *batchConn {
	t.Helper()
	if !tbl.Handle(src, first, []byte("open")) {
		t.Fatalf("Handle(%s, %s): refused", src, first)
	}
	var c *batchConn
	waitFor(t, 2*time.Second, "the first datagram at the upstream", func() bool {
		tbl.Flush()
		c = d.sessionFor(first)
		if c == nil {
			return false
		}
		_, log := c.since(batchMark{})
		return len(log) == 1
	})
	return c
}

// noCallsWhile is how long a test lets go by before it checks that
// something did not happen. Absence cannot be waited for; this only gives
// a wrongly asynchronous send the time to show.
const noCallsWhile = 20 * time.Millisecond

func payloadsOf(log []sentDatagram) []string {
	var p []string
	for _, d := range log {
		p = append(p, d.payload)
	}
	return p
}

func numbered(from, to int) []string {
	var p []string
	for i := from; i < to; i++ {
		p = append(p, strconv.Itoa(i))
	}
	return p
}

// statsMark is a point in a table's PacketsUp and Dropped counters.
type statsMark struct{ up, dropped uint64 }

func markStats(tbl *UDPTable) statsMark {
	st := tbl.Stats()
	return statsMark{st.PacketsUp.Load(), st.Dropped.Load()}
}

// checkStatsSince fails t unless PacketsUp and Dropped grew by up and
// dropped since m.
func checkStatsSince(t *testing.T, tbl *UDPTable, m statsMark, up, dropped uint64) {
	t.Helper()
	now := markStats(tbl)
	if now.up-m.up != up || now.dropped-m.dropped != dropped {
		t.Errorf("Stats: PacketsUp +%d Dropped +%d, want +%d +%d", now.up-m.up, now.dropped-m.dropped, up, dropped)
	}
}

// TestUDPBatchHeldUntilFlush: datagrams for an open session whose
// upstream batches stay with the table until Flush, which sends them in
// one WriteBatch, in order, each with its destination and the name
// behind it; a Flush with nothing held sends nothing.
func TestUDPBatchHeldUntilFlush(t *testing.T) {
	leakcheck.Check(t)
	d := &batchDialer{}
	cfg := longUDPConfig()
	cfg.Names = func(a netip.Addr) (string, bool) {
		if a == remote2.Addr() {
			return "two.example", true
		}
		return "", false
	}
	route := func(f *Flow) outbound.Dialer {
		f.Domain = "one.example" // the name behind the first destination
		return d
	}
	tbl, _ := newUDPTable(t, cfg, route)
	c := openBatchSession(t, tbl, d, appSrc, remote1)
	m, sm := c.mark(), markStats(tbl)

	domain := map[netip.AddrPort]string{remote1: "one.example", remote2: "two.example", remote3: ""}
	dsts := []netip.AddrPort{remote1, remote2, remote3}
	const n = 10
	var want []sentDatagram
	for i := range n {
		dst := dsts[i%len(dsts)]
		if !tbl.Handle(appSrc, dst, []byte(strconv.Itoa(i))) {
			t.Fatalf("Handle(%s, %s): refused", appSrc, dst)
		}
		want = append(want, sentDatagram{payload: strconv.Itoa(i), dst: outbound.Target{Addr: dst, Domain: domain[dst]}, batched: true, sent: true})
	}
	time.Sleep(noCallsWhile)
	if batches, log := c.since(m); len(batches) != 0 || len(log) != 0 {
		t.Fatalf("before Flush the upstream got batches %v, datagrams %v; want nothing", batches, log)
	}
	checkStatsSince(t, tbl, sm, 0, 0)

	tbl.Flush()
	batches, log := c.since(m)
	if !slices.Equal(batches, []int{n}) {
		t.Fatalf("after Flush WriteBatch calls %v, want one of %d", batches, n)
	}
	if !slices.Equal(log, want) {
		t.Errorf("the upstream got\n%v\nwant\n%v", log, want)
	}
	checkStatsSince(t, tbl, sm, n, 0)

	tbl.Flush()
	if batches, _ := c.since(m); len(batches) != 1 {
		t.Errorf("a Flush with nothing held made WriteBatch calls: %v", batches)
	}
}

// TestUDPBatchFull: a session's 64th held datagram sends the batch at
// once, from Handle, without waiting for Flush; Flush sends the rest.
func TestUDPBatchFull(t *testing.T) {
	leakcheck.Check(t)
	d := &batchDialer{}
	tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
	c := openBatchSession(t, tbl, d, appSrc, remote1)
	m, sm := c.mark(), markStats(tbl)

	// 64: what one sendmmsg of UDP_SEGMENT runs carries.
	const total, full = 150, 64
	for i := range total {
		tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
		if batches, _ := c.since(m); len(batches) != (i+1)/full {
			t.Fatalf("after %d datagrams WriteBatch calls %v, want %d full ones", i+1, batches, (i+1)/full)
		}
	}
	time.Sleep(noCallsWhile)
	if batches, _ := c.since(m); !slices.Equal(batches, []int{full, full}) {
		t.Fatalf("without Flush WriteBatch calls %v, want [64 64]", batches)
	}
	tbl.Flush()
	batches, log := c.since(m)
	if !slices.Equal(batches, []int{full, full, total - 2*full}) {
		t.Errorf("WriteBatch calls %v, want [64 64 %d]", batches, total-2*full)
	}
	if got, want := payloadsOf(log), numbered(0, total); !slices.Equal(got, want) {
		t.Errorf("the upstream got %q, want %q in order", got, want)
	}
	for _, dg := range log {
		if !dg.batched || dg.dst != (outbound.Target{Addr: remote1}) {
			t.Fatalf("datagram %v: want it batched, to %s", dg, remote1)
		}
	}
	checkStatsSince(t, tbl, sm, total, 0)
}

// TestUDPBatchShortWrites: what WriteBatch reports unsent counts as
// dropped, the rest as sent.
func TestUDPBatchShortWrites(t *testing.T) {
	leakcheck.Check(t)
	const short = 3
	d := &batchDialer{short: short}
	tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
	c := openBatchSession(t, tbl, d, appSrc, remote1)
	m, sm := c.mark(), markStats(tbl)

	for i := range 150 { // 64 + 64 from Handle, 22 from Flush
		tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
	}
	tbl.Flush()
	for i := 150; i < 152; i++ { // a batch smaller than short: none sent
		tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
	}
	tbl.Flush()

	batches, log := c.since(m)
	if want := []int{64, 64, 22, 2}; !slices.Equal(batches, want) {
		t.Fatalf("WriteBatch calls %v, want %v", batches, want)
	}
	if got, want := payloadsOf(log), numbered(0, 152); !slices.Equal(got, want) {
		t.Errorf("the upstream was handed %q, want %q in order", got, want)
	}
	var sent uint64
	for _, dg := range log {
		if dg.sent {
			sent++
		}
	}
	const dropped = 3*short + 2
	if sent != 152-dropped {
		t.Fatalf("the fake reported %d sent, want %d: the test is wrong", sent, 152-dropped)
	}
	checkStatsSince(t, tbl, sm, sent, dropped)
}

// TestUDPBatchHeldAtClose: datagrams still held when their session ends
// (the table closes, the mapping expires) never reach the upstream and
// count as dropped; a Flush afterwards does nothing.
func TestUDPBatchHeldAtClose(t *testing.T) {
	const held = 5
	t.Run("close", func(t *testing.T) {
		leakcheck.Check(t)
		d := &batchDialer{}
		tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
		c := openBatchSession(t, tbl, d, appSrc, remote1)
		m, sm := c.mark(), markStats(tbl)
		for i := range held {
			tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
		}
		closeWithin(t, tbl, 2*time.Second)
		checkStatsSince(t, tbl, sm, 0, held)
		if c.closeCount() != 1 {
			t.Errorf("upstream session closed %d times, want 1", c.closeCount())
		}
		tbl.Flush()
		if tbl.Handle(appSrc, remote1, []byte("late")) {
			t.Errorf("Handle after Close = true, want false")
		}
		tbl.Flush()
		if batches, log := c.since(m); len(batches) != 0 || len(log) != 0 {
			t.Errorf("the upstream got batches %v, datagrams %v after Close; want nothing", batches, log)
		}
		checkStatsSince(t, tbl, sm, 0, held)
	})

	t.Run("expiry", func(t *testing.T) {
		leakcheck.Check(t)
		d := &batchDialer{}
		tbl, _ := newUDPTable(t, UDPConfig{IdleTimeout: 300 * time.Millisecond, DNSIdleTimeout: time.Minute, MaxSessions: 8}, routeTo(d))
		c := openBatchSession(t, tbl, d, appSrc, remote1)
		m, sm := c.mark(), markStats(tbl)
		for i := range held {
			tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
		}
		waitFor(t, 2*time.Second, "the mapping to expire", func() bool { return tbl.Len() == 0 })
		if got := tbl.Stats().Expired.Load(); got != 1 {
			t.Errorf("Stats().Expired = %d, want 1", got)
		}
		checkStatsSince(t, tbl, sm, 0, held)
		waitFor(t, time.Second, "the expired session's conn closed", func() bool { return c.closeCount() > 0 })
		tbl.Flush()
		if batches, log := c.since(m); len(batches) != 0 || len(log) != 0 {
			t.Errorf("the upstream got batches %v, datagrams %v after expiry; want nothing", batches, log)
		}
		checkStatsSince(t, tbl, sm, 0, held)
	})
}

// TestUDPBatchHeldWhileOpeningGoFirst: the datagrams held while the
// session opened go out by WritePacket, in order, before any batched one.
func TestUDPBatchHeldWhileOpeningGoFirst(t *testing.T) {
	held := []string{"q0", "q1", "q2", "q3", "q4"}

	// checkOrder fails t unless log has held then later, in order, with
	// every WritePacket before every WriteBatch and held all by WritePacket.
	checkOrder := func(t *testing.T, log []sentDatagram, later []string) {
		t.Helper()
		if got, want := payloadsOf(log), append(slices.Clone(held), later...); !slices.Equal(got, want) {
			t.Fatalf("the upstream got %q, want %q", got, want)
		}
		for i, dg := range log {
			if i < len(held) && dg.batched {
				t.Errorf("datagram %v held while the session opened went out by WriteBatch", dg)
			}
			if i > 0 && log[i-1].batched && !dg.batched {
				t.Errorf("datagram %v went out by WritePacket after batched %v", dg, log[i-1])
			}
			if !dg.sent {
				t.Errorf("datagram %v not sent", dg)
			}
		}
	}

	t.Run("after open", func(t *testing.T) {
		leakcheck.Check(t)
		d := &batchDialer{gate: make(chan struct{})}
		tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
		for _, p := range held {
			tbl.Handle(appSrc, remote1, []byte(p))
		}
		waitFor(t, 2*time.Second, "ListenUDP entered", func() bool { return d.listenCount() == 1 })
		tbl.Flush() // nothing to send yet
		close(d.gate)
		var c *batchConn
		waitFor(t, 2*time.Second, "the held datagrams at the upstream", func() bool {
			c = d.sessionFor(remote1)
			if c == nil {
				return false
			}
			_, log := c.since(batchMark{})
			return len(log) == len(held)
		})
		later := []string{"b0", "b1", "b2"}
		for _, p := range later {
			tbl.Handle(appSrc, remote1, []byte(p))
		}
		time.Sleep(noCallsWhile)
		if batches, _ := c.since(batchMark{}); len(batches) != 0 {
			t.Fatalf("WriteBatch calls %v before Flush", batches)
		}
		tbl.Flush()
		batches, log := c.since(batchMark{})
		if !slices.Equal(batches, []int{len(later)}) {
			t.Errorf("WriteBatch calls %v, want one of %d", batches, len(later))
		}
		checkOrder(t, log, later)
		checkStatsSince(t, tbl, statsMark{}, uint64(len(held)+len(later)), 0)
	})

	// Datagrams sent and flushed while the session opens, some held with
	// the first ones, some batched: none overtakes another.
	t.Run("racing open", func(t *testing.T) {
		leakcheck.Check(t)
		d := &batchDialer{gate: make(chan struct{})}
		tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
		for _, p := range held {
			tbl.Handle(appSrc, remote1, []byte(p))
		}
		close(d.gate)
		later := numbered(0, 20)
		for i, p := range later {
			tbl.Handle(appSrc, remote1, []byte(p))
			if i%4 == 3 {
				tbl.Flush()
			}
		}
		var c *batchConn
		waitFor(t, 2*time.Second, "every datagram at the upstream", func() bool {
			tbl.Flush()
			c = d.sessionFor(remote1)
			if c == nil {
				return false
			}
			_, log := c.since(batchMark{})
			return len(log) >= len(held)+len(later)
		})
		_, log := c.since(batchMark{})
		checkOrder(t, log, later)
		checkStatsSince(t, tbl, statsMark{}, uint64(len(held)+len(later)), 0)
	})

	// A datagram the app sends while the held ones are being written
	// waits for them, then is batched.
	t.Run("during the held writes", func(t *testing.T) {
		leakcheck.Check(t)
		var tbl *UDPTable
		lateDone := make(chan struct{})
		d := &batchDialer{gate: make(chan struct{})}
		d.onPacket = func(n int) {
			if n != 1 {
				return
			}
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
		for _, p := range held {
			tbl.Handle(appSrc, remote1, []byte(p))
		}
		close(d.gate)
		select {
		case <-lateDone:
		case <-time.After(2 * time.Second):
			t.Fatal("the late datagram's Handle did not return")
		}
		tbl.Flush()
		c := d.sessionFor(remote1)
		_, log := c.since(batchMark{})
		checkOrder(t, log, []string{"late"})
	})
}

// TestUDPBatchConcurrentFlush: senders on several sources, a Flush loop
// and Close, all at once: every datagram Handle took is counted exactly
// once, as sent (what the upstream reported sent) or dropped, none is
// handed to the upstream twice or out of order, and nothing is left
// running.
func TestUDPBatchConcurrentFlush(t *testing.T) {
	for _, closeEarly := range []bool{false, true} {
		name := "flush then close"
		if closeEarly {
			name = "close while busy"
		}
		t.Run(name, func(t *testing.T) {
			leakcheck.Check(t)
			d := &batchDialer{}
			if closeEarly {
				d.short = 1 // short writes too
			}
			tbl, err := NewUDPTable(longUDPConfig(), routeTo(d), (&replyRecorder{}).reply, nil)
			if err != nil {
				t.Fatal(err)
			}

			const senders, perSender = 8, 2000
			var handled atomic.Uint64
			var senderWG, flusherWG sync.WaitGroup
			stop := make(chan struct{})
			flusherWG.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					tbl.Flush()
				}
			})
			for g := range senders {
				senderWG.Go(func() {
					src := netip.AddrPortFrom(appSrc.Addr(), uint16(41000+g))
					first := netip.AddrPortFrom(remote1.Addr(), uint16(9100+g))
					for i := range perSender {
						if i == 1 {
							// Most go to the open session: while it
							// opens, those past pendingMax are dropped.
							for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
								if c := d.sessionFor(first); c != nil && c.mark().log > 0 {
									break
								}
							}
						}
						dst := first
						if i%3 == 2 {
							dst = remote2
						}
						if tbl.Handle(src, dst, fmt.Appendf(nil, "%d/%d", g, i)) {
							handled.Add(1)
						}
					}
				})
			}
			if closeEarly {
				waitFor(t, 5*time.Second, "a quarter of the datagrams handled", func() bool {
					return handled.Load() >= senders*perSender/4
				})
				closeWithin(t, tbl, 5*time.Second)
			}
			senderWG.Wait()
			close(stop)
			flusherWG.Wait()
			if !closeEarly {
				tbl.Flush()
			}

			// accounted checks the counters against Handle and the fakes.
			accounted := func(when string) {
				t.Helper()
				st := tbl.Stats()
				up, dropped := st.PacketsUp.Load(), st.Dropped.Load()
				if up+dropped != handled.Load() {
					t.Errorf("%s: PacketsUp %d + Dropped %d = %d, want the %d datagrams handled", when, up, dropped, up+dropped, handled.Load())
				}
				var sent uint64
				for _, c := range d.sessions() {
					_, log := c.since(batchMark{})
					for _, dg := range log {
						if dg.sent {
							sent++
						}
					}
				}
				if up != sent {
					t.Errorf("%s: PacketsUp %d, the upstream reported %d sent", when, up, sent)
				}
			}
			accounted("before Close")
			closeWithin(t, tbl, 5*time.Second)
			accounted("after Close")
			tbl.Flush()
			accounted("after a Flush after Close")

			if got := len(d.sessions()); got != d.listenCount() {
				t.Errorf("%d sessions opened of %d ListenUDP calls", got, d.listenCount())
			}
			for _, c := range d.sessions() {
				if c.closeCount() == 0 {
					t.Errorf("upstream session towards %s left open after Close", c.first.Addr)
				}
				_, log := c.since(batchMark{})
				g, last := -1, -1
				for _, dg := range log {
					gs, is, _ := strings.Cut(dg.payload, "/")
					dgG, _ := strconv.Atoi(gs)
					dgI, _ := strconv.Atoi(is)
					if g == -1 {
						g = dgG
					}
					if dgG != g || dgI <= last {
						t.Fatalf("session towards %s: %q after sender %d's datagram %d: mixed up, repeated or out of order", c.first.Addr, dg.payload, g, last)
					}
					last = dgI
				}
			}
			st := tbl.Stats()
			t.Logf("handled %d: up %d dropped %d, %d sessions", handled.Load(), st.PacketsUp.Load(), st.Dropped.Load(), len(d.sessions()))
			if !closeEarly && st.PacketsUp.Load() < handled.Load()/2 {
				t.Errorf("most datagrams were not sent: the test exercises drops, not sends")
			}
		})
	}
}

// TestUDPFullBatchRacingFlush: a session's batch filling up while a Flush
// that has already taken it off the dirty list waits for a send in
// progress (another Flush caller's, say) must leave the session able to
// be listed again: a datagram held afterwards goes out with the next
// Flush, not when 63 more have come. White-box: the test holds the
// session's sendMu as that other send.
func TestUDPFullBatchRacingFlush(t *testing.T) {
	leakcheck.Check(t)
	d := &batchDialer{}
	tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
	c := openBatchSession(t, tbl, d, appSrc, remote1)
	m, sm := c.mark(), markStats(tbl)
	tbl.mu.Lock()
	s := tbl.sessions[udpKey{src: appSrc}]
	tbl.mu.Unlock()
	sessionState := func() (dirty bool, held int) {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.dirty, len(s.batch)
	}

	for i := range 63 {
		tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
	}
	s.sendMu.Lock() // a send in progress
	flushed, handled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(flushed)
		tbl.Flush()
	}()
	waitFor(t, 2*time.Second, "Flush to take the session off the dirty list", func() bool {
		dirty, _ := sessionState()
		return !dirty
	})
	go func() {
		defer close(handled)
		tbl.Handle(appSrc, remote1, []byte("63"))
	}()
	waitFor(t, 2*time.Second, "the 64th datagram held", func() bool {
		_, held := sessionState()
		return held == 64
	})
	s.sendMu.Unlock()
	for _, ch := range []chan struct{}{flushed, handled} {
		select {
		case <-ch:
		case <-time.After(2 * time.Second):
			t.Fatal("Flush or Handle did not return")
		}
	}
	if batches, _ := c.since(m); !slices.Equal(batches, []int{64}) {
		t.Fatalf("WriteBatch calls %v, want [64]", batches)
	}

	tbl.Handle(appSrc, remote1, []byte("64"))
	tbl.Flush()
	batches, log := c.since(m)
	if !slices.Equal(batches, []int{64, 1}) {
		t.Errorf("WriteBatch calls %v, want [64 1]: the datagram after the full batch stayed held through Flush", batches)
	}
	if got, want := payloadsOf(log), numbered(0, 65); !slices.Equal(got, want) {
		t.Errorf("the upstream got %q, want %q", got, want)
	}
	checkStatsSince(t, tbl, sm, uint64(len(log)), 0)
}

// TestUDPNonBatchConnUsesSendLoop: a conn that cannot batch still gets
// every datagram by WritePacket, from the session's sender, with no Flush.
func TestUDPNonBatchConnUsesSendLoop(t *testing.T) {
	leakcheck.Check(t)
	if _, ok := any(&fakePacketConn{}).(outbound.BatchWriter); ok {
		t.Fatal("fakePacketConn is a BatchWriter: the test proves nothing")
	}
	d := &fakeDialer{name: "fake"}
	tbl, _ := newUDPTable(t, longUDPConfig(), routeTo(d))
	// Open the session first: what Handle gets while it opens is written
	// by the opening, not by the sender.
	tbl.Handle(appSrc, remote1, []byte("open"))
	waitFor(t, 2*time.Second, "the session opened", func() bool {
		s := d.sessions()
		return len(s) == 1 && len(s[0].written()) == 1
	})
	const n = 20
	want := []fakeDatagram{{"open", remote1}}
	for i := range n {
		tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
		want = append(want, fakeDatagram{strconv.Itoa(i), remote1})
	}
	waitFor(t, 2*time.Second, "every datagram at the upstream", func() bool {
		return len(d.sessions()[0].written()) == len(want)
	})
	if got := d.sessions()[0].written(); !slices.Equal(got, want) {
		t.Errorf("the upstream got %v, want %v in order", got, want)
	}
	checkStatsSince(t, tbl, statsMark{}, uint64(len(want)), 0)
}
