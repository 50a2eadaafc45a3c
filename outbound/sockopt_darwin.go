package outbound

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// socketControl binds sockets to iface with IP_BOUND_IF, which is how macOS
// keeps tungate's own traffic off the utun device. macOS has no SO_MARK, so
// mark is not used here.
func socketControl(iface string, _ uint32) (func(network, address string, c syscall.RawConn) error, error) {
	if iface == "" {
		return nil, nil
	}
	ifi, err := net.InterfaceByName(iface)
	if err != nil {
		return nil, fmt.Errorf("interface %q: %w", iface, err)
	}
	return func(network, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			switch network {
			case "tcp6", "udp6":
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_BOUND_IF, ifi.Index)
			default:
				serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BOUND_IF, ifi.Index)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}, nil
}

func sendtoNoWait(fd uintptr, b []byte, dst netip.AddrPort) error {
	return unix.Sendto(int(fd), b, 0, sockaddr(dst))
}

// peekReady reports whether a read on fd would not block: data is buffered,
// the peer closed, or the socket has an error. A peek consumes a pending
// socket error (a RST), so that error is returned here: the next read would
// not see it.
func peekReady(fd uintptr, b []byte) (bool, error) {
	_, _, err := unix.Recvfrom(int(fd), b, unix.MSG_PEEK|unix.MSG_DONTWAIT)
	switch err {
	case nil:
		return true, nil
	case unix.EAGAIN, unix.EINTR:
		return false, nil
	}
	return true, err
}
