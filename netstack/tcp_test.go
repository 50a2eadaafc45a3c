package netstack_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"

	"github.com/tungate/tungate/netstack"
)

type flowAddrs struct{ src, dst netip.AddrPort }

func TestNewChecksArguments(t *testing.T) {
	dev := newFakeDevice(nil)
	h := &testHandler{}
	for _, tc := range []struct {
		name string
		dev  netstack.Device
		h    netstack.Handler
		cfg  netstack.Config
	}{
		{"nil device", nil, h, defaultConfig()},
		{"nil handler", dev, nil, defaultConfig()},
		{"mtu too small", dev, h, netstack.Config{MTU: 575, MaxInFlight: 1}},
		{"mtu too big", dev, h, netstack.Config{MTU: 65536, MaxInFlight: 1}},
		{"zero max in-flight", dev, h, netstack.Config{MTU: testMTU}},
		{"negative max in-flight", dev, h, netstack.Config{MTU: testMTU, MaxInFlight: -1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := netstack.New(tc.dev, tc.h, tc.cfg, nil)
			if err == nil {
				s.Close()
				t.Fatalf("netstack.New(%v, %v, %+v, nil) = nil error, want one", tc.dev, tc.h, tc.cfg)
			}
		})
	}
}

// TestTCPAccept: the handler accepts and echoes; an app connects to an
// arbitrary remote address, a 1 MiB round trip is byte-exact, and the
// handler saw the app's address and the one it dialled.
func TestTCPAccept(t *testing.T) {
	for _, dst := range []netip.AddrPort{remote4, remote6} {
		t.Run(dst.String(), func(t *testing.T) {
			seen := make(chan flowAddrs, 1)
			h := &testHandler{}
			e := newEnv(t, defaultConfig(), h)
			h.tcp = func(r *netstack.TCPRequest) {
				seen <- flowAddrs{r.Src(), r.Dst()}
				e.echo(r)
			}

			c := e.client.mustDialTCP(t, dst)
			var got flowAddrs
			select {
			case got = <-seen:
			case <-time.After(waitFor):
				t.Fatal("HandleTCP not called")
			}
			if want := (flowAddrs{c.localAddr(), dst}); got != want {
				t.Errorf("TCPRequest Src, Dst = %s, %s; want %s, %s", got.src, got.dst, want.src, want.dst)
			}
			if a := c.localAddr().Addr(); a != clientAddrFor(dst.Addr()) {
				t.Errorf("client local address %s, want %s", a, clientAddrFor(dst.Addr()))
			}
			if ra := c.RemoteAddr().String(); ra != dst.String() {
				t.Errorf("client RemoteAddr() = %s, want %s", ra, dst)
			}

			if !waitUntil(func() bool { return e.s.Stats().TCPCurrentConns == 1 }) {
				t.Errorf("Stats().TCPCurrentConns = %d with one open flow, want 1", e.s.Stats().TCPCurrentConns)
			}

			want := make([]byte, 1<<20)
			rand.Read(want)
			c.SetDeadline(time.Now().Add(20 * time.Second))
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(want)
				if err == nil {
					err = c.CloseWrite()
				}
				werr <- err
			}()
			got2, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("client ReadAll: %v", err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("client Write(1 MiB)+CloseWrite: %v", err)
			}
			if !bytes.Equal(got2, want) {
				t.Fatalf("echo: got %d bytes, want %d, equal=false", len(got2), len(want))
			}
			// TCPEstablished counts the flows handed to the handler.
			if st := e.s.Stats(); st.TCPEstablished != 1 {
				t.Errorf("Stats().TCPEstablished = %d after one accepted flow, want 1", st.TCPEstablished)
			}
		})
	}
}

func refusedError(err tcpip.Error) bool {
	_, ok := err.(*tcpip.ErrConnectionRefused)
	return ok
}

