package outbound

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
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

// CheckHostPort accepts "host:port" with a non-empty host and a port in
// 1-65535.
func CheckHostPort(s string) error {
	if s == "" {
		return fmt.Errorf("address is empty")
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("invalid address %q", s)
	}
	if host == "" {
		return fmt.Errorf("address %q has no host", s)
	}
	if err := checkPort(port); err != nil {
		return fmt.Errorf("address %q: %v", s, err)
	}
	return nil
}

func checkPort(s string) error {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return fmt.Errorf("invalid port %q (want 1-65535)", s)
	}
	return nil
}
