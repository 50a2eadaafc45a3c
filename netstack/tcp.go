package netstack

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// TCPRequest is an app's connection attempt, held at the SYN until the
// handler decides: Accept completes the handshake, Refuse answers with RST.
type TCPRequest struct {
	s        *Stack
	req      *tcp.ForwarderRequest
	src, dst netip.AddrPort
	done     bool
}

func (s *Stack) forwardTCP(req *tcp.ForwarderRequest) {
	id := req.ID()
	r := &TCPRequest{
		s:   s,
		req: req,
		src: netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort),
		dst: netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort),
	}
	if s.closed.Load() {
		r.Refuse()
		return
	}
	s.handler.HandleTCP(r)
	if !r.done {
		// A handler that forgot to decide must not leak the request.
		r.Refuse()
	}
}

// Src is the app's address.
func (r *TCPRequest) Src() netip.AddrPort { return r.src }

// Dst is the address the app connects to.
func (r *TCPRequest) Dst() netip.AddrPort { return r.dst }

// Refuse answers the SYN with a RST: the app sees "connection refused".
func (r *TCPRequest) Refuse() {
	if r.done {
		return
	}
	r.done = true
	r.req.Complete(true)
}

// Accept completes the handshake and returns the app side of the flow.
func (r *TCPRequest) Accept() (*TCPConn, error) {
	if r.done {
		return nil, os.ErrClosed
	}
	r.done = true
	var wq waiter.Queue
	ep, err := r.req.CreateEndpoint(&wq)
	if err != nil {
		r.req.Complete(true)
		return nil, &net.OpError{Op: "accept", Net: "tcp", Source: net.TCPAddrFromAddrPort(r.dst), Addr: net.TCPAddrFromAddrPort(r.src), Err: translate(err)}
	}
	r.req.Complete(false)
	r.s.tcpAccepted.Add(1)
	so := ep.SocketOptions()
	// Nagle would hold back the small writes of interactive flows that
	// the upstream side already sent promptly.
	so.SetDelayOption(false)
	if ka := r.s.cfg.Keepalive; ka > 0 {
		so.SetKeepAlive(true)
		idle := tcpip.KeepaliveIdleOption(ka)
		ep.SetSockOpt(&idle)
		intvl := tcpip.KeepaliveIntervalOption(ka / 4)
		ep.SetSockOpt(&intvl)
	}
	return newTCPConn(ep, &wq, r.dst, r.src), nil
}

// TCPConn is the app side of a TCP flow: a net.Conn over a gVisor endpoint
// whose errors are the ones a socket gives (io.EOF, syscall.ECONNRESET, …).
type TCPConn struct {
	ep            tcpip.Endpoint
	wq            *waiter.Queue
	local, remote *net.TCPAddr

	readMu, writeMu sync.Mutex
	// The reader and writer gVisor copies through, kept here so that a
	// Read or Write does not allocate one: under readMu and writeMu.
	readTo             tcpip.SliceWriter
	writeFrom          bytes.Reader
	readEntry, wrEntry waiter.Entry
	readReady, wrReady chan struct{}
	readDL, writeDL    atomic.Pointer[time.Time]
	closed             chan struct{}
	closeOnce          sync.Once
	// readDLChanged and writeDLChanged wake a blocked Read or Write so it
	// re-reads its deadline; one each, so neither can take the other's.
	readDLChanged, writeDLChanged chan struct{}
}

func newTCPConn(ep tcpip.Endpoint, wq *waiter.Queue, local, remote netip.AddrPort) *TCPConn {
	c := &TCPConn{
		ep: ep, wq: wq,
		local:          net.TCPAddrFromAddrPort(local),
		remote:         net.TCPAddrFromAddrPort(remote),
		closed:         make(chan struct{}),
		readDLChanged:  make(chan struct{}, 1),
		writeDLChanged: make(chan struct{}, 1),
	}
	c.readEntry, c.readReady = waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	c.wrEntry, c.wrReady = waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&c.readEntry)
	wq.EventRegister(&c.wrEntry)
	return c
}

func (c *TCPConn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.local, Addr: c.remote, Err: err}
}

