//go:build linux

package netlab

import (
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// serverStopTimeout bounds how long cleanup waits for a server's
// goroutines after closing its sockets.
const serverStopTimeout = 5 * time.Second

// ServeTCP listens on addr (TCP) inside the namespace and runs handle on a
// goroutine of its own for every connection, closing the connection when
// handle returns. It returns the listener's address. The listener and all
// open connections are closed in t.Cleanup, which waits for the server's
// goroutines.
func (n *NS) ServeTCP(t testing.TB, addr string, handle func(net.Conn)) net.Addr {
	t.Helper()
	ln, err := n.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("netlab: ServeTCP: %v", err)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = map[net.Conn]struct{}{}
		closed bool
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // closed by cleanup
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				c.Close()
				return
			}
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c)
			})
		}
	})
	t.Cleanup(func() {
		mu.Lock()
		closed = true
		ln.Close()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		waitGroup(t, &wg, "ServeTCP "+ln.Addr().String())
	})
	return ln.Addr()
}

// TCPEcho listens on addr (TCP) inside the namespace and echoes every
// connection until the client's EOF, then half-closes (CloseWrite) and
// closes it. It returns the listener's address; see ServeTCP.
func (n *NS) TCPEcho(t testing.TB, addr string) net.Addr {
	t.Helper()
	return n.ServeTCP(t, addr, func(c net.Conn) {
		if _, err := io.Copy(c, c); err != nil {
			return
		}
		if cw, ok := c.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	})
}

// UDPEcho listens on addr (UDP) inside the namespace and sends every
// datagram back to its sender. It returns the socket, which t.Cleanup
// closes before waiting for the server's goroutine. Tests may read the
// socket's address but should not read from it.
func (n *NS) UDPEcho(t testing.TB, addr string) net.PacketConn {
	t.Helper()
	pc, err := n.ListenPacket("udp", addr)
	if err != nil {
		t.Fatalf("netlab: UDPEcho: %v", err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 64<<10)
		for {
			m, from, err := pc.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				// ICMP errors surface as read errors on some kernels;
				// keep serving.
				continue
			}
			pc.WriteTo(buf[:m], from)
		}
	})
	t.Cleanup(func() {
		pc.Close()
		waitGroup(t, &wg, "UDPEcho "+pc.LocalAddr().String())
	})
	return pc
}

// waitGroup waits for wg up to serverStopTimeout, reporting a server whose
// goroutines do not end.
func waitGroup(t testing.TB, wg *sync.WaitGroup, what string) {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(serverStopTimeout):
		t.Errorf("netlab: %s: goroutines still running %v after close", what, serverStopTimeout)
	}
}
