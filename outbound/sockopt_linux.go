package outbound

import (
	"fmt"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

func socketControl(iface string, mark uint32) (func(network, address string, c syscall.RawConn) error, error) {
	if iface == "" && mark == 0 {
		return nil, nil
	}
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if mark != 0 {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); serr != nil {
					serr = fmt.Errorf("SO_MARK %#x: %w", mark, serr)
					return
				}
			}
			if iface != "" {
				if serr = unix.BindToDevice(int(fd), iface); serr != nil {
					serr = fmt.Errorf("SO_BINDTODEVICE %s: %w", iface, serr)
				}
			}
		})
		if err != nil {
			return err
		}
		return serr
	}, nil
}

func sendtoNoWait(fd uintptr, b []byte, dst netip.AddrPort) error {
	return unix.Sendto(int(fd), b, unix.MSG_DONTWAIT, sockaddr(dst))
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
