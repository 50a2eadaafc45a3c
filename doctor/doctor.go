package doctor

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/tungate/tungate/sysdns"
	"github.com/tungate/tungate/sysroute"
)

// `tungate doctor`: Inspect reads what of the host's state matters to
// tungate (read-only), Diagnose checks it against a configuration and
// returns each check as ok or a problem with its fix in words. Diagnose is
// pure, so that every check is tested with made-up states.

// ErrUnsupported is returned by Inspect on an OS where it is not built
// yet.
var ErrUnsupported = errors.New("tungate doctor is not supported on this OS yet")

// Config is the configuration Diagnose checks the host against.
type Config struct {
	// Route is what auto-route installs (Route.Journal is route.journal).
	Route sysroute.Config
	// Auto is route.auto.
	Auto bool
	// SetSystemDNS, DNSEnabled and DNSListen are route.set_system_dns,
	// dns.enabled and dns.listen.
	SetSystemDNS bool
	DNSEnabled   bool
	DNSListen    netip.Addr
	// Outbounds are the direct outbounds' bound interfaces (those with
	// one).
	Outbounds []OutboundInterface
	// SourceCIDRs are the rules' source_cidr prefixes: one that holds no
	// address of this host selects other hosts' traffic, which needs
	// forwarding.
	SourceCIDRs []netip.Prefix
	// ConfigFlag is how a fix names the configuration: "--config FILE"
	// ("" for the embedded default).
	ConfigFlag string
}

// OutboundInterface is an outbound bound to an interface.
type OutboundInterface struct {
	Key       string // "outbounds[0] (direct)"
	Interface string
}

// HostState is what Inspect found.
type HostState struct {
	Tun TunState
	// Links are the names of every network interface.
	Links []string
	// LocalAddrs are the addresses assigned to this host's interfaces.
	LocalAddrs []netip.Addr
	// Rules are every ip rule of both families, by priority.
	Rules []sysroute.HostRule
	// TableRoutes are the routes of tungate's table; Defaults the main
	// table's default routes.
	TableRoutes, Defaults []sysroute.HostRoute
	// Sysctls holds the values read, by name
	// ("net.ipv4.conf.all.rp_filter"); an unreadable one is absent.
	Sysctls map[string]int
	NFT     NFTState
	Resolv  ResolvState
	// RouteJournal and DNSJournal say whether route.journal and the
	// system DNS journal exist.
	RouteJournal, DNSJournal bool
	// Errors are what could not be read.
	Errors []string
}

// TunState is the TUN device's state.
type TunState struct {
	Name       string
	Exists, Up bool
	Addrs      []netip.Prefix
}

// NFTState is what the nftables ruleset shows of tungate.
type NFTState struct {
	// Checked is false when the ruleset could not be listed (Note says
	// why).
	Checked bool
	Note    string
	// Tables are every table as "FAMILY NAME".
	Tables []string
}

// ResolvState is the system resolver's configuration file.
type ResolvState struct {
	Path string
	// Symlink is the link's target when Path is a symlink.
	Symlink     string
	Nameservers []netip.Addr
	// ByTungate: tungate wrote it (route.set_system_dns); ByResolved: it
	// is systemd-resolved's.
	ByTungate, ByResolved bool
	Err                   string
}

// Finding is one check's result.
type Finding struct {
	Check   string
	Problem bool
	// Detail says what was found (and, for a problem, why it matters).
	Detail string
	// Fix says what to do about a problem.
	Fix string
}

// String renders f as "ok: CHECK: DETAIL" or "PROBLEM: CHECK: DETAIL —
// fix: FIX".
func (f Finding) String() string {
	if !f.Problem {
		return fmt.Sprintf("ok: %s: %s", f.Check, f.Detail)
	}
	return fmt.Sprintf("PROBLEM: %s: %s — fix: %s", f.Check, f.Detail, f.Fix)
}

// Bands returns the band of each family that c's auto-route uses (see
// sysroute.Config.Bands).
func (c *Config) Bands() ([]sysroute.Band, error) { return c.Route.Bands() }

// Diagnose checks s against c. It changes nothing.
func Diagnose(c Config, s *HostState) []Finding {
	var out []Finding
	for _, check := range []func(Config, *HostState) []Finding{
		checkTun, checkBand, checkTable, checkRPFilter, checkForwarding,
		checkDefaultRoute, checkOutboundInterfaces, checkNFT, checkDNS, checkJournals,
	} {
		out = append(out, check(c, s)...)
	}
	for _, e := range s.Errors {
		out = append(out, Finding{Check: "inspect", Problem: true, Detail: "could not read " + e,
			Fix: "run tungate doctor as root, in the network namespace tungate runs in"})
	}
	return out
}