// TestTCPRefuse: the handler refuses; the app's connect fails with
// "connection refused", promptly (a RST, not a timeout).
func TestTCPRefuse(t *testing.T) {
	for _, tc := range []struct {
		name   string
		decide func(r *netstack.TCPRequest)
	}{
		{"Refuse", func(r *netstack.TCPRequest) { r.Refuse() }},
		// forwardTCP refuses for a handler that did neither, rather than
		// leaking the request.
		{"undecided", func(r *netstack.TCPRequest) {}},
	} {
		for _, dst := range []netip.AddrPort{remote4, remote6} {
			t.Run(tc.name+"/"+dst.String(), func(t *testing.T) {
				calls := make(chan struct{}, 4)
				h := &testHandler{tcp: func(r *netstack.TCPRequest) {
					calls <- struct{}{}
					tc.decide(r)
				}}
				// One in-flight slot: the second dial below is only
				// handled if the first request released it.
				cfg := defaultConfig()
				cfg.MaxInFlight = 1
				e := newEnv(t, cfg, h)
				resetsBefore := e.s.Stats().TCPResetsSent

				ctx, cancel := context.WithTimeout(context.Background(), waitFor)
				defer cancel()
				start := time.Now()
				c, err := e.client.dialTCP(ctx, dst)
				elapsed := time.Since(start)
				if err == nil {
					c.ep.Abort()
					t.Fatalf("client dialTCP(%s) succeeded, want connection refused", dst)
				}
				if !refusedError(err) {
					t.Fatalf("client dialTCP(%s) = %s (%T), want %s", dst, err, err, &tcpip.ErrConnectionRefused{})
				}
				if elapsed > 2*time.Second {
					t.Errorf("client dialTCP(%s) took %v to be refused, want < 2s", dst, elapsed)
				}
				if n := len(calls); n != 1 {
					t.Errorf("HandleTCP called %d times, want 1", n)
				}
				// gVisor counts the RST after handing it to the link, so
				// the client can see it before the counter moves.
				if !waitUntil(func() bool { return e.s.Stats().TCPResetsSent > resetsBefore }) {
					t.Errorf("Stats().TCPResetsSent = %d, want > %d", e.s.Stats().TCPResetsSent, resetsBefore)
				}
				// The request is not leaked: a new connection from the
				// same app is handled again; through gonet too, as a Go
				// program behind the TUN would see it.
				gc, gerr := gonet.DialContextTCP(ctx, e.client.s, fullAddr(dst), netProto(dst.Addr()))
				if gerr == nil {
					gc.Close()
					t.Fatalf("gonet.DialContextTCP(%s) succeeded, want connection refused", dst)
				}
				if want := (&tcpip.ErrConnectionRefused{}).String(); !strings.Contains(gerr.Error(), want) {
					t.Errorf("gonet.DialContextTCP(%s) = %v, want %q", dst, gerr, want)
				}
				if n := len(calls); n != 2 {
					t.Errorf("HandleTCP called %d times for two connections, want 2", n)
				}
			})
		}
	}
}

// TestTCPStopAccepting: after StopAccepting new flows are refused without
// asking the handler.
func TestTCPStopAccepting(t *testing.T) {
	calls := make(chan struct{}, 4)
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	h.tcp = func(r *netstack.TCPRequest) {
		calls <- struct{}{}
		e.echo(r)
	}
	open := e.client.mustDialTCP(t, remote4)
	e.s.StopAccepting()

	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if _, err := e.client.dialTCP(ctx, remote4); !refusedError(err) {
		t.Fatalf("client dialTCP(%s) after StopAccepting = %v, want connection refused", remote4, err)
	}
	if n := len(calls); n != 1 {
		t.Errorf("HandleTCP called %d times, want 1 (before StopAccepting only)", n)
	}
	// The open flow keeps working.
	open.SetDeadline(time.Now().Add(waitFor))
	if _, err := open.Write([]byte("still there")); err != nil {
		t.Fatalf("open flow Write after StopAccepting: %v", err)
	}
	buf := make([]byte, 64)
	n, err := io.ReadAtLeast(open, buf, len("still there"))
	if err != nil || string(buf[:n]) != "still there" {
		t.Fatalf("open flow Read after StopAccepting = %q, %v; want %q", buf[:n], err, "still there")
	}
}

