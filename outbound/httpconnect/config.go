package httpconnect

import (
	"errors"
	"net/netip"
	"strings"

	"github.com/tungate/tungate/outbound"
)

// Config configures an HTTP CONNECT outbound.
type Config struct {
	Name string `mapstructure:"-"`
	// Address is the proxy's host:port. The host must be an IP literal
	// for now; a name is refused with an error.
	Address string `mapstructure:"address"`
	// Username, when set, is sent with Password in a
	// "Proxy-Authorization: Basic" header on every CONNECT.
	Username string `mapstructure:"username"`
	Password string `mapstructure:"password"`
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

// credentialsProblem says what is wrong with the credentials (what Basic
// authentication can carry), and under which key.
func (c Config) credentialsProblem() (key string, err error) {
	switch {
	case strings.Contains(c.Username, ":"):
		return "username", errors.New("username contains ':', which Basic authentication cannot carry")
	case strings.ContainsFunc(c.Username+c.Password, isCTL):
		return "username", errors.New("username or password contains a control character")
	case c.Username == "" && c.Password != "":
		return "password", errors.New("password without a username")
	}
	return "", nil
}

// isCTL reports an ASCII control character.
func isCTL(r rune) bool { return r < 0x20 || r == 0x7f }