// Problems counts the problems among fs.
func Problems(fs []Finding) int {
	n := 0
	for _, f := range fs {
		if f.Problem {
			n++
		}
	}
	return n
}

func (c Config) cmd(sub string) string {
	if c.ConfigFlag == "" {
		return "tungate " + sub
	}
	return "tungate " + sub + " " + c.ConfigFlag
}

func checkTun(c Config, s *HostState) []Finding {
	name := s.Tun.Name
	switch {
	case !s.Tun.Exists:
		return []Finding{{Check: "tun", Problem: true,
			Detail: fmt.Sprintf("%s does not exist: tungate is not running, or runs with another tun.name (or in another network namespace)", name),
			Fix:    fmt.Sprintf("start tungate (%s); run doctor where tungate runs", c.cmd("run"))}}
	case !s.Tun.Up:
		return []Finding{{Check: "tun", Problem: true,
			Detail: fmt.Sprintf("%s exists but is down: nothing routed into it reaches tungate, and the kernel has dropped the routes through it", name),
			Fix:    fmt.Sprintf("restart tungate, which brings %s up and installs its routes again (`ip link set %s up` alone does not bring the routes back)", name, name)}}
	}
	addrs := make([]string, len(s.Tun.Addrs))
	for i, a := range s.Tun.Addrs {
		addrs[i] = a.String()
	}
	return []Finding{{Check: "tun", Detail: fmt.Sprintf("%s exists and is up (%s)", name, strings.Join(addrs, ", "))}}
}

// ipRuleDel turns a rule's text ("9001: from all lookup 100 proto boot")
// into the command that deletes exactly it.
func ipRuleDel(f int, text string) string {
	prio, rest, ok := strings.Cut(text, ":")
	if !ok {
		return fmt.Sprintf("ip -%d rule del %s", f, text)
	}
	return fmt.Sprintf("ip -%d rule del priority %s %s", f, strings.TrimSpace(prio), strings.TrimSpace(rest))
}

func checkBand(c Config, s *HostState) []Finding {
	if !c.Auto {
		return []Finding{{Check: "ip rules", Detail: "route.auto is off: tungate installs no rules, so its band is not checked"}}
	}
	bands, planErr := c.Bands()
	var out []Finding
	if planErr != nil {
		out = append(out, Finding{Check: "ip rules", Problem: true,
			Detail: fmt.Sprintf("tungate cannot install its rules with this configuration: %v", planErr),
			Fix:    "correct the configuration (" + c.cmd("check") + ")"})
	}
	for _, b := range bands {
		var ours int
		for _, ru := range s.Rules {
			if ru.Family != b.Family || ru.Priority < b.First || ru.Priority > b.Last {
				continue
			}
			if ru.Proto == sysroute.ProtoTungate {
				ours++
				continue
			}
			out = append(out, Finding{Check: "ip rules", Problem: true,
				Detail: fmt.Sprintf("ipv%d rule \"%s\" (proto %s) is not tungate's but sits in tungate's band %d-%d: traffic meets it between tungate's rules (tungate's gotos jump past it or land on it), and tungate refuses to start over it",
					b.Family, ru.Text, sysroute.ProtoName(ru.Proto), b.First, b.Last),
				Fix: fmt.Sprintf("remove it (%s) or give tungate another band (route.priority)", ipRuleDel(b.Family, ru.Text))})
		}
		if planErr != nil {
			continue
		}
		switch {
		case s.Tun.Exists && ours != b.Rules:
			out = append(out, Finding{Check: "ip rules", Problem: true,
				Detail: fmt.Sprintf("%d of tungate's %d ipv%d rules are in the band %d-%d: the running tungate uses another configuration (route.priority, route.auto), or its rules were removed, so ipv%d traffic does not go through it as configured",
					ours, b.Rules, b.Family, b.First, b.Last, b.Family),
				Fix: fmt.Sprintf("restart tungate with this configuration (%s)", c.cmd("run"))})
		case !s.Tun.Exists && ours > 0:
			out = append(out, Finding{Check: "ip rules", Problem: true,
				Detail: fmt.Sprintf("%d ipv%d rules of a tungate that is not running are left in the band %d-%d", ours, b.Family, b.First, b.Last),
				Fix:    fmt.Sprintf("remove them: %s (or start tungate, which cleans up first)", c.cmd("cleanup"))})
		case s.Tun.Exists:
			out = append(out, Finding{Check: "ip rules", Detail: fmt.Sprintf("ipv%d: tungate's %d rules at %d-%d, nobody else's", b.Family, b.Rules, b.First, b.Last)})
		}
	}
	return out
}

