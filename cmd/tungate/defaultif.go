package main

import (
	"log/slog"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/netmon"
	"github.com/tungate/tungate/outbound"
)

// followsDefault reports whether some outbound socket follows the default
// interface: a direct outbound with interface "", or the proxy transport
// when no direct outbound sets one (see buildOutbounds).
func followsDefault(cfg *configs.Config) bool {
	direct := false
	for _, o := range cfg.Outbounds {
		if o.Type == configs.OutboundDirect {
			direct = true
			if o.Interface == "" {
				return true
			}
		}
	}
	return !direct
}

// startMonitor starts following the default interface when an outbound
// needs it; nil when none does, or when it cannot be followed here (then
// those sockets are bound to no interface and rely on the fwmark, as
// before, and one line says so).
func startMonitor(cfg *configs.Config, log *slog.Logger) *netmon.Monitor {
	if !followsDefault(cfg) {
		return nil
	}
	m := netmon.New(netmon.Config{Ignore: []string{cfg.Tun.Name}}, log.With("component", "netmon"))
	if err := m.Start(); err != nil {
		log.Warn("default interface not followed: outbound sockets with interface \"\" are bound to none and rely on the fwmark", "err", err)
		m.Close()
		return nil
	}
	return m
}

// newDirect returns a direct outbound. With interface "" and a monitor,
// each new socket is bound to the interface the main table sends its
// destination out of (the default one, for the Internet), and the flows on
// an interface that can no longer carry them are ended at once.
func newDirect(dc outbound.DirectConfig, mon *netmon.Monitor, log *slog.Logger) (*outbound.Direct, error) {
	follow := dc.Interface == "" && mon != nil
	if follow {
		dc.InterfaceFor = mon.InterfaceFor
	}
	d, err := outbound.NewDirect(dc, log)
	if err != nil || !follow {
		return d, err
	}
	mon.Subscribe(func(c netmon.Change) {
		for _, g := range c.Gone {
			if n := d.AbortInterface(g.Interface, g.V6); n > 0 {
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
