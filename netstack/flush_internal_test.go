package netstack

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

var errIdleDevClosed = errors.New("idle device closed")

// idleDevice hands out frames from a channel and reports itself idle only
// when told to, as a TUN under a steady load never runs dry.
type idleDevice struct {
	frames chan []byte
	idle   chan struct{}
	done   chan struct{}
}

func (d *idleDevice) ReadFrame(b []byte) (int, error) { panic("ReadFrameIdle expected") }

func (d *idleDevice) ReadFrameIdle(b []byte, idle func()) (int, error) {
	for {
		select {
		case f := <-d.frames:
			return copy(b, f), nil
		case <-d.idle:
			idle()
		case <-d.done:
			return 0, errIdleDevClosed
		}
	}
}

func (d *idleDevice) WriteFrame(b []byte) (int, error) { return len(b), nil }
func (d *idleDevice) VirtioHdr() bool                  { return false }

// TestFlushUnderSteadyLoad: a device that never runs dry still has its
// held datagrams flushed every 64 frames, and once more when it idles.
func TestFlushUnderSteadyLoad(t *testing.T) {
	dev := &idleDevice{frames: make(chan []byte), idle: make(chan struct{}), done: make(chan struct{})}
	e := newLinkEndpoint(dev, 1500, nil)
	var flushes atomic.Int32
	e.flush = func() { flushes.Add(1) }
	e.start(func(err error) bool { return err == errIdleDevClosed })
	defer func() {
		close(dev.done)
		e.close()
	}()

	frame := []byte{0x00} // not IPv4 or IPv6: counted and dropped
	for range 200 {
		dev.frames <- frame
	}
	dev.frames <- frame // the 200th frame has been handled once this one is taken
	if got := flushes.Load(); got != 3 {
		t.Fatalf("flushes after 200 frames without an idle device = %d, want 3 (at 64, 128, 192)", got)
	}
	dev.idle <- struct{}{}
	deadline := time.Now().Add(2 * time.Second)
	for flushes.Load() != 4 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if got := flushes.Load(); got != 4 {
		t.Fatalf("flushes after the device idled = %d, want 4", got)
	}
}
