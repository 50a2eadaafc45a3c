package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/forwarder"
	"github.com/tungate/tungate/loopguard"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/sysdns"
	"github.com/tungate/tungate/sysroute"
)

// installedRoutes is what installRoutes leaves for removeRoutes to undo
// (the gateway's routes field).
type installedRoutes = *systemState

// systemState is tungate's changes to the host: routes and rules
// (route.auto) and the system resolver (route.set_system_dns).
type systemState struct {
	routes *sysroute.Routes
	dns    *sysdns.SystemDNS
}

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
//
// With route.set_system_dns it then points the system resolver at
// dns.listen (see sysdns.Set).
func (g *gateway) installRoutes(cfg *configs.Config) error {
	if g.routes == nil {
		g.routes = &systemState{}
	}
	if cfg.Route.Auto {
		if err := g.installAutoRoute(cfg); err != nil {
			return err
		}
	}
	if cfg.Route.SetSystemDNS {
		return g.setSystemDNS(cfg)
	}
	return nil
}

// installAutoRoute installs tungate's table and rules.
func (g *gateway) installAutoRoute(cfg *configs.Config) error {
	for i, o := range cfg.Outbounds {
		if o.Type == configs.OutboundDirect && o.FWMark == 0 && o.Interface == "" {
			g.log.Warn("auto-route: this outbound's sockets carry no fwmark; they stay out of the TUN only while bound to a detected default interface; set its fwmark",
				"outbound", fmt.Sprintf("outbounds[%d] (%s)", i, o.Name))
		}
	}
	rc := routeConfig(cfg, g.dev.Name())
	r, err := sysroute.Install(rc, g.log.With("component", "route"))
	if err != nil {
		return err
	}
	g.routes.routes = r
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

// systemDNSConfig is the sysdns configuration of route.set_system_dns.
func systemDNSConfig(cfg *configs.Config, tunName string) sysdns.Config {
	return sysdns.Config{
		Server:  cfg.DNS.Listen,
		Link:    tunName,
		Journal: sysdns.JournalPath(cfg.Route.Journal),
	}
}

// setSystemDNS points the system resolver at dns.listen.
func (g *gateway) setSystemDNS(cfg *configs.Config) error {
	switch {
	case !cfg.DNS.Enabled:
		return errors.New("route.set_system_dns needs dns.enabled: nothing would answer at dns.listen")
	case !cfg.DNS.Listen.IsValid():
		return errors.New("route.set_system_dns needs dns.listen: the address handed to the system resolver")
	case cfg.Route.Journal == "":
		return errors.New("route.set_system_dns needs route.journal: the original resolver is journaled beside it before it is changed")
	}
	dc := systemDNSConfig(cfg, g.dev.Name())
	d, err := sysdns.Set(dc, g.log.With("component", "sysdns"))
	if err != nil {
		return err
	}
	g.routes.dns = d
	g.log.Info("system DNS set", "server", dc.Server, "way", d.Way(), "journal", dc.Journal)
	return nil
}

// recoverSystemDNS restores the system resolver that a killed earlier
// run pointed at itself, by its journal (whether or not
// route.set_system_dns is still on). It runs before anything reads the
// system resolvers: the default dns.upstreams are read from
// /etc/resolv.conf, which would otherwise name tungate itself.
func recoverSystemDNS(cfg *configs.Config, log *slog.Logger) error {
	n, err := sysdns.Restore(sysdns.JournalPath(cfg.Route.Journal), log.With("component", "sysdns"))
	if err != nil {
		return err
	}
	if n > 0 {
		log.Info("system DNS: restored the resolver a killed earlier run had changed")
	}
	return nil
}

// removeRoutes undoes installRoutes, resolver first; it is called first
// on shutdown.
func (g *gateway) removeRoutes() {
	if g.routes == nil {
		return
	}
	if d := g.routes.dns; d != nil {
		if err := d.Close(); err != nil {
			g.log.Error("system DNS: restoring the resolver", "err", err)
		} else {
			g.log.Info("system DNS restored")
		}
	}
	r := g.routes.routes
	if r == nil {
		return
	}
	if err := r.Close(); err != nil {
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
	lc := loopguard.Config{Marks: marks, Unmarked: unmarked, Priority: cfg.Route.Priority, Tun: cfg.Tun.Name}
	if cfg.Route.Auto {
		lc.Excluded = marks // sysroute excludes exactly these
	}
	// The detector lives as long as the process (two netlink sockets).
	det, err := loopguard.New(lc, log)
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
