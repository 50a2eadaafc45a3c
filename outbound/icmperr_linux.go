package outbound

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// enableICMPErrors asks the kernel to report the ICMP errors that answer
// the datagrams of an unconnected UDP socket (IP_RECVERR, IPV6_RECVERR).
// Without it Linux reports them only on connected sockets, and a datagram
// to a closed port looks like one that got no answer. Each error is queued
// on the socket's error queue and also fails the next receive (or send)
// once; takeICMPErrors empties the queue.
func enableICMPErrors(raw syscall.RawConn, v6 bool) error {
	var serr error
	err := raw.Control(func(fd uintptr) {
		if v6 {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1)
		}
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("IP_RECVERR: %w", serr)
	}
	return nil
}

// takeICMPErrors empties the socket's error queue. It returns the
// destination of the datagram the last queued ICMP error was about, and
// that error's errno; ok is false when the queue was empty. The queue must
// be emptied: its entries count against the receive buffer.
func takeICMPErrors(raw syscall.RawConn) (dst netip.AddrPort, errno syscall.Errno, ok bool) {
	var buf [1]byte
	var oob [256]byte
	raw.Control(func(fd uintptr) {
		for range 64 { // bounded: the queue is bounded by the receive buffer anyway
			_, oobn, _, from, err := unix.Recvmsg(int(fd), buf[:], oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err != nil {
				return
			}
			ok = true
			switch sa := from.(type) {
			case *unix.SockaddrInet4:
				dst = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
			case *unix.SockaddrInet6:
				dst = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
			}
			errno = 0
			msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil {
				continue
			}
			for _, m := range msgs {
				isErr := m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_RECVERR ||
					m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_RECVERR
				if isErr && len(m.Data) >= 4 {
					errno = syscall.Errno(binary.NativeEndian.Uint32(m.Data))
				}
			}
		}
	})
	return dst, errno, ok
}
