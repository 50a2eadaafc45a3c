package forwarder

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/leakcheck"
	"github.com/tungate/tungate/outbound"
)

// ioDeadline bounds every read and write of the test's own sockets, so a
// relay that stalls fails the test instead of hanging it.
const ioDeadline = 10 * time.Second

// appConn is the gateway's end of an app's TCP connection: a loopback
// socket whose Abort resets it, as the netstack endpoint's would.
type appConn struct{ *net.TCPConn }

func (c appConn) Abort() error {
	_ = c.SetLinger(0)
	return c.Close()
}

// fakeTCPFlow is an app's connection attempt whose Accept hands over the
// gateway's end of a loopback connection.
type fakeTCPFlow struct {
	src, dst  netip.AddrPort
	app       AppConn // nil: Accept fails
	accepts   atomic.Int32
	refuses   atomic.Int32
	refusedCh chan struct{}
	once      sync.Once
}

func newFakeTCPFlow(src, dst netip.AddrPort, app AppConn) *fakeTCPFlow {
	return &fakeTCPFlow{src: src, dst: dst, app: app, refusedCh: make(chan struct{})}
}

func (f *fakeTCPFlow) Src() netip.AddrPort { return f.src }
func (f *fakeTCPFlow) Dst() netip.AddrPort { return f.dst }

func (f *fakeTCPFlow) Accept() (AppConn, error) {
	f.accepts.Add(1)
	if f.app == nil {
		return nil, errors.New("fake flow: app went away")
	}
	return f.app, nil
}

func (f *fakeTCPFlow) Refuse() {
	f.refuses.Add(1)
	f.once.Do(func() { close(f.refusedCh) })
}

func addrPort(a net.Addr) netip.AddrPort { return a.(*net.TCPAddr).AddrPort() }

// listenLoopback returns a TCP listener on 127.0.0.1, closed at the end of
// the test.
func listenLoopback(t testing.TB) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("ListenTCP(127.0.0.1:0): %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// accept returns the next connection on ln, failing the test after 5 s.
func accept(t testing.TB, ln *net.TCPListener) *net.TCPConn {
	t.Helper()
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.AcceptTCP()
	if err != nil {
		t.Fatalf("AcceptTCP on %s: %v", ln.Addr(), err)
	}
	c.SetDeadline(time.Now().Add(ioDeadline))
	t.Cleanup(func() { c.Close() })
	return c
}

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln := listenLoopback(t)
	client, err := net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatalf("DialTCP(%s): %v", ln.Addr(), err)
	}
	client.SetDeadline(time.Now().Add(ioDeadline))
	t.Cleanup(func() { client.Close() })
	server = accept(t, ln)
	ln.Close()
	return client, server
}

func newDirect(t testing.TB) *outbound.Direct {
	t.Helper()
	d, err := outbound.NewDirect(outbound.DirectConfig{Name: "direct"}, nil)
	if err != nil {
		t.Fatalf("NewDirect: %v", err)
	}
	return d
}

func newTCP(t testing.TB, cfg TCPConfig, route Route) *TCP {
	t.Helper()
	r, err := NewTCP(cfg, route, nil)
	if err != nil {
		t.Fatalf("NewTCP(%+v): %v", cfg, err)
	}
	t.Cleanup(func() { closeWithin(t, r, 5*time.Second) })
	return r
}

// relayedFlow is one app connection relayed to a loopback upstream.
type relayedFlow struct {
	app  *net.TCPConn // the app's socket
	up   *net.TCPConn // the upstream server's socket
	flow *fakeTCPFlow
	done chan struct{} // closed when Handle returns
}

// startFlow has relay handle a new app connection towards the upstream
// listening on ln, and returns once the upstream accepted it.
func startFlow(t testing.TB, relay *TCP, ln *net.TCPListener) *relayedFlow {
	t.Helper()
	client, server := tcpPair(t)
	f := newFakeTCPFlow(addrPort(client.LocalAddr()), addrPort(ln.Addr()), appConn{server})
	done := make(chan struct{})
	go func() {
		defer close(done)
		relay.Handle(f)
	}()
	return &relayedFlow{app: client, up: accept(t, ln), flow: f, done: done}
}

func waitClosed(t testing.TB, ch <-chan struct{}, within time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(within):
		t.Fatalf("timed out after %v waiting for %s", within, what)
	}
}

// randomBytes returns n reproducible pseudo-random bytes.
func randomBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)})
	r.Read(b)
	return b
}

// expectReset reads from c until an error and fails unless it is a reset.
func expectReset(t testing.TB, c *net.TCPConn, who string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("%s read: got %v, want ECONNRESET", who, err)
	}
}

