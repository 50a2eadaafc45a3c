package gateway

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/doctor"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/sysdns"
	"github.com/tungate/tungate/sysroute"
)

// systemState is tungate's changes to the host: routes and rules
// (route.auto) and the system resolver (route.set_system_dns).
type systemState struct {
	routes *sysroute.Routes
	dns    *sysdns.SystemDNS
}

// RouteConfig is the sysroute configuration for cfg and the TUN tunName.
func RouteConfig(cfg *configs.Config, tunName string) sysroute.Config {
	marks, _ := OwnMarks(cfg)
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
func (g *Gateway) installRoutes(cfg *configs.Config) error {
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
func (g *Gateway) installAutoRoute(cfg *configs.Config) error {
	for i, o := range cfg.Outbounds {
		if so, ok := o.Settings.(outbound.SocketOwner); ok && so.Socket() == (outbound.Socket{}) {
			g.log.Warn("auto-route: this outbound's sockets carry no fwmark; they stay out of the TUN only while bound to a detected default interface; set its fwmark",
				"outbound", fmt.Sprintf("outbounds[%d] (%s)", i, o.Name))
		}
	}
	rc := RouteConfig(cfg, g.dev.Name())
	r, err := sysroute.Install(rc, g.log.With("component", "route"))
	if err != nil {
		return err
	}
	g.system.routes = r
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

// systemDNSConfig is the sysroute configuration of route.set_system_dns.
func systemDNSConfig(cfg *configs.Config, tunName string) sysdns.Config {
	return sysdns.Config{
		Server:  cfg.DNS.Listen,
		Link:    tunName,
		Journal: sysdns.JournalPath(cfg.Route.Journal),
	}
}

// setSystemDNS points the system resolver at dns.listen.
func (g *Gateway) setSystemDNS(cfg *configs.Config) error {
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
	g.system.dns = d
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
func (g *Gateway) removeRoutes() {
	if d := g.system.dns; d != nil {
		if err := d.Close(); err != nil {
			g.log.Error("system DNS: restoring the resolver", "err", err)
		} else {
			g.log.Info("system DNS restored")
		}
	}
	r := g.system.routes
	if r == nil {
		return
	}
	if err := r.Close(); err != nil {
		g.log.Error("auto-route: removing routes and rules", "err", err)
		return
	}
	g.log.Info("auto-route removed")
}

// Cleanup is what every start does first, by hand: it restores the system
// resolver and removes the routes, rules and nft table a killed tungate
// left behind, by its journals and by tungate's tag in its band and
// table. It returns how many routing objects it removed and how many
// resolver settings it restored.
func Cleanup(cfg *configs.Config, log *slog.Logger) (removed, restored int, err error) {
	restored, err = sysdns.Restore(sysdns.JournalPath(cfg.Route.Journal), log)
	if err != nil {
		return 0, 0, err
	}
	removed, err = sysroute.Cleanup(RouteConfig(cfg, cfg.Tun.Name), log)
	return removed, restored, err
}

// DoctorConfig is what doctor checks the host against for cfg; path is
// the configuration file ("" for the embedded default).
func DoctorConfig(cfg *configs.Config, path string) doctor.Config {
	dc := doctor.Config{
		Route:        RouteConfig(cfg, cfg.Tun.Name),
		Auto:         cfg.Route.Auto,
		SetSystemDNS: cfg.Route.SetSystemDNS,
		DNSEnabled:   cfg.DNS.Enabled,
		DNSListen:    cfg.DNS.Listen,
	}
	if path != "" {
		dc.ConfigFlag = "--config " + path
	}
	for i, o := range cfg.Outbounds {
		if so, ok := o.Settings.(outbound.SocketOwner); ok && so.Socket().Interface != "" {
			dc.Outbounds = append(dc.Outbounds, doctor.OutboundInterface{Key: fmt.Sprintf("outbounds[%d] (%s)", i, o.Name), Interface: so.Socket().Interface})
		}
	}
	for _, r := range cfg.Rules {
		dc.SourceCIDRs = append(dc.SourceCIDRs, r.SourceCIDR...)
	}
	return dc
}
