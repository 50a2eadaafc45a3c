package socks5

import (
	"fmt"
	"net/netip"

	"github.com/tungate/tungate/outbound"
)

// Type is the value of outbounds[].type for this kind.
const Type = "socks5"

func init() {
	outbound.Register(outbound.Kind{Type: Type, NewConfig: func() outbound.Config { return &Config{UDP: true} }})
}

// Validate implements outbound.Config: everything New would refuse.
func (c *Config) Validate() []outbound.Problem {
	problems := outbound.ProxyAddressProblems(Type, c.Address)
	if key, err := c.credentialsProblem(); err != nil {
		problems = append(problems, outbound.Problem{Key: key, Msg: err.Error()})
	}
	return problems
}

// New implements outbound.Config: the proxy is reached through
// deps.Transport.
func (c *Config) New(name string, deps outbound.Deps) (outbound.Dialer, error) {
	cfg := *c
	cfg.Name = name
	return New(cfg, deps.Transport, deps.Logger(name))
}

// String describes the outbound for doctor.
func (c *Config) String() string { return Type + " " + c.Address }

// Upstream implements outbound.Explainer: the transport's socket to the
// proxy; for UDP the relay's port is the proxy's pick.
func (c *Config) Upstream(_ netip.AddrPort, network string) outbound.Upstream {
	u := outbound.Upstream{Addr: c.Address, Network: "tcp", Transport: true, What: fmt.Sprintf("tungate's socket to the %s proxy %s", Type, c.Address)}
	if network == "udp" {
		u.Network = "" // UDP ASSOCIATE relays to a port the proxy picks
	}
	return u
}
