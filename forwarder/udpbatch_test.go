package forwarder

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"sync"
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
}

func (d sentDatagram) String() string {
	return fmt.Sprintf("%q@%s(%s)", d.payload, d.dst.Addr, d.dst.Domain)
}

var errShortBatch = errors.New("batchConn: short write")

// batchConn is an outbound.PacketConn that is also an
// outbound.BatchWriter. Its first WriteBatch waits until release is
// closed (or the conn is), so that what the table sends meanwhile queues
// up; it records every datagram and every batch's size.
type batchConn struct {
	release chan struct{}
	// short, when > 0, makes WriteBatch report that many datagrams of
	// each batch of more than one as not sent.
	short int

	closed    chan struct{}
	closeOnce sync.Once

	mu      sync.Mutex
	calls   int   // WriteBatch calls entered
	batches []int // sizes of the WriteBatch calls that returned
	log     []sentDatagram
	packets int // WritePacket calls
}

func newBatchConn(short int) *batchConn {
	return &batchConn{release: make(chan struct{}), short: short, closed: make(chan struct{})}
}

var _ outbound.BatchWriter = (*batchConn)(nil)

func (c *batchConn) WriteBatch(ds []outbound.Datagram) (int, error) {
	c.mu.Lock()
	c.calls++
	first := c.calls == 1
	c.mu.Unlock()
	if first {
		select {
		case <-c.release:
		case <-c.closed:
		}
	}
	select {
	case <-c.closed:
		return 0, errClosed
	default:
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, d := range ds { // ds is the sender's, reused after we return
		c.log = append(c.log, sentDatagram{payload: string(d.Payload), dst: d.Dst, batched: true})
	}
	c.batches = append(c.batches, len(ds))
	if sent := shortSent(len(ds), c.short); sent < len(ds) {
		return sent, errShortBatch
	}
	return len(ds), nil
}

// shortSent is what a batchConn with short reports sent of a batch of n.
func shortSent(n, short int) int {
	if n <= 1 {
		return n
	}
	return max(n-short, 0)
}

func (c *batchConn) WritePacket(b []byte, dst outbound.Target) error {
	select {
	case <-c.closed:
		return errClosed
	default:
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.log = append(c.log, sentDatagram{payload: string(b), dst: dst})
	c.packets++
	return nil
}

func (c *batchConn) ReadPacket([]byte) (int, netip.AddrPort, error) {
	<-c.closed
	return 0, netip.AddrPort{}, errClosed
}

func (c *batchConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return nil
}

// state returns WriteBatch calls entered, WritePacket calls, and copies of
// the batch sizes and the datagrams.
func (c *batchConn) state() (calls, packets int, batches []int, log []sentDatagram) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.calls, c.packets, append([]int(nil), c.batches...), append([]sentDatagram(nil), c.log...)
}

// batchDialer opens one session, on conn.
type batchDialer struct{ conn *batchConn }

func (d *batchDialer) Name() string { return "batch" }

func (d *batchDialer) DialTCP(context.Context, outbound.Target) (outbound.TCPConn, error) {
	return nil, errors.New("batchDialer: no TCP")
}

func (d *batchDialer) ListenUDP(context.Context, outbound.Target) (outbound.PacketConn, error) {
	return d.conn, nil
}

// TestUDPSendLoopBatches: datagrams that queue up while the upstream is
// busy leave in batches of up to sendBatchMax through WriteBatch, in
// order and with their names; what WriteBatch reports unsent is counted
// as dropped, the rest as sent.
func TestUDPSendLoopBatches(t *testing.T) {
	for _, tc := range []struct {
		name  string
		short int
	}{
		{"all sent", 0},
		{"short writes", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			conn := newBatchConn(tc.short)
			cfg := longUDPConfig()
			cfg.Names = func(a netip.Addr) (string, bool) { return "two.example", a == remote2.Addr() }
			route := func(f *Flow) outbound.Dialer {
				f.Domain = "one.example"
				return &batchDialer{conn: conn}
			}
			tbl, _ := newUDPTable(t, cfg, route)

			const total = 200 // more than 3 batches, less than sendQueueLen
			dst := func(i int) netip.AddrPort {
				if i%3 == 2 {
					return remote2
				}
				return remote1
			}
			// The first datagrams may be held while the session opens and
			// go out by WritePacket; send until the sender is in its first
			// WriteBatch, which holds it.
			next := 0
			for {
				tbl.Handle(appSrc, dst(next), []byte(strconv.Itoa(next)))
				next++
				waitFor(t, 2*time.Second, "the datagram at the upstream", func() bool {
					calls, packets, _, _ := conn.state()
					return calls+packets == next
				})
				if calls, _, _, _ := conn.state(); calls == 1 {
					break
				}
				if next > pendingMax {
					t.Fatalf("%d datagrams went out by WritePacket, none by WriteBatch", next)
				}
			}
			for ; next < total; next++ {
				tbl.Handle(appSrc, dst(next), []byte(strconv.Itoa(next)))
			}
			st := tbl.Stats()
			if calls, _, _, _ := conn.state(); calls != 1 || st.Dropped.Load() != 0 {
				t.Fatalf("while the first WriteBatch waits: %d calls, %d dropped; want 1 and 0", calls, st.Dropped.Load())
			}

			close(conn.release)
			waitFor(t, 2*time.Second, "every datagram counted as sent or dropped", func() bool {
				return st.PacketsUp.Load()+st.Dropped.Load() == total
			})
			_, packets, batches, log := conn.state()

			// In order, each with its destination and the name behind it.
			if len(log) != total {
				t.Fatalf("the upstream got %d datagrams, want %d", len(log), total)
			}
			for i, d := range log {
				want := sentDatagram{payload: strconv.Itoa(i), dst: outbound.Target{Addr: dst(i), Domain: "one.example"}, batched: i >= packets}
				if dst(i) == remote2 {
					want.dst.Domain = "two.example"
				}
				if d != want {
					t.Fatalf("datagram %d at the upstream: %v (batched %v), want %v (batched %v)", i, d, d.batched, want, want.batched)
				}
			}

			largest, dropped := 0, 0
			for _, n := range batches {
				largest = max(largest, n)
				dropped += n - shortSent(n, tc.short)
			}
			t.Logf("%d by WritePacket, batches %v", packets, batches)
			// 64: what one sendmmsg of UDP_SEGMENT runs carries. Far more
			// were queued when the first write returned: the sender must
			// have taken full batches.
			const maxBatch = 64
			if largest > maxBatch {
				t.Errorf("a batch of %d datagrams, want at most %d: %v", largest, maxBatch, batches)
			} else if largest != maxBatch {
				t.Errorf("largest batch %d, want %d with %d queued: %v", largest, maxBatch, total-packets-1, batches)
			}
			if tc.short > 0 && dropped == 0 {
				t.Fatal("no batch was reported short: the test proves nothing")
			}
			if up, dr := st.PacketsUp.Load(), st.Dropped.Load(); up != uint64(total-dropped) || dr != uint64(dropped) {
				t.Errorf("Stats: PacketsUp %d Dropped %d, want %d %d", up, dr, total-dropped, dropped)
			}
		})
	}
}

