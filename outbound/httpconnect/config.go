package httpconnect

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// Config configures an HTTP CONNECT outbound.
type Config struct {
	Name string
	// Address is the proxy's host:port. The host must be an IP literal
	// for now; a name is refused with an error.
	Address string
	// Username, when set, is sent with Password in a
	// "Proxy-Authorization: Basic" header on every CONNECT.
	Username, Password string
}

// parseAddress returns the proxy's address, or an error saying what is
// wrong with it.
func parseAddress(s string) (netip.AddrPort, error) {
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

func (c Config) validate() (netip.AddrPort, error) {
	if c.Name == "" {
		return netip.AddrPort{}, errors.New("empty name")
	}
	server, err := parseAddress(c.Address)
	if err != nil {
		return netip.AddrPort{}, err
	}
	switch {
	case strings.Contains(c.Username, ":"):
		return netip.AddrPort{}, errors.New("username contains ':', which Basic authentication cannot carry")
	case strings.ContainsFunc(c.Username+c.Password, isCTL):
		return netip.AddrPort{}, errors.New("username or password contains a control character")
	case c.Username == "" && c.Password != "":
		return netip.AddrPort{}, errors.New("password without a username")
	}
	return server, nil
}

// isCTL reports an ASCII control character.
func isCTL(r rune) bool { return r < 0x20 || r == 0x7f }
