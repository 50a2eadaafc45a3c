package forwarder

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/tungate/tungate/outbound"
)

// waitFor polls cond until it holds or within has passed, and fails the
// test naming what it waited for. It is the only way these tests wait: a
// bound, never a sleep taken as proof.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// closeWithin closes c and fails the test if Close errs or takes longer
// than within (a Close that hangs would otherwise hang the test binary).
func closeWithin(t testing.TB, c interface{ Close() error }, within time.Duration) {
	t.Helper()
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Errorf("Close: %v", err)
		}
	case <-time.After(within):
		t.Fatalf("Close did not return within %v", within)
	}
}

// errClosed is what the fake packet conn returns once closed.
var errClosed = net.ErrClosed

// fakeDialer is an outbound.Dialer whose UDP sessions are in-memory
// fakePacketConns and whose TCP dials do what the test says.
type fakeDialer struct {
	name string

	// gate, when not nil, holds ListenUDP until it is closed or ctx ends.
	gate chan struct{}
	// listenErrs are returned by the first ListenUDP calls, in order; nil
	// entries succeed.
	listenErrs []error
	// echo makes every session answer each datagram from its destination.
	echo bool
	// onWrite is installed as every session's onWrite.
	onWrite func(n int)

	// dialTCP, when set, implements DialTCP.
	dialTCP func(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error)

	mu            sync.Mutex
	listens       int // ListenUDP calls entered
	listenReturns int // ListenUDP calls returned
	conns         []*fakePacketConn
	dials         int
}

func (d *fakeDialer) Name() string { return d.name }

func (d *fakeDialer) DialTCP(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	d.mu.Lock()
	d.dials++
	d.mu.Unlock()
	if d.dialTCP == nil {
		return nil, errors.New("fakeDialer: no TCP")
	}
	return d.dialTCP(ctx, dst)
}

func (d *fakeDialer) ListenUDP(ctx context.Context, first outbound.Target) (outbound.PacketConn, error) {
	d.mu.Lock()
	n := d.listens
	d.listens++
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		d.listenReturns++
		d.mu.Unlock()
	}()
	if d.gate != nil {
		select {
		case <-d.gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if n < len(d.listenErrs) && d.listenErrs[n] != nil {
		return nil, d.listenErrs[n]
	}
	c := &fakePacketConn{first: first.Addr, echo: d.echo, onWrite: d.onWrite, in: make(chan fakeDatagram, 64), inErr: make(chan error, 1), closed: make(chan struct{})}
	d.mu.Lock()
	d.conns = append(d.conns, c)
	d.mu.Unlock()
	return c, nil
}

func (d *fakeDialer) listenCount() (entered, returned int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.listens, d.listenReturns
}

func (d *fakeDialer) sessions() []*fakePacketConn {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]*fakePacketConn(nil), d.conns...)
}

// sessionFor returns the session opened towards first, or nil.
func (d *fakeDialer) sessionFor(first netip.AddrPort) *fakePacketConn {
	for _, c := range d.sessions() {
		if c.first == first {
			return c
		}
	}
	return nil
}

type fakeDatagram struct {
	payload string
	addr    netip.AddrPort // remote: source of a reply, destination of a write
}

func (d fakeDatagram) String() string { return fmt.Sprintf("%q@%s", d.payload, d.addr) }

// fakePacketConn is an in-memory outbound.PacketConn: it records what the
// table writes and lets the test inject datagrams from any remote.
type fakePacketConn struct {
	first netip.AddrPort
	echo  bool

	in        chan fakeDatagram
	inErr     chan error // errors ReadPacket returns, as ICMP errors
	closed    chan struct{}
	closeOnce sync.Once

	mu      sync.Mutex
	writes  []fakeDatagram
	closes  int
	onWrite func(n int) // called after the n-th write (from 1) is recorded
}

func (c *fakePacketConn) ReadPacket(b []byte) (int, netip.AddrPort, error) {
	select {
	case d := <-c.in:
		return copy(b, d.payload), d.addr, nil
	case err := <-c.inErr:
		var from netip.AddrPort
		if u, ok := err.(*outbound.UnreachableError); ok {
			from = u.From
		}
		return 0, from, err
	case <-c.closed:
		return 0, netip.AddrPort{}, errClosed
	}
}

func (c *fakePacketConn) WritePacket(b []byte, dst outbound.Target) error {
	select {
	case <-c.closed:
		return errClosed
	default:
	}
	c.mu.Lock()
	c.writes = append(c.writes, fakeDatagram{payload: string(b), addr: dst.Addr})
	n := len(c.writes)
	hook := c.onWrite
	c.mu.Unlock()
	if hook != nil {
		hook(n)
	}
	if c.echo {
		select {
		case c.in <- fakeDatagram{payload: string(b), addr: dst.Addr}:
		default: // a full buffer drops, as UDP does
		}
	}
	return nil
}

func (c *fakePacketConn) Close() error {
	c.mu.Lock()
	c.closes++
	c.mu.Unlock()
	c.closeOnce.Do(func() { close(c.closed) })
	return nil
}

// inject delivers a datagram from remote to the table's read loop.
func (c *fakePacketConn) inject(t testing.TB, from netip.AddrPort, payload string) {
	t.Helper()
	select {
	case c.in <- fakeDatagram{payload: payload, addr: from}:
	case <-c.closed:
		t.Fatalf("inject from %s into a closed session", from)
	case <-time.After(2 * time.Second):
		t.Fatalf("inject from %s: session not reading", from)
	}
}

func (c *fakePacketConn) written() []fakeDatagram {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]fakeDatagram(nil), c.writes...)
}

func (c *fakePacketConn) closeCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closes
}

// replyRecorder is a UDPReply that records what reaches the app.
type replyRecorder struct {
	mu  sync.Mutex
	got []appDatagram
}

type appDatagram struct {
	payload  string
	from, to netip.AddrPort
}

func (d appDatagram) String() string { return fmt.Sprintf("%q %s->%s", d.payload, d.from, d.to) }

func (r *replyRecorder) reply(payload []byte, from, to netip.AddrPort) error {
	r.mu.Lock()
	r.got = append(r.got, appDatagram{payload: string(payload), from: from, to: to})
	r.mu.Unlock()
	return nil
}

func (r *replyRecorder) received() []appDatagram {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]appDatagram(nil), r.got...)
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// routeTo routes every flow to d.
func routeTo(d outbound.Dialer) Route { return func(*Flow) outbound.Dialer { return d } }