// roundTrip sends msg from one socket and reads it at the other.
func roundTrip(t testing.TB, from, to *net.TCPConn, msg string) {
	t.Helper()
	if _, err := from.Write([]byte(msg)); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(to, got); err != nil {
		t.Fatalf("read %q: %v", msg, err)
	}
	if string(got) != msg {
		t.Fatalf("read %q, want %q", got, msg)
	}
}

func TestNewTCPChecksConfig(t *testing.T) {
	if _, err := NewTCP(TCPConfig{DialTimeout: time.Second}, nil, nil); err == nil {
		t.Errorf("NewTCP with a nil route: got no error")
	}
	if _, err := NewTCP(TCPConfig{}, routeTo(&fakeDialer{}), nil); err == nil {
		t.Errorf("NewTCP with a zero dial timeout: got no error")
	}
}

// 8 MiB each way at once arrive intact, and the counters say so.
func TestTCPRelayByteExact(t *testing.T) {
	leakcheck.Check(t)
	relay := newTCP(t, TCPConfig{DialTimeout: 2 * time.Second}, routeTo(newDirect(t)))
	fl := startFlow(t, relay, listenLoopback(t))

	const size = 8 << 20
	upData, downData := randomBytes(size, 1), randomBytes(size, 2)
	var gotUp, gotDown [sha256.Size]byte
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	send := func(c *net.TCPConn, data []byte, who string) {
		if _, err := c.Write(data); err != nil {
			errs <- fmt.Errorf("%s write: %w", who, err)
			return
		}
		if err := c.CloseWrite(); err != nil {
			errs <- fmt.Errorf("%s CloseWrite: %w", who, err)
		}
	}
	receive := func(c *net.TCPConn, sum *[sha256.Size]byte, who string) {
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			errs <- fmt.Errorf("%s read: %w", who, err)
			return
		}
		h.Sum(sum[:0])
	}
	wg.Go(func() { send(fl.app, upData, "app") })
	wg.Go(func() { send(fl.up, downData, "upstream") })
	wg.Go(func() { receive(fl.up, &gotUp, "upstream") })
	wg.Go(func() { receive(fl.app, &gotDown, "app") })
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if gotUp != sha256.Sum256(upData) {
		t.Errorf("upstream received bytes that differ from what the app sent (sha256)")
	}
	if gotDown != sha256.Sum256(downData) {
		t.Errorf("app received bytes that differ from what the upstream sent (sha256)")
	}
	waitClosed(t, fl.done, 5*time.Second, "Handle to return after both sides closed")
	st := relay.Stats()
	if st.BytesUp.Load() != size || st.BytesDown.Load() != size {
		t.Errorf("Stats(): BytesUp %d BytesDown %d, want %d each", st.BytesUp.Load(), st.BytesDown.Load(), size)
	}
	if st.Accepted.Load() != 1 || st.Active.Load() != 0 {
		t.Errorf("Stats(): Accepted %d Active %d, want 1 0", st.Accepted.Load(), st.Active.Load())
	}
}

// A FIN from one side reaches the other as EOF while the other direction
// keeps flowing to its end.
func TestTCPRelayHalfClose(t *testing.T) {
	const size = 1 << 20
	for _, tc := range []struct {
		name string
		// first half-closes after a short message; second then sends
		// size bytes and closes.
		first, second func(*relayedFlow) *net.TCPConn
	}{
		{"app closes first", func(f *relayedFlow) *net.TCPConn { return f.app }, func(f *relayedFlow) *net.TCPConn { return f.up }},
		{"upstream closes first", func(f *relayedFlow) *net.TCPConn { return f.up }, func(f *relayedFlow) *net.TCPConn { return f.app }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			relay := newTCP(t, TCPConfig{DialTimeout: 2 * time.Second}, routeTo(newDirect(t)))
			fl := startFlow(t, relay, listenLoopback(t))
			first, second := tc.first(fl), tc.second(fl)

			msg := randomBytes(1024, 3)
			if _, err := first.Write(msg); err != nil {
				t.Fatalf("write before half-close: %v", err)
			}
			if err := first.CloseWrite(); err != nil {
				t.Fatalf("CloseWrite: %v", err)
			}
			got, err := io.ReadAll(second)
			if err != nil {
				t.Fatalf("reading until the FIN: %v", err)
			}
			if !bytes.Equal(got, msg) {
				t.Fatalf("read %d bytes before EOF, want the %d sent", len(got), len(msg))
			}

			data := randomBytes(size, 4)
			sent := make(chan error, 1)
			go func() {
				_, err := second.Write(data)
				if err == nil {
					err = second.Close()
				}
				sent <- err
			}()
			h := sha256.New()
			n, err := io.Copy(h, first)
			if err != nil {
				t.Fatalf("half-closed side reading the other direction: %v after %d bytes", err, n)
			}
			if err := <-sent; err != nil {
				t.Fatalf("sending after the peer's half-close: %v", err)
			}
			if n != size || [sha256.Size]byte(h.Sum(nil)) != sha256.Sum256(data) {
				t.Errorf("half-closed side received %d bytes (hash match %v), want %d intact", n, [sha256.Size]byte(h.Sum(nil)) == sha256.Sum256(data), size)
			}
			waitClosed(t, fl.done, 5*time.Second, "Handle to return")
		})
	}
}