// TestTCPMaxInFlight: with MaxInFlight 2 and a handler that does not
// decide, a third concurrent SYN is dropped and counted.
func TestTCPMaxInFlight(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan netip.AddrPort, 8)
	h := &testHandler{tcp: func(r *netstack.TCPRequest) {
		entered <- r.Src()
		<-release
		r.Refuse()
	}}
	cfg := defaultConfig()
	cfg.MaxInFlight = 2
	e := newEnv(t, cfg, h)
	var releaseOnce sync.Once
	releaseAll := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(releaseAll)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for i := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dst := netip.AddrPortFrom(remote4.Addr(), uint16(8000+i))
			if c, err := e.client.dialTCP(ctx, dst); err == nil {
				c.ep.Abort()
			}
		}()
	}
	if !waitUntil(func() bool { return e.s.Stats().SYNsDroppedInFlight > 0 }) {
		t.Fatalf("Stats().SYNsDroppedInFlight = 0 after 3 concurrent SYNs with MaxInFlight 2")
	}
	// Give a third (wrongly admitted) request a moment to show up.
	time.Sleep(50 * time.Millisecond)
	if n := len(entered); n != 2 {
		t.Errorf("HandleTCP entered %d times while blocked, want 2", n)
	}
	releaseAll()
}

// acceptOne sets h to accept one connection and returns it once the app's
// dial to dst completes.
func acceptOne(t *testing.T, e *env, h *testHandler, dst netip.AddrPort) (*netstack.TCPConn, *clientTCP) {
	t.Helper()
	conns := make(chan *netstack.TCPConn, 1)
	h.tcp = func(r *netstack.TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			t.Errorf("TCPRequest.Accept(): %v", err)
			return
		}
		conns <- c
	}
	cc := e.client.mustDialTCP(t, dst)
	select {
	case c := <-conns:
		t.Cleanup(func() { c.Close() })
		return c, cc
	case <-time.After(waitFor):
		t.Fatal("HandleTCP did not accept")
	}
	return nil, nil
}

// readAsync reads once from c on another goroutine.
func readAsync(c net.Conn, b []byte) <-chan readResult {
	ch := make(chan readResult, 1)
	go func() {
		n, err := c.Read(b)
		ch <- readResult{n, err}
	}()
	return ch
}

type readResult struct {
	n   int
	err error
}

func waitRead(t *testing.T, what string, ch <-chan readResult) readResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(waitFor):
		t.Fatalf("%s: still blocked after %v", what, waitFor)
	}
	return readResult{}
}

func TestTCPConnAddrs(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	c, cc := acceptOne(t, e, h, remote4)
	if got := c.LocalAddr().String(); got != remote4.String() {
		t.Errorf("TCPConn.LocalAddr() = %s, want %s", got, remote4)
	}
	if got, want := c.RemoteAddr().String(), cc.localAddr().String(); got != want {
		t.Errorf("TCPConn.RemoteAddr() = %s, want %s", got, want)
	}
}

