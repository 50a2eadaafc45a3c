package outbound

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"
)

// ProxyHandshakeTimeout bounds the exchange with a proxy when the dial
// context has no deadline, so that a silent proxy cannot hang a flow.
const ProxyHandshakeTimeout = 10 * time.Second

// DialProxy connects to a proxy server through base and runs handshake
// on the connection. The handshake is bounded by ctx's deadline (or
// ProxyHandshakeTimeout) and cut short when ctx ends; once it succeeds
// the deadline is cleared. On any failure the connection is closed.
// Handshake must not close conn.
func DialProxy[T any](ctx context.Context, base Dialer, server netip.AddrPort, handshake func(conn TCPConn) (T, error)) (TCPConn, T, error) {
	var zero T
	conn, err := base.DialTCP(ctx, Target{Addr: server})
	if err != nil {
		return nil, zero, fmt.Errorf("proxy %s: %w", server, err)
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(ProxyHandshakeTimeout)
	}
	if err := conn.SetDeadline(deadline); err != nil {
		conn.Close()
		return nil, zero, err
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	result, err := handshake(conn)
	if !stop() {
		// ctx ended; its deadline may be set on conn at any moment.
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			err = context.Cause(ctx)
		}
		if err == nil {
			err = context.Canceled
		}
	}
	if err == nil {
		err = conn.SetDeadline(time.Time{})
	}
	if err != nil {
		conn.Close()
		return nil, zero, err
	}
	return conn, result, nil
}
