package socks5

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/tungate/tungate/outbound"
)

// Config configures a SOCKS5 outbound.
type Config struct {
	Name string `mapstructure:"-"`
	// Address is the proxy's host:port. The host must be an IP literal
	// for now; a name is refused with an error.
	Address string `mapstructure:"address"`
	// Username, when set, makes the outbound offer username/password
	// authentication (and only that); empty offers no authentication.
	// Each is at most 255 bytes.
	Username string `mapstructure:"username"`
	Password string `mapstructure:"password"`
	// UDP carries UDP sessions through UDP ASSOCIATE; false refuses them
	// with an error wrapping outbound.ErrRefused.
	UDP bool `mapstructure:"udp"`
}

func (c Config) validate() (netip.AddrPort, error) {
	if c.Name == "" {
		return netip.AddrPort{}, errors.New("empty name")
	}
	server, err := outbound.ParseProxyAddress(c.Address)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if _, err := c.credentialsProblem(); err != nil {
		return netip.AddrPort{}, err
	}
	return server, nil
}

// credentialsProblem says what is wrong with the credentials (RFC 1929),
// and under which key.
func (c Config) credentialsProblem() (key string, err error) {
	switch {
	case len(c.Username) > 255:
		return "username", fmt.Errorf("username is %d bytes, RFC 1929 allows 255", len(c.Username))
	case len(c.Password) > 255:
		return "password", fmt.Errorf("password is %d bytes, RFC 1929 allows 255", len(c.Password))
	case c.Username == "" && c.Password != "":
		return "password", errors.New("password without a username")
	}
	return "", nil
}