func checkTable(c Config, s *HostState) []Finding {
	if !c.Auto {
		return nil
	}
	var out []Finding
	table := c.Route.Table
	for _, rt := range s.TableRoutes {
		if rt.Proto != sysroute.ProtoTungate {
			out = append(out, Finding{Check: "routes", Problem: true,
				Detail: fmt.Sprintf("table %d has a route that is not tungate's (%s): traffic tungate's rules send to its table may take it, and tungate refuses to start over it", table, rt.Text),
				Fix:    fmt.Sprintf("remove it (ip -%d route del %s table %d) or give tungate another table (route.table)", rt.Family, sysroute.RouteDst(rt), table)})
		}
	}
	if !s.Tun.Exists {
		return out
	}
	for _, want := range c.Route.PlannedRoutes() {
		var got *sysroute.HostRoute
		for i, rt := range s.TableRoutes {
			if rt.Family == want.Family && rt.Dst == want.Dst && rt.Proto == sysroute.ProtoTungate {
				got = &s.TableRoutes[i]
			}
		}
		wantText := fmt.Sprintf("ipv%d default dev %s", want.Family, want.Dev)
		if want.Type == "unreachable" {
			wantText = fmt.Sprintf("ipv%d unreachable default (route.strict)", want.Family)
		}
		switch {
		case got == nil:
			out = append(out, Finding{Check: "routes", Problem: true,
				Detail: fmt.Sprintf("table %d lacks tungate's %s: the band's lookup in it finds nothing, so ipv%d traffic bypasses tungate", table, wantText, want.Family),
				Fix:    "restart tungate (the kernel removes a device's routes when the device goes down or away)"})
		case want.Type == "unicast" && got.Dev != want.Dev:
			out = append(out, Finding{Check: "routes", Problem: true,
				Detail: fmt.Sprintf("table %d's ipv%d default goes to %q, not to the TUN %s", table, want.Family, got.Dev, want.Dev),
				Fix:    "restart tungate with this configuration (tun.name)"})
		default:
			out = append(out, Finding{Check: "routes", Detail: fmt.Sprintf("table %d has %s", table, wantText)})
		}
	}
	return out
}

// selectsByOwner reports whether c's band keeps some traffic that has no
// owner — uid 0 and no mark, as the kernel's reverse path check looks up
// a reply's sender — out of the TUN, and names the key that does.
func selectsByOwner(r sysroute.Config) (string, bool) {
	switch {
	case len(r.IncludeUIDs) > 0:
		return "route.include_uids", true
	case len(r.IncludeCgroups) > 0:
		return "route.include_cgroups", true
	}
	for _, u := range r.ExcludeUIDs {
		if u.Contains(0) {
			return "route.exclude_uids (with uid 0)", true
		}
	}
	return "", false
}

func checkRPFilter(c Config, s *HostState) []Finding {
	const check = "rp_filter"
	tun := s.Tun.Name
	all, okAll := s.Sysctls["net.ipv4.conf.all.rp_filter"]
	devKey := "net.ipv4.conf." + tun + ".rp_filter"
	if !s.Tun.Exists {
		devKey = "net.ipv4.conf.default.rp_filter"
	}
	dev, okDev := s.Sysctls[devKey]
	if !okAll && !okDev {
		return []Finding{{Check: check, Detail: "not readable; not checked"}}
	}
	// The kernel uses the larger of the two.
	eff := max(all, dev)
	seen := fmt.Sprintf("net.ipv4.conf.all.rp_filter=%d, %s=%d", all, devKey, dev)
	key, selective := selectsByOwner(c.Route)
	switch {
	case !c.Auto:
		return []Finding{{Check: check, Detail: seen + " (route.auto is off: not checked)"}}
	case eff == 1 && selective:
		return []Finding{{Check: check, Problem: true,
			Detail: fmt.Sprintf("%s is strict, and %s selects apps: the kernel checks each reply arriving on %s by looking up the route back to its sender as uid 0 with no mark; that lookup skips tungate's band to the main table's default route, which is not %s, so the selected apps' replies are dropped as spoofed",
				seen, key, tun, tun),
			Fix: fmt.Sprintf("loose mode: sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.%s.rp_filter=2 (and net.ipv4.conf.default.rp_filter=2 for a TUN created later)", tun)}}
	case eff == 1:
		return []Finding{{Check: check, Detail: seen + " (strict is fine: the route back to a reply's sender goes into the TUN)"}}
	}
	return []Finding{{Check: check, Detail: seen}}
}

