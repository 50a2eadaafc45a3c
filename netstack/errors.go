package netstack

import (
	"errors"
	"io"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// translate turns a gVisor error into the error a Go program expects from a
// socket, so callers can use errors.Is(err, syscall.ECONNRESET) and io.EOF
// without knowing gVisor. tcpip.Error is not an error on purpose; this is
// the one place it crosses into ordinary Go errors.
func translate(err tcpip.Error) error {
	switch err.(type) {
	case nil:
		return nil
	case *tcpip.ErrClosedForReceive:
		return io.EOF
	case *tcpip.ErrConnectionReset:
		return syscall.ECONNRESET
	case *tcpip.ErrConnectionAborted, *tcpip.ErrAborted:
		return syscall.ECONNABORTED
	case *tcpip.ErrConnectionRefused:
		return syscall.ECONNREFUSED
	case *tcpip.ErrClosedForSend:
		return syscall.EPIPE
	case *tcpip.ErrTimeout:
		return syscall.ETIMEDOUT
	case *tcpip.ErrNotConnected:
		return syscall.ENOTCONN
	case *tcpip.ErrNoBufferSpace:
		return syscall.ENOBUFS
	case *tcpip.ErrMessageTooLong:
		return syscall.EMSGSIZE
	case *tcpip.ErrNetworkUnreachable, *tcpip.ErrHostUnreachable:
		return syscall.ENETUNREACH
	case *tcpip.ErrBadLocalAddress:
		return syscall.EADDRNOTAVAIL
	case *tcpip.ErrPortInUse:
		return syscall.EADDRINUSE
	}
	return errors.New("netstack: " + err.String())
}