// A reset on either side reaches the other as a reset, not an EOF that
// would pass for a complete transfer.
func TestTCPRelayReset(t *testing.T) {
	for _, tc := range []struct {
		name        string
		reset, peer func(*relayedFlow) *net.TCPConn
	}{
		{"from upstream", func(f *relayedFlow) *net.TCPConn { return f.up }, func(f *relayedFlow) *net.TCPConn { return f.app }},
		{"from app", func(f *relayedFlow) *net.TCPConn { return f.app }, func(f *relayedFlow) *net.TCPConn { return f.up }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			leakcheck.Check(t)
			relay := newTCP(t, TCPConfig{DialTimeout: 2 * time.Second}, routeTo(newDirect(t)))
			fl := startFlow(t, relay, listenLoopback(t))
			roundTrip(t, fl.app, fl.up, "hello")
			roundTrip(t, fl.up, fl.app, "world")

			c := tc.reset(fl)
			c.SetLinger(0)
			c.Close()
			expectReset(t, tc.peer(fl), "peer of the reset side")
			waitClosed(t, fl.done, 5*time.Second, "Handle to return")
		})
	}
}

func TestTCPRefusedUpstream(t *testing.T) {
	t.Run("outbound refuses", func(t *testing.T) {
		leakcheck.Check(t)
		d := &fakeDialer{name: "proxy", dialTCP: func(_ context.Context, dst outbound.Target) (outbound.TCPConn, error) {
			return nil, fmt.Errorf("proxy: connect %s: %w", dst, outbound.ErrRefused)
		}}
		relay := newTCP(t, TCPConfig{DialTimeout: 2 * time.Second}, routeTo(d))
		f := newFakeTCPFlow(appSrc, remote1, nil)
		relay.Handle(f)
		checkRefused(t, relay, f, 1, 0)
	})

	t.Run("direct to a closed port", func(t *testing.T) {
		leakcheck.Check(t)
		ln := listenLoopback(t)
		dst := addrPort(ln.Addr())
		ln.Close() // nothing listens there now: the kernel answers RST
		relay := newTCP(t, TCPConfig{DialTimeout: 2 * time.Second}, routeTo(newDirect(t)))
		f := newFakeTCPFlow(appSrc, dst, nil)
		relay.Handle(f)
		checkRefused(t, relay, f, 1, 0)
	})

	t.Run("dial timeout", func(t *testing.T) {
		leakcheck.Check(t)
		d := &fakeDialer{name: "blackhole", dialTCP: func(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error) {
			<-ctx.Done()
			return nil, fmt.Errorf("blackhole: connect %s: %w", dst, ctx.Err())
		}}
		const timeout = 100 * time.Millisecond
		relay := newTCP(t, TCPConfig{DialTimeout: timeout}, routeTo(d))
		f := newFakeTCPFlow(appSrc, remote1, nil)
		start := time.Now()
		done := make(chan struct{})
		go func() { defer close(done); relay.Handle(f) }()
		waitClosed(t, f.refusedCh, time.Second, "the flow refused after the dial timeout")
		if elapsed := time.Since(start); elapsed < timeout {
			t.Errorf("refused after %v, before the dial timeout %v", elapsed, timeout)
		}
		waitClosed(t, done, time.Second, "Handle to return")
		checkRefused(t, relay, f, 0, 1)
	})
}

// checkRefused checks that f was refused, never accepted, and counted.
func checkRefused(t *testing.T, relay *TCP, f *fakeTCPFlow, refused, dialFailed uint64) {
	t.Helper()
	if f.refuses.Load() != 1 || f.accepts.Load() != 0 {
		t.Errorf("flow: Refuse called %d times, Accept %d; want 1, 0", f.refuses.Load(), f.accepts.Load())
	}
	st := relay.Stats()
	if st.Refused.Load() != refused || st.DialFailed.Load() != dialFailed || st.Accepted.Load() != 0 {
		t.Errorf("Stats(): Refused %d DialFailed %d Accepted %d, want %d %d 0",
			st.Refused.Load(), st.DialFailed.Load(), st.Accepted.Load(), refused, dialFailed)
	}
}

