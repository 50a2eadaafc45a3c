//go:build !linux

package outbound

import (
	"net/netip"
	"syscall"
)

// enableICMPErrors does nothing here: this system reports ICMP errors on
// connected UDP sockets only, so an unconnected session's datagram to a
// closed port looks like one that got no answer.
func enableICMPErrors(syscall.RawConn, bool) error { return nil }

// takeICMPErrors finds nothing: there is no error queue.
func takeICMPErrors(syscall.RawConn) (netip.AddrPort, syscall.Errno, bool) {
	return netip.AddrPort{}, 0, false
}