// TestTCPConnCloseWrite: our CloseWrite delivers EOF to the app while the
// app can still send.
func TestTCPConnCloseWrite(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	c, cc := acceptOne(t, e, h, remote4)

	if _, err := c.Write([]byte("last words")); err != nil {
		t.Fatalf("TCPConn.Write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("TCPConn.CloseWrite(): %v", err)
	}
	cc.SetDeadline(time.Now().Add(waitFor))
	got, err := io.ReadAll(cc)
	if err != nil || string(got) != "last words" {
		t.Fatalf("client ReadAll after CloseWrite = %q, %v; want %q, nil (EOF)", got, err, "last words")
	}
	if _, err := cc.Write([]byte("reply")); err != nil {
		t.Fatalf("client Write after our CloseWrite: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(waitFor))
	buf := make([]byte, 16)
	n, err := io.ReadAtLeast(c, buf, len("reply"))
	if err != nil || string(buf[:n]) != "reply" {
		t.Fatalf("TCPConn.Read after CloseWrite = %q, %v; want %q", buf[:n], err, "reply")
	}
	cc.Close()
	if n, err := c.Read(buf); err != io.EOF {
		t.Fatalf("TCPConn.Read after client Close = %d, %v; want 0, io.EOF", n, err)
	}
}

// TestTCPConnClientReset: an app's RST makes our blocked Read fail with
// ECONNRESET.
func TestTCPConnClientReset(t *testing.T) {
	for _, dst := range []netip.AddrPort{remote4, remote6} {
		t.Run(dst.String(), func(t *testing.T) {
			h := &testHandler{}
			e := newEnv(t, defaultConfig(), h)
			c, cc := acceptOne(t, e, h, dst)

			ch := readAsync(c, make([]byte, 16))
			time.Sleep(20 * time.Millisecond) // let Read block
			cc.ep.SocketOptions().SetLinger(tcpip.LingerOption{Enabled: true, Timeout: 0})
			cc.ep.Close()
			r := waitRead(t, "TCPConn.Read after client RST", ch)
			if !errors.Is(r.err, syscall.ECONNRESET) {
				t.Fatalf("TCPConn.Read after client RST = %d, %v; want errors.Is(err, ECONNRESET)", r.n, r.err)
			}
			var op *net.OpError
			if !errors.As(r.err, &op) || op.Op != "read" {
				t.Errorf("TCPConn.Read error %v is not a *net.OpError with Op read", r.err)
			}
			// Writing to a reset flow fails too.
			if _, err := c.Write([]byte("x")); err == nil {
				t.Errorf("TCPConn.Write after client RST = nil error, want one")
			}
		})
	}
}

// TestTCPConnAbort: our Abort resets the app's connection.
func TestTCPConnAbort(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	c, cc := acceptOne(t, e, h, remote4)

	if err := c.Abort(); err != nil {
		t.Fatalf("TCPConn.Abort(): %v", err)
	}
	_, err := readEndpoint(cc.ep, cc.wq, make([]byte, 16), waitFor)
	if _, ok := err.(*tcpip.ErrConnectionReset); !ok {
		t.Fatalf("client Read after our Abort = %v (%T), want %s", err, err, &tcpip.ErrConnectionReset{})
	}
}

// TestTCPConnClose: our Close sends what was written, then FIN: the app
// reads the data and then EOF.
func TestTCPConnClose(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	c, cc := acceptOne(t, e, h, remote6)

	if _, err := c.Write([]byte("bye")); err != nil {
		t.Fatalf("TCPConn.Write: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("TCPConn.Close(): %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second TCPConn.Close(): %v", err)
	}
	cc.SetReadDeadline(time.Now().Add(waitFor))
	got, err := io.ReadAll(cc)
	if err != nil || string(got) != "bye" {
		t.Fatalf("client ReadAll after our Close = %q, %v; want %q, nil (EOF)", got, err, "bye")
	}
	if n, err := cc.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("client Read after EOF = %d, %v; want io.EOF", n, err)
	}
}

// TestTCPConnReadAfterClose: Read on a conn we closed fails with
// net.ErrClosed, as for any net.Conn.
func TestTCPConnReadAfterClose(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	c, _ := acceptOne(t, e, h, remote4)
	c.Close()
	if n, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("TCPConn.Read after Close = %d, %v; want errors.Is(err, net.ErrClosed)", n, err)
	}
	if n, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("TCPConn.Write after Close = %d, %v; want errors.Is(err, net.ErrClosed)", n, err)
	}
}

// TestTCPConnCloseUnblocksRead: Close from another goroutine ends a
// blocked Read.
func TestTCPConnCloseUnblocksRead(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	c, _ := acceptOne(t, e, h, remote4)
	ch := readAsync(c, make([]byte, 1))
	time.Sleep(20 * time.Millisecond)
	c.Close()
	r := waitRead(t, "TCPConn.Read after Close", ch)
	if r.err == nil {
		t.Fatalf("blocked TCPConn.Read after Close = %d, nil; want an error", r.n)
	}
}

// TestTCPConnReadDeadline: a deadline ends a blocked Read with
// os.ErrDeadlineExceeded, both when set before and while blocked; clearing
// it makes Read work again.
func TestTCPConnReadDeadline(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	c, cc := acceptOne(t, e, h, remote4)
	const d = 100 * time.Millisecond

	checkTimeout := func(what string, r readResult, start time.Time) {
		t.Helper()
		elapsed := time.Since(start)
		if !errors.Is(r.err, os.ErrDeadlineExceeded) {
			t.Fatalf("%s = %d, %v; want errors.Is(err, os.ErrDeadlineExceeded)", what, r.n, r.err)
		}
		var ne net.Error
		if !errors.As(r.err, &ne) || !ne.Timeout() {
			t.Errorf("%s error %v: not a net.Error with Timeout()", what, r.err)
		}
		if elapsed < d-10*time.Millisecond || elapsed > 2*time.Second {
			t.Errorf("%s returned after %v, want about %v", what, elapsed, d)
		}
	}

	// Set before Read.
	start := time.Now()
	c.SetReadDeadline(start.Add(d))
	checkTimeout("TCPConn.Read with deadline set before", waitRead(t, "TCPConn.Read with deadline", readAsync(c, make([]byte, 8))), start)

	// Already passed.
	c.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := c.Read(make([]byte, 8)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("TCPConn.Read with past deadline = %v, want os.ErrDeadlineExceeded", err)
	}

	// Set while blocked (no deadline when Read started).
	c.SetReadDeadline(time.Time{})
	ch := readAsync(c, make([]byte, 8))
	time.Sleep(20 * time.Millisecond)
	start = time.Now()
	c.SetReadDeadline(start.Add(d))
	checkTimeout("TCPConn.Read with deadline set while blocked", waitRead(t, "TCPConn.Read with deadline set while blocked", ch), start)

	// Cleared: data flows again.
	c.SetReadDeadline(time.Time{})
	buf := make([]byte, 8)
	ch = readAsync(c, buf)
	if _, err := cc.Write([]byte("ping")); err != nil {
		t.Fatalf("client Write: %v", err)
	}
	if r := waitRead(t, "TCPConn.Read after clearing deadline", ch); r.err != nil || string(buf[:r.n]) != "ping" {
		t.Fatalf("TCPConn.Read after clearing deadline = %q, %v; want %q", buf[:r.n], r.err, "ping")
	}
}

// TestTCPConnWriteDeadline: a Write blocked on a full window (the app
// does not read) ends at its deadline with os.ErrDeadlineExceeded, having
// written part of the data.
func TestTCPConnWriteDeadline(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	c, _ := acceptOne(t, e, h, remote4)
	c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
	done := make(chan struct{})
	var n int
	var err error
	go func() {
		defer close(done)
		n, err = c.Write(make([]byte, 64<<20))
	}()
	select {
	case <-done:
	case <-time.After(waitFor):
		t.Fatalf("TCPConn.Write(64 MiB) to an app that does not read: still blocked after %v", waitFor)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("TCPConn.Write(64 MiB) = %d, %v; want os.ErrDeadlineExceeded", n, err)
	}
	if n <= 0 || n >= 64<<20 {
		t.Errorf("TCPConn.Write(64 MiB) wrote %d bytes before its deadline, want some but not all", n)
	}
}

// TestTCPPortReuseAfterServerClose: when the upstream side closes first,
// our endpoint is the active closer; an app that reconnects from the same
// port right away (as a kernel may) must connect at once, not wait out a
// TIME_WAIT whose SYN the forwarder (having no listener) cannot take over.
func TestTCPPortReuseAfterServerClose(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	h.tcp = func(r *netstack.TCPRequest) {
		c, err := r.Accept()
		if err != nil {
			return
		}
		c.Write([]byte("bye"))
		c.Close() // we close first
	}
	port := nextPort()
	for i := range 3 {
		// The client's own last ACK may still be in flight: retry while
		// its port is busy on the client side, which is not what is
		// under test.
		var (
			c   *clientTCP
			err tcpip.Error
		)
		start := time.Now()
		for {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			c, err = e.client.dialTCPFrom(ctx, port, remote4)
			cancel()
			_, busy := err.(*tcpip.ErrPortInUse)
			_, taken := err.(*tcpip.ErrBadLocalAddress) // the 4-tuple, still in LAST_ACK
			if !busy && !taken || time.Since(start) > time.Second {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("connect #%d from port %d right after the previous flow closed: %s", i, port, err)
		}
		c.SetDeadline(time.Now().Add(waitFor))
		if got, err := io.ReadAll(c); err != nil || string(got) != "bye" {
			t.Fatalf("flow #%d: read %q, %v", i, got, err)
		}
		c.Close()
	}
}