func checkForwarding(c Config, s *HostState) []Finding {
	var need4, need6 []string
	for _, p := range c.SourceCIDRs {
		local := slices.ContainsFunc(s.LocalAddrs, func(a netip.Addr) bool { return p.Contains(a.Unmap()) })
		if local {
			continue
		}
		if p.Addr().Unmap().Is4() {
			need4 = append(need4, p.String())
		} else {
			need6 = append(need6, p.String())
		}
	}
	if len(need4) == 0 && len(need6) == 0 {
		return []Finding{{Check: "ip_forward", Detail: "not needed: no rule selects traffic from other hosts (source_cidr)"}}
	}
	var out []Finding
	for _, n := range []struct {
		fam  int
		nets []string
		key  string
	}{{4, need4, "net.ipv4.ip_forward"}, {6, need6, "net.ipv6.conf.all.forwarding"}} {
		if len(n.nets) == 0 {
			continue
		}
		v, ok := s.Sysctls[n.key]
		switch {
		case ok && v == 1:
			out = append(out, Finding{Check: "ip_forward", Detail: fmt.Sprintf("%s=1 for rules on other hosts' traffic (%s)", n.key, strings.Join(n.nets, ", "))})
		default:
			out = append(out, Finding{Check: "ip_forward", Problem: true,
				Detail: fmt.Sprintf("rules select other hosts' traffic (source_cidr %s) but %s=%d: the kernel drops their packets instead of routing them into the TUN", strings.Join(n.nets, ", "), n.key, v),
				Fix:    fmt.Sprintf("sysctl -w %s=1, and make this host those hosts' gateway", n.key)})
		}
	}
	return out
}

func checkDefaultRoute(c Config, s *HostState) []Finding {
	var out []Finding
	var found []string
	for _, rt := range s.Defaults {
		if rt.Type != "unicast" {
			continue
		}
		if s.Tun.Name != "" && rt.Dev == s.Tun.Name {
			out = append(out, Finding{Check: "default interface", Problem: true,
				Detail: fmt.Sprintf("the main table's ipv%d default route goes into the TUN (%s): the direct outbound's traffic would come back into tungate", rt.Family, rt.Text),
				Fix:    fmt.Sprintf("delete it (ip -%d route del default dev %s) and let route.auto send traffic into the TUN through its own table", rt.Family, rt.Dev)})
			continue
		}
		found = append(found, fmt.Sprintf("ipv%d %s (%s)", rt.Family, rt.Dev, rt.Text))
	}
	if len(found) == 0 && len(out) == 0 {
		return []Finding{{Check: "default interface", Problem: true,
			Detail: "the main table has no default route: the direct outbound (and the proxies' transport) reaches only networks with routes of their own",
			Fix:    "restore the host's default route (ip route add default via GATEWAY dev IFACE), or bind the direct outbound to an interface (outbounds[].interface)"}}
	}
	if len(found) > 0 {
		out = append(out, Finding{Check: "default interface", Detail: "detected " + strings.Join(found, "; ")})
	}
	return out
}

func checkOutboundInterfaces(c Config, s *HostState) []Finding {
	var out []Finding
	for _, o := range c.Outbounds {
		if o.Interface == "" {
			continue
		}
		switch {
		case !slices.Contains(s.Links, o.Interface):
			out = append(out, Finding{Check: "outbound interface", Problem: true,
				Detail: fmt.Sprintf("%s is bound to %s, which does not exist: its connections fail", o.Key, o.Interface),
				Fix:    fmt.Sprintf("set %s.interface to an existing interface, or to \"\" to use the default route's", strings.Fields(o.Key)[0])})
		case o.Interface == s.Tun.Name:
			out = append(out, Finding{Check: "outbound interface", Problem: true,
				Detail: fmt.Sprintf("%s is bound to the TUN %s: its traffic loops back into tungate", o.Key, o.Interface),
				Fix:    fmt.Sprintf("set %s.interface to the physical interface, or \"\"", strings.Fields(o.Key)[0])})
		default:
			out = append(out, Finding{Check: "outbound interface", Detail: fmt.Sprintf("%s is bound to %s", o.Key, o.Interface)})
		}
	}
	return out
}

// TungateTables returns the nftables tables named like tungate's.
func (n NFTState) TungateTables() []string {
	var out []string
	for _, t := range n.Tables {
		if strings.Contains(strings.ToLower(t), "tungate") {
			out = append(out, t)
		}
	}
	return out
}

