package outbound

import (
	"fmt"
	"net"
	"net/netip"
)

// ParseProxyAddress parses the host:port of a proxy outbound. The host must
// be an IP address: tungate does not resolve proxy names (a lookup would go
// through the system resolver, which may be tungate itself).
func ParseProxyAddress(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		host, _, serr := net.SplitHostPort(s)
		if serr != nil {
			return netip.AddrPort{}, fmt.Errorf("address %q: want host:port: %w", s, serr)
		}
		if _, aerr := netip.ParseAddr(host); aerr != nil {
			return netip.AddrPort{}, fmt.Errorf("address %q: the host must be an IP address (names are not resolved)", s)
		}
		return netip.AddrPort{}, fmt.Errorf("address %q: %w", s, err)
	}
	if ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("address %q: port 0", s)
	}
	if ap.Addr().IsUnspecified() {
		return netip.AddrPort{}, fmt.Errorf("address %q: unspecified host", s)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}