// TestUDPCloseWhileBatchWaits: closing the table while the sender waits
// in WriteBatch (for socket buffer space, say) ends the wait and the
// sender.
func TestUDPCloseWhileBatchWaits(t *testing.T) {
	leakcheck.Check(t)
	conn := newBatchConn(0)
	tbl, err := NewUDPTable(longUDPConfig(), routeTo(&batchDialer{conn: conn}), (&replyRecorder{}).reply, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
		waitFor(t, 2*time.Second, "the datagram at the upstream", func() bool {
			calls, packets, _, _ := conn.state()
			return calls+packets == i+1
		})
		if calls, _, _, _ := conn.state(); calls == 1 {
			break
		}
		if i > pendingMax {
			t.Fatalf("%d datagrams went out by WritePacket, none by WriteBatch", i+1)
		}
	}
	for i := range 10 {
		tbl.Handle(appSrc, remote1, []byte(strconv.Itoa(i)))
	}
	closeWithin(t, tbl, 2*time.Second)
	// The batch that waited failed, and its datagram counts as dropped.
	_, packets, _, _ := conn.state()
	st := tbl.Stats()
	if up, dr := st.PacketsUp.Load(), st.Dropped.Load(); up != uint64(packets) || dr < 1 {
		t.Errorf("Stats: PacketsUp %d Dropped %d, want %d and at least 1", up, dr, packets)
	}
}
