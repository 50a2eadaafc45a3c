package outbound

import (
	"fmt"
	"net/netip"
	"syscall"
	"unsafe"

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
//
// The system call is made directly: unix.Recvfrom allocates room for a
// source address a TCP socket never has, once per wait of every flow.
func peekReady(fd uintptr, b []byte) (bool, error) {
	_, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)), unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
	switch errno {
	case 0:
		return true, nil
	case unix.EAGAIN, unix.EINTR:
		return false, nil
	}
	return true, errno
}