// An app that goes away between its SYN and the accept leaves no upstream
// connection behind: the upstream gets a reset.
func TestTCPAcceptFailureResetsUpstream(t *testing.T) {
	leakcheck.Check(t)
	relay := newTCP(t, TCPConfig{DialTimeout: 2 * time.Second}, routeTo(newDirect(t)))
	ln := listenLoopback(t)
	f := newFakeTCPFlow(appSrc, addrPort(ln.Addr()), nil)
	done := make(chan struct{})
	go func() { defer close(done); relay.Handle(f) }()
	up := accept(t, ln)
	expectReset(t, up, "upstream")
	waitClosed(t, done, 5*time.Second, "Handle to return")
	if f.accepts.Load() != 1 || relay.Stats().Accepted.Load() != 0 || relay.Stats().Active.Load() != 0 {
		t.Errorf("Accept called %d times, Stats().Accepted %d Active %d; want 1, 0, 0",
			f.accepts.Load(), relay.Stats().Accepted.Load(), relay.Stats().Active.Load())
	}
}

func TestTCPIdleTimeout(t *testing.T) {
	const idle = time.Second // 20 gaps of 50 ms: room for a loaded machine or -race
	cfg := TCPConfig{DialTimeout: 2 * time.Second, IdleTimeout: idle}

	t.Run("no traffic", func(t *testing.T) {
		leakcheck.Check(t)
		relay := newTCP(t, cfg, routeTo(newDirect(t)))
		start := time.Now()
		fl := startFlow(t, relay, listenLoopback(t))
		expectReset(t, fl.app, "app")
		expectReset(t, fl.up, "upstream")
		if elapsed := time.Since(start); elapsed < idle {
			t.Errorf("flow reset after %v, before its idle timeout %v", elapsed, idle)
		}
		waitClosed(t, fl.done, 5*time.Second, "Handle to return")
		if got := relay.Stats().IdleClosed.Load(); got != 1 {
			t.Errorf("Stats().IdleClosed = %d, want 1", got)
		}
	})

	for _, dir := range []string{"app sends", "upstream sends"} {
		t.Run("traffic every 50ms, "+dir, func(t *testing.T) {
			leakcheck.Check(t)
			relay := newTCP(t, cfg, routeTo(newDirect(t)))
			fl := startFlow(t, relay, listenLoopback(t))
			from, to := fl.app, fl.up
			if dir == "upstream sends" {
				from, to = fl.up, fl.app
			}
			for i := range 30 { // 1.5 s
				time.Sleep(50 * time.Millisecond)
				roundTrip(t, from, to, fmt.Sprint(i%10))
			}
			if got := relay.Stats().IdleClosed.Load(); got != 0 {
				t.Fatalf("flow idle-closed %d times while bytes moved every 50ms (idle timeout %v)", got, idle)
			}
			roundTrip(t, fl.app, fl.up, "still")
			roundTrip(t, fl.up, fl.app, "alive")
			// Once traffic stops, the timeout applies again.
			expectReset(t, fl.app, "app")
			waitClosed(t, fl.done, 5*time.Second, "Handle to return")
			if got := relay.Stats().IdleClosed.Load(); got != 1 {
				t.Errorf("Stats().IdleClosed = %d after traffic stopped, want 1", got)
			}
		})
	}
}

