package socks5

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
)

// Config configures a SOCKS5 outbound.
type Config struct {
	Name string
	// Address is the proxy's host:port. The host must be an IP literal
	// for now; a name is refused with an error.
	Address string
	// Username, when set, makes the outbound offer username/password
	// authentication (and only that); empty offers no authentication.
	// Each is at most 255 bytes.
	Username, Password string
	// UDP carries UDP sessions through UDP ASSOCIATE; false refuses them
	// with an error wrapping outbound.ErrRefused.
	UDP bool
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
	case len(c.Username) > 255:
		return netip.AddrPort{}, fmt.Errorf("username is %d bytes, RFC 1929 allows 255", len(c.Username))
	case len(c.Password) > 255:
		return netip.AddrPort{}, fmt.Errorf("password is %d bytes, RFC 1929 allows 255", len(c.Password))
	case c.Username == "" && c.Password != "":
		return netip.AddrPort{}, errors.New("password without a username")
	}
	return server, nil
}