// wait blocks until ready fires, the conn is closed or the deadline passes.
func (c *TCPConn) wait(ready, dlChanged <-chan struct{}, dl *atomic.Pointer[time.Time]) error {
	for {
		var timeout <-chan time.Time
		if t := dl.Load(); t != nil {
			d := time.Until(*t)
			if d <= 0 {
				return os.ErrDeadlineExceeded
			}
			timer := time.NewTimer(d)
			defer timer.Stop()
			timeout = timer.C
		}
		select {
		case <-ready:
			return nil
		case <-c.closed:
			return net.ErrClosed
		case <-timeout:
			return os.ErrDeadlineExceeded
		case <-dlChanged:
			// Re-read the deadline.
		}
	}
}

// Read implements net.Conn.Read.
func (c *TCPConn) Read(b []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	if c.isClosed() {
		return 0, c.opErr("read", net.ErrClosed)
	}
	defer func() { c.readTo = nil }() // b is the caller's again
	for {
		c.readTo = b
		res, err := c.ep.Read(&c.readTo, tcpip.ReadOptions{})
		if err == nil {
			return res.Count, nil
		}
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			e := translate(err)
			if e == io.EOF {
				return 0, e
			}
			return 0, c.opErr("read", e)
		}
		if err := c.wait(c.readReady, c.readDLChanged, &c.readDL); err != nil {
			return 0, c.opErr("read", err)
		}
	}
}

// WaitReadable blocks until Read would not block (data, EOF or an error),
// the conn is closed or the read deadline passes, without taking a buffer.
func (c *TCPConn) WaitReadable() error {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	for c.ep.Readiness(waiter.ReadableEvents|waiter.EventHUp|waiter.EventErr) == 0 {
		if err := c.wait(c.readReady, c.readDLChanged, &c.readDL); err != nil {
			return c.opErr("read", err)
		}
	}
	return nil
}

// Write implements net.Conn.Write.
func (c *TCPConn) Write(b []byte) (int, error) {
	c.writeMu.Lock()
	defer c.writeMu.Unlock()
	if c.isClosed() {
		return 0, c.opErr("write", net.ErrClosed)
	}
	r := &c.writeFrom
	r.Reset(b)
	defer r.Reset(nil) // b is the caller's again
	written := 0
	for r.Len() > 0 {
		n, err := c.ep.Write(r, tcpip.WriteOptions{})
		written += int(n)
		if err == nil {
			continue
		}
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			return written, c.opErr("write", translate(err))
		}
		if err := c.wait(c.wrReady, c.writeDLChanged, &c.writeDL); err != nil {
			return written, c.opErr("write", err)
		}
	}
	return written, nil
}

// CloseWrite sends FIN; reading goes on until the app's own FIN.
func (c *TCPConn) CloseWrite() error {
	if err := c.ep.Shutdown(tcpip.ShutdownWrite); err != nil {
		return c.opErr("shutdown", translate(err))
	}
	return nil
}

// Close closes the flow gracefully (FIN) and releases the endpoint.
func (c *TCPConn) Close() error {
	c.closeOnce.Do(func() {
		close(c.closed)
		c.wq.EventUnregister(&c.readEntry)
		c.wq.EventUnregister(&c.wrEntry)
		c.ep.Close()
	})
	return nil
}

// Abort closes the flow with a RST.
func (c *TCPConn) Abort() error {
	c.ep.SocketOptions().SetLinger(tcpip.LingerOption{Enabled: true, Timeout: 0})
	return c.Close()
}

// LocalAddr is the address the app connected to.
func (c *TCPConn) LocalAddr() net.Addr { return c.local }

// RemoteAddr is the app's address.
func (c *TCPConn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline implements net.Conn.SetDeadline.
func (c *TCPConn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline implements net.Conn.SetReadDeadline.
func (c *TCPConn) SetReadDeadline(t time.Time) error {
	setDeadline(&c.readDL, t)
	poke(c.readDLChanged)
	return nil
}

// SetWriteDeadline implements net.Conn.SetWriteDeadline.
func (c *TCPConn) SetWriteDeadline(t time.Time) error {
	setDeadline(&c.writeDL, t)
	poke(c.writeDLChanged)
	return nil
}

func (c *TCPConn) isClosed() bool {
	select {
	case <-c.closed:
		return true
	default:
		return false
	}
}

// poke wakes a blocked waiter, if any, without blocking.
func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func setDeadline(p *atomic.Pointer[time.Time], t time.Time) {
	if t.IsZero() {
		p.Store(nil)
		return
	}
	p.Store(&t)
}
