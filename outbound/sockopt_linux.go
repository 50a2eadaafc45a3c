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
