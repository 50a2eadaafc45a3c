package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/forwarder"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/sysroute"
)

// installedRoutes is what installRoutes leaves for removeRoutes to undo
// (the gateway's routes field).
type installedRoutes = *sysroute.Routes

// ownMarks returns the fwmarks on tungate's own upstream sockets — every
// direct outbound's, and the proxy transport's (the first direct
// outbound's, or defaultFWMark without one) — and whether some of them
// carry none.
func ownMarks(cfg *configs.Config) (marks []uint32, unmarked bool) {
	direct := false
	for _, o := range cfg.Outbounds {
		if o.Type != configs.OutboundDirect {
			continue
		}
		direct = true
		if o.FWMark == 0 {
			unmarked = true
		} else {
			marks = append(marks, o.FWMark)
		}
	}
	if !direct {
		marks = append(marks, defaultFWMark)
	}
	return marks, unmarked
}

// routeConfig is the sysroute configuration for cfg and the TUN tunName.
func routeConfig(cfg *configs.Config, tunName string) sysroute.Config {
	marks, _ := ownMarks(cfg)
	r := cfg.Route
	return sysroute.Config{
		TunName:          tunName,
		TunAddrs:         cfg.Tun.Address,
		Table:            r.Table,
		Priority:         r.Priority,
		FWMarks:          marks,
		IncludeUIDs:      r.IncludeUIDs,
		ExcludeUIDs:      r.ExcludeUIDs,
		IncludeCgroups:   r.IncludeCgroups,
		ExcludeCgroups:   r.ExcludeCgroups,
		ExcludeAddresses: r.ExcludeAddresses,
		Strict:           r.Strict,
		Journal:          r.Journal,
	}
}

// installRoutes sets up the OS routing that sends traffic into the TUN
// (route.auto): it removes what a killed earlier run left, then installs
// tungate's table and rules (see sysroute).
func (g *gateway) installRoutes(cfg *configs.Config) error {
	if cfg.Route.SetSystemDNS {
		g.log.Warn("route.set_system_dns is not supported yet; point the system resolver at dns.listen yourself", "dns.listen", cfg.DNS.Listen)
	}
	if !cfg.Route.Auto {
		return nil
	}
	for i, o := range cfg.Outbounds {
		if o.Type == configs.OutboundDirect && o.FWMark == 0 && o.Interface == "" {
			g.log.Warn("auto-route: this outbound's sockets carry no fwmark and are bound to no interface, so its traffic comes back into the TUN; set its fwmark",
				"outbound", fmt.Sprintf("outbounds[%d] (%s)", i, o.Name))
		}
	}
	rc := routeConfig(cfg, g.dev.Name())
	r, err := sysroute.Install(rc, g.log.With("component", "route"))
	if err != nil {
		return err
	}
	g.routes = r
	first, last := r.Band()
	marks := make([]string, len(rc.FWMarks))
	for i, m := range rc.FWMarks {
		marks[i] = fmt.Sprintf("%#x", m)
	}
	g.log.Info("auto-route installed", "tun", rc.TunName, "table", rc.Table, "rules", fmt.Sprintf("%d-%d", first, last),
		"excluded_fwmarks", strings.Join(marks, ","), "strict", rc.Strict, "journal", rc.Journal)
	for _, line := range r.Rules() {
		g.log.Debug("auto-route rule", "rule", line)
	}
	return nil
}

// removeRoutes undoes installRoutes; it is called first on shutdown.
func (g *gateway) removeRoutes() {
	if g.routes == nil {
		return
	}
	if err := g.routes.Close(); err != nil {
		g.log.Error("auto-route: removing routes and rules", "err", err)
		return
	}
	g.log.Info("auto-route removed")
}

// loopGuard wraps the flow router: a flow that one of tungate's own
// upstream sockets sent into the TUN (a routing loop: an outbound whose
// fwmark no rule excludes, or one bound to the TUN) is refused at once —
// a RST, or ICMP port unreachable for UDP — with one log line saying how
// to fix it, instead of being dialled again, which would loop until the
// dial timeout. Other flows go to route unchanged.
//
// It is wired in start() by one line after the route closure:
//
//	route = g.loopGuard(cfg, route)
func (g *gateway) loopGuard(cfg *configs.Config, route forwarder.Route) forwarder.Route {
	log := g.log.With("component", "loop")
	marks, unmarked := ownMarks(cfg)
	lc := sysroute.LoopConfig{Marks: marks, Unmarked: unmarked, Priority: cfg.Route.Priority, Tun: cfg.Tun.Name}
	if cfg.Route.Auto {
		lc.Excluded = marks // sysroute excludes exactly these
	}
	// The detector lives as long as the process (two netlink sockets).
	det, err := sysroute.NewLoopDetector(lc, log)
	if err != nil {
		log.Warn("loop detection is off", "err", err)
		return route
	}
	log.Debug("loop guard on", "fwmarks", marks, "unmarked_outbounds", unmarked)
	return func(f *forwarder.Flow) outbound.Dialer {
		if det.Loop(f.Network, f.Src, f.Dst) {
			return loopRefusal{}
		}
		return route(f)
	}
}

// loopRefusal refuses a looping flow.
type loopRefusal struct{}

func (loopRefusal) Name() string { return "loop-guard" }

func (loopRefusal) DialTCP(_ context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	return nil, fmt.Errorf("routing loop to %s refused: %w", dst, outbound.ErrRefused)
}

func (loopRefusal) ListenUDP(_ context.Context, first outbound.Target) (outbound.PacketConn, error) {
	return nil, fmt.Errorf("routing loop to %s refused: %w", first, outbound.ErrRefused)
}

// CarriesUDP implements outbound.UDPCarrier: a looping datagram is
// refused at once (ICMP port unreachable).
func (loopRefusal) CarriesUDP() bool { return false }

var _ outbound.UDPCarrier = loopRefusal{}
