package netstack_test

import (
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/tungate/tungate/netstack"
)

// TestCloseLeavesNothingRunning: after Stack.Close (device closed first)
// nothing the stack started is left running, open flows are aborted so that
// the handler's blocked reads end, and Close again is harmless.
func TestCloseLeavesNothingRunning(t *testing.T) {
	before := goroutines()

	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	h.tcp = e.echo
	got := recordUDP(h, true)

	// An open TCP flow, idle, its echo goroutine blocked in Read.
	c := e.client.mustDialTCP(t, remote4)
	c.SetDeadline(time.Now().Add(waitFor))
	if _, err := c.Write([]byte("hi")); err != nil {
		t.Fatalf("client Write: %v", err)
	}
	buf := make([]byte, 2)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("client echo = %q, %v; want %q", buf, err, "hi")
	}
	// A UDP flow both ways.
	u := e.client.udpSocket(t, client4, netip.AddrPort{}, udpDst(remote4))
	if err := u.write([]byte("q"), netip.AddrPort{}); err != nil {
		t.Fatalf("client udp Write: %s", err)
	}
	d := waitDatagram(t, "client datagram", got)
	if err := e.s.WriteUDP([]byte("a"), d.dst, d.src); err != nil {
		t.Fatalf("WriteUDP(_, %s, %s): %v", d.dst, d.src, err)
	}
	if _, _, err := u.read(buf, waitFor); err != nil {
		t.Fatalf("client udp Read: %s", err)
	}

	closed := make(chan struct{})
	go func() {
		e.dev.Close()
		e.s.Close()
		e.s.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(waitFor):
		t.Fatalf("Stack.Close() still running after %v", waitFor)
	}
	// Counters stay readable.
	_ = e.s.Stats()
	if err := e.s.WriteUDP([]byte("late"), d.dst, d.src); err == nil {
		t.Errorf("WriteUDP after Close = nil error, want one")
	}
	e.close() // client stack, and waits for the echo goroutine
	c.ep.Abort()
	u.ep.Close()
	checkNoNewGoroutines(t, before, 5*time.Second)
}

// TestCloseWithoutStart: a stack that never started closes cleanly, twice.
func TestCloseWithoutStart(t *testing.T) {
	before := goroutines()
	dev := newFakeDevice(nil)
	s, err := netstack.New(dev, &testHandler{}, defaultConfig(), nil)
	if err != nil {
		t.Fatalf("netstack.New: %v", err)
	}
	dev.Close()
	s.Close()
	s.Close()
	checkNoNewGoroutines(t, before, 5*time.Second)
}

// TestCloseWhileHandlerDecides: a handler still deciding (dialling its
// upstream) when the stack closes gets an error from Accept, promptly,
// instead of hanging on a handshake that cannot complete.
func TestCloseWhileHandlerDecides(t *testing.T) {
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	result := make(chan error, 1)
	h := &testHandler{tcp: func(r *netstack.TCPRequest) {
		entered <- struct{}{}
		<-release
		c, err := r.Accept()
		if err == nil {
			c.Close()
		}
		result <- err
	}}
	e := newEnv(t, defaultConfig(), h)
	go func() {
		if c, err := e.client.dialTCP(t.Context(), remote4); err == nil {
			c.ep.Abort()
		}
	}()
	select {
	case <-entered:
	case <-time.After(waitFor):
		t.Fatal("HandleTCP not called")
	}
	e.dev.Close()
	e.s.Close()
	close(release)
	select {
	case err := <-result:
		if err == nil {
			t.Errorf("TCPRequest.Accept() after Stack.Close = nil error, want one")
		}
	case <-time.After(waitFor):
		t.Fatalf("TCPRequest.Accept() after Stack.Close still blocked after %v", waitFor)
	}
}
