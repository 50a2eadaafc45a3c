// Package direct is the direct outbound kind: every flow leaves through a
// socket of tungate's own, marked with fwmark and bound to an interface
// (or to the one the default route uses, followed as it changes), so that
// it never re-enters the TUN. The sockets themselves are
// outbound.Direct's; this package is the kind's configuration,
// validation and construction.
package direct

import (
	"fmt"
	"net/netip"

	"github.com/tungate/tungate/netmon"
	"github.com/tungate/tungate/outbound"
)

// Type is the value of outbounds[].type for this kind.
const Type = "direct"

// DefaultFWMark is the mark of a direct outbound whose entry has no fwmark
// key, and of the proxy transport when no direct outbound is configured.
const DefaultFWMark = 0x2e7

func init() {
	outbound.Register(outbound.Kind{Type: Type, NewConfig: func() outbound.Config { return &Config{FWMark: DefaultFWMark} }})
}

// Config is a direct outbound's entry.
type Config struct {
	// Interface binds the outbound's sockets; "" follows the default
	// interface.
	Interface string `mapstructure:"interface"`
	// FWMark is the SO_MARK on every socket (loop prevention). YAML
	// accepts decimal or hex (0x2e7).
	FWMark uint32 `mapstructure:"fwmark"`
}

// Validate implements outbound.Config.
func (c *Config) Validate() []outbound.Problem {
	// Linux IFNAMSIZ less its NUL: a longer name can name no interface.
	if len(c.Interface) > 15 {
		return []outbound.Problem{{Key: "interface", Msg: fmt.Sprintf("%q is %d bytes, interface names have at most 15", c.Interface, len(c.Interface))}}
	}
	return nil
}

// Socket implements outbound.SocketOwner.
func (c *Config) Socket() outbound.Socket {
	return outbound.Socket{FWMark: c.FWMark, Interface: c.Interface}
}

// String describes the outbound for doctor.
func (c *Config) String() string {
	s := fmt.Sprintf("direct, fwmark %#x", c.FWMark)
	if c.Interface != "" {
		s += ", interface " + c.Interface
	}
	return s
}

// Upstream implements outbound.Explainer: the socket goes to dst itself.
func (c *Config) Upstream(dst netip.AddrPort, network string) outbound.Upstream {
	return outbound.Upstream{Addr: dst.String(), Network: network, What: fmt.Sprintf("tungate's direct socket to %s", dst)}
}

// New implements outbound.Config.
func (c *Config) New(name string, deps outbound.Deps) (outbound.Dialer, error) {
	return NewSocket(name, c.Socket(), deps)
}

// Dialer is a direct outbound.
type Dialer struct {
	*outbound.Direct
	stopFollowing func()
}

// Close stops following the default interface; open flows are left to
// their relays.
func (d *Dialer) Close() error {
	if d.stopFollowing != nil {
		d.stopFollowing()
	}
	return nil
}

// NewSocket returns a direct dialer whose sockets are made as s says:
// a direct outbound, or the proxy transport. With s.Interface "" and
// deps.Monitor set, each new socket is bound to the interface the main
// table sends its destination out of, and the flows on an interface that
// can no longer carry them are ended at once.
func NewSocket(name string, s outbound.Socket, deps outbound.Deps) (*Dialer, error) {
	log := deps.Logger(name)
	dc := outbound.DirectConfig{
		Name: name, Interface: s.Interface, FWMark: s.FWMark,
		KeepAlive: deps.KeepAlive, Resolver: deps.Resolver, Dialing: deps.Dialing,
	}
	mon := deps.Monitor
	follow := s.Interface == "" && mon != nil
	if follow {
		dc.InterfaceFor = mon.InterfaceFor
	}
	od, err := outbound.NewDirect(dc, log)
	if err != nil {
		return nil, err
	}
	d := &Dialer{Direct: od}
	if !follow {
		return d, nil
	}
	d.stopFollowing = mon.Subscribe(func(c netmon.Change) {
		for _, g := range c.Gone {
			if n := od.AbortInterface(g.Interface, g.V6); n > 0 && log != nil {
				log.Info("interface gone: flows on it reset", "interface", g.Interface, "family", familyName(g.V6), "reason", g.Reason, "flows", n)
			}
		}
	})
	return d, nil
}

func familyName(v6 bool) string {
	if v6 {
		return "ipv6"
	}
	return "ipv4"
}