func checkNFT(c Config, s *HostState) []Finding {
	const check = "nftables"
	if !s.NFT.Checked {
		return []Finding{{Check: check, Detail: "not checked: " + s.NFT.Note}}
	}
	ours := s.NFT.TungateTables()
	cgroups := len(c.Route.IncludeCgroups) > 0 || len(c.Route.ExcludeCgroups) > 0
	// Install names its table after route.table ("inet tungate2022").
	want := fmt.Sprintf("tungate%d", c.Route.Table)
	has := slices.ContainsFunc(ours, func(t string) bool { return strings.HasSuffix(t, " "+want) })
	switch {
	case cgroups && c.Auto && s.Tun.Exists && !has:
		return []Finding{{Check: check, Problem: true,
			Detail: fmt.Sprintf("route.include_cgroups/exclude_cgroups are set but there is no nftables table %s: nothing marks the selected cgroups' packets, so the selection does not apply", want),
			Fix:    fmt.Sprintf("restart tungate with this configuration (%s) and check its log for nftables errors", c.cmd("run"))}}
	case len(ours) > 0:
		return []Finding{{Check: check, Detail: "tungate's table: " + strings.Join(ours, ", ")}}
	}
	return []Finding{{Check: check, Detail: "no table of tungate's (none is needed without cgroup selection)"}}
}

func addrsString(as []netip.Addr) string {
	if len(as) == 0 {
		return "no nameserver"
	}
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ", ")
}

func checkDNS(c Config, s *HostState) []Finding {
	const check = "system DNS"
	r := s.Resolv
	if r.Err != "" {
		return []Finding{{Check: check, Detail: fmt.Sprintf("%s: %s", r.Path, r.Err)}}
	}
	names := slices.Contains(r.Nameservers, c.DNSListen) && c.DNSListen.IsValid()
	seen := fmt.Sprintf("%s names %s", r.Path, addrsString(r.Nameservers))
	if r.Symlink != "" {
		seen += " (a symlink to " + r.Symlink + ")"
	}
	running := s.Tun.Exists
	switch {
	case names && !running:
		return []Finding{{Check: check, Problem: true,
			Detail: fmt.Sprintf("%s, tungate's dns.listen, but tungate is not running: name resolution fails", seen),
			Fix:    fmt.Sprintf("start tungate again (%s): it restores the resolver a killed run changed first; or restore %s by hand", c.cmd("run"), r.Path)}}
	case names && !c.DNSEnabled:
		return []Finding{{Check: check, Problem: true,
			Detail: seen + ", tungate's dns.listen, but dns.enabled is false: nothing answers there",
			Fix:    "set dns.enabled: true, or point the resolver elsewhere"}}
	case c.SetSystemDNS && running && !names && r.ByResolved:
		return []Finding{{Check: check, Detail: seen + ": systemd-resolved's; tungate sets its TUN link's DNS there (resolvectl dns " + s.Tun.Name + ")"}}
	case c.SetSystemDNS && running && !names:
		return []Finding{{Check: check, Problem: true,
			Detail: fmt.Sprintf("route.set_system_dns is on but %s, not dns.listen %s: apps do not ask tungate", seen, c.DNSListen),
			Fix:    "see tungate's log (\"system DNS\") and restart it; something else may have rewritten " + r.Path}}
	case names:
		return []Finding{{Check: check, Detail: seen + ": tungate's DNS proxy"}}
	}
	return []Finding{{Check: check, Detail: seen + " (tungate answers only the queries that reach it: dns.hijack)"}}
}

func checkJournals(c Config, s *HostState) []Finding {
	if s.Tun.Exists {
		return nil
	}
	var out []Finding
	if s.RouteJournal {
		out = append(out, Finding{Check: "journal", Problem: true,
			Detail: fmt.Sprintf("route.journal %s exists but tungate is not running: a killed tungate's routes and rules may be left", c.Route.Journal),
			Fix:    fmt.Sprintf("%s (or start tungate, which cleans up first)", c.cmd("cleanup"))})
	}
	if s.DNSJournal {
		out = append(out, Finding{Check: "journal", Problem: true,
			Detail: fmt.Sprintf("%s exists but tungate is not running: the system resolver a killed tungate changed is not restored", sysdns.JournalPath(c.Route.Journal)),
			Fix:    fmt.Sprintf("start tungate again (%s), which restores it first, then stop it", c.cmd("run"))})
	}
	return out
}