// 50 flows through an echo upstream, all at once, end cleanly and leave
// nothing running.
func TestTCPManyFlowsLeaveNothingBehind(t *testing.T) {
	leakcheck.Check(t)
	const flows = 50
	relay := newTCP(t, TCPConfig{DialTimeout: 2 * time.Second, IdleTimeout: 10 * time.Second}, routeTo(newDirect(t)))
	ln := listenLoopback(t)

	var servers sync.WaitGroup
	servers.Go(func() {
		for range flows {
			ln.SetDeadline(time.Now().Add(10 * time.Second))
			c, err := ln.AcceptTCP()
			if err != nil {
				t.Errorf("upstream accept: %v", err)
				return
			}
			servers.Go(func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(ioDeadline))
				if _, err := io.Copy(c, c); err != nil {
					t.Errorf("upstream echo: %v", err)
					return
				}
				c.CloseWrite()
			})
		}
	})

	socketsBefore := openSockets(t)
	var apps sync.WaitGroup
	clients := make([]*net.TCPConn, flows)
	for i := range flows {
		client, server := tcpPair(t)
		clients[i] = client
		f := newFakeTCPFlow(addrPort(client.LocalAddr()), addrPort(ln.Addr()), appConn{server})
		apps.Go(func() { relay.Handle(f) })
		apps.Go(func() {
			msg := randomBytes(64<<10, uint64(i))
			go func() {
				client.Write(msg)
				client.CloseWrite()
			}()
			got, err := io.ReadAll(client)
			if err != nil || !bytes.Equal(got, msg) {
				t.Errorf("flow %d: echoed %d bytes (err %v), want the %d sent", i, len(got), err, len(msg))
			}
		})
	}
	handled := make(chan struct{})
	go func() { apps.Wait(); servers.Wait(); close(handled) }()
	waitClosed(t, handled, 20*time.Second, "all flows to end")
	// A relay closes its sockets just after the app's read saw EOF: give
	// the last ones a moment (a busy machine showed one still finishing).
	st := relay.Stats()
	waitFor(t, 5*time.Second, "every relay finished", func() bool { return st.Active.Load() == 0 })
	if st.Accepted.Load() != flows || st.Active.Load() != 0 {
		t.Errorf("Stats(): Accepted %d Active %d, want %d 0", st.Accepted.Load(), st.Active.Load(), flows)
	}
	// The test has closed its upstream ends; once it closes the apps' ends
	// too, every socket left open would be one the relay forgot.
	for _, c := range clients {
		c.Close()
	}
	if after := openSockets(t); after > socketsBefore {
		t.Errorf("%d sockets open after %d finished flows, %d before: the relay leaks sockets", after, flows, socketsBefore)
	}
}

// openSockets counts this process's open sockets.
func openSockets(t *testing.T) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("counting open sockets: %v", err)
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && strings.HasPrefix(target, "socket:") {
			n++
		}
	}
	return n
}

// Close aborts open flows (both sides see a reset), cancels dials under
// way, returns promptly, and refuses what comes after it.
func TestTCPCloseAbortsFlows(t *testing.T) {
	leakcheck.Check(t)
	direct := newDirect(t)
	var dials atomic.Int32
	blackhole := ap("10.233.1.99:80") // never dialled for real: the fake below holds it
	d := &fakeDialer{name: "direct", dialTCP: func(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error) {
		dials.Add(1)
		if dst.Addr == blackhole {
			<-ctx.Done()
			return nil, ctx.Err()
		}
		return direct.DialTCP(ctx, dst)
	}}
	relay, err := NewTCP(TCPConfig{DialTimeout: time.Minute, IdleTimeout: time.Minute}, routeTo(d), nil)
	if err != nil {
		t.Fatalf("NewTCP: %v", err)
	}
	ln := listenLoopback(t)
	var open []*relayedFlow
	for range 5 {
		fl := startFlow(t, relay, ln)
		roundTrip(t, fl.app, fl.up, "up")
		roundTrip(t, fl.up, fl.app, "down")
		open = append(open, fl)
	}
	dialing := newFakeTCPFlow(appSrc, blackhole, nil)
	dialDone := make(chan struct{})
	go func() { defer close(dialDone); relay.Handle(dialing) }()
	waitFor(t, 2*time.Second, "the blackhole dial to start", func() bool { return dials.Load() == 6 })

	closeWithin(t, relay, 2*time.Second) // with flows open and a dial under way
	for i, fl := range open {
		waitClosed(t, fl.done, time.Second, fmt.Sprintf("flow %d's Handle to return", i))
		expectReset(t, fl.app, fmt.Sprintf("flow %d app", i))
		expectReset(t, fl.up, fmt.Sprintf("flow %d upstream", i))
	}
	waitClosed(t, dialDone, time.Second, "the dialing flow's Handle to return")
	if dialing.refuses.Load() != 1 || dialing.accepts.Load() != 0 {
		t.Errorf("flow dialing at Close: Refuse %d Accept %d, want 1 0", dialing.refuses.Load(), dialing.accepts.Load())
	}
	if got := relay.Stats().Active.Load(); got != 0 {
		t.Errorf("Stats().Active = %d after Close, want 0", got)
	}

	after := newFakeTCPFlow(appSrc, addrPort(ln.Addr()), nil)
	relay.Handle(after)
	if after.refuses.Load() != 1 || after.accepts.Load() != 0 || dials.Load() != 6 {
		t.Errorf("flow after Close: Refuse %d Accept %d, dials %d; want 1 0 and no new dial",
			after.refuses.Load(), after.accepts.Load(), dials.Load())
	}
	closeWithin(t, relay, time.Second) // a second time
}
