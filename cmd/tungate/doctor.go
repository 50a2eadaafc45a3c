package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/doctor"
	"github.com/tungate/tungate/gateway"
	"github.com/tungate/tungate/sysroute"
)

// newDoctorCmd is `tungate doctor`: it shows what of the host's state
// matters to tungate, checks it against a configuration and says, for each
// problem, how to fix it; --explain follows destinations through tungate's
// rules and the kernel's routing. It changes nothing. It exits non-zero
// when it finds a problem.
func newDoctorCmd() *cobra.Command {
	var (
		path    string
		explain []string
		uid     uidFlag
	)
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Show tungate's routing, rules, DNS and TUN on this host and check them, with a fix for each problem (read-only)",
		Long: `doctor prints the configuration in effect, tungate's ip rules and table,
its nftables table, the system resolver and the default interface, then
checks them (rp_filter, forwarding, rules of others in tungate's band, the
TUN) and prints each check as "ok" or "PROBLEM: … — fix: …". With
--explain ADDR:PORT/PROTO it names the rule and outbound tungate picks for
that destination and what the kernel does with the app's packet and with
tungate's own upstream socket. It changes nothing, and exits non-zero when
it finds a problem. Run it where tungate runs (same network namespace).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := configs.Load(path, cmd.Flags())
			if err != nil {
				return err
			}
			var queries []explainQuery
			for _, e := range explain {
				q, err := parseExplain(e)
				if err != nil {
					return fmt.Errorf("--explain %q: %w", e, err)
				}
				queries = append(queries, q)
			}
			n, err := runDoctor(cmd.OutOrStdout(), cfg, path, queries, uid.uid)
			if err != nil {
				return err
			}
			if n > 0 {
				return fmt.Errorf("doctor found %d problem(s); each PROBLEM line above says how to fix it", n)
			}
			return nil
		},
	}
	cmd.Flags().StringVarP(&path, "config", "c", "", "YAML configuration file of the tungate to check (without it: the embedded default)")
	cmd.Flags().StringArrayVar(&explain, "explain", nil, "ADDR:PORT/PROTO (e.g. 1.2.3.4:443/tcp, [2001:db8::1]:53/udp): how tungate and the kernel route it; repeatable")
	cmd.Flags().Var(&uid, "uid", "with --explain: the uid of the app whose packets are looked up (default: doctor's own)")
	configs.BindFlags(cmd.Flags())
	return cmd
}

// uidFlag is --uid: unset until given, so that the usage text shows no
// made-up default of its own (pflag prints a default only when its text
// is not empty).
type uidFlag struct{ uid *uint32 }

func (f *uidFlag) String() string {
	if f.uid == nil {
		return ""
	}
	return strconv.FormatUint(uint64(*f.uid), 10)
}

func (f *uidFlag) Set(s string) error {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return errors.New("want a uid, 0 to 4294967295")
	}
	u := uint32(n)
	f.uid = &u
	return nil
}

func (f *uidFlag) Type() string { return "uid" }

// explainQuery is one --explain destination.
type explainQuery struct {
	dst   netip.AddrPort
	proto string
}

func (q explainQuery) String() string { return q.dst.String() + "/" + q.proto }

func parseExplain(s string) (explainQuery, error) {
	ap, proto, ok := strings.Cut(s, "/")
	if !ok || (proto != "tcp" && proto != "udp") {
		return explainQuery{}, errors.New("want ADDR:PORT/tcp or ADDR:PORT/udp")
	}
	dst, err := netip.ParseAddrPort(ap)
	if err != nil {
		return explainQuery{}, fmt.Errorf("want ADDR:PORT/PROTO: %w", err)
	}
	return explainQuery{dst: netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()), proto: proto}, nil
}

// runDoctor prints the report and returns how many problems it found.
func runDoctor(w io.Writer, cfg *configs.Config, path string, queries []explainQuery, uid *uint32) (int, error) {
	printConfig(w, cfg, path)
	dc := gateway.DoctorConfig(cfg, path)
	st, err := doctor.Inspect(dc)
	if err != nil {
		return 0, err
	}
	printState(w, cfg, dc, st)
	findings := doctor.Diagnose(dc, st)
	fmt.Fprintln(w, "\nchecks")
	for _, f := range findings {
		fmt.Fprintln(w, "  "+f.String())
	}
	problems := doctor.Problems(findings)
	for _, q := range queries {
		problems += explainDestination(w, cfg, q, uid)
	}
	if problems == 0 {
		fmt.Fprintln(w, "\nno problems found")
	} else {
		fmt.Fprintf(w, "\n%d problem(s) found\n", problems)
	}
	return problems, nil
}

func printConfig(w io.Writer, cfg *configs.Config, path string) {
	src := path
	if src == "" {
		src = "the embedded default"
	}
	fmt.Fprintf(w, "config (%s)\n", src)
	addrs := make([]string, len(cfg.Tun.Address))
	for i, a := range cfg.Tun.Address {
		addrs[i] = a.String()
	}
	fmt.Fprintf(w, "  tun:       %s, mtu %d, %s\n", cfg.Tun.Name, cfg.Tun.MTU, strings.Join(addrs, ", "))
	obs := make([]string, len(cfg.Outbounds))
	for i, o := range cfg.Outbounds {
		obs[i] = o.Name + " (" + gateway.DescribeOutbound(o) + ")"
	}
	fmt.Fprintf(w, "  outbounds: %s\n", strings.Join(obs, "; "))
	fmt.Fprintf(w, "  rules:     %d, final: %s\n", len(cfg.Rules), cfg.FinalOutbound())
	if cfg.DNS.Enabled {
		ups := "the system's resolvers"
		if len(cfg.DNS.Upstreams) > 0 {
			ups = strings.Join(cfg.DNS.Upstreams, ", ")
		}
		fmt.Fprintf(w, "  dns:       mode %s, listen %s, hijack %s, upstreams %s via %s\n",
			cfg.DNS.Mode, cfg.DNS.Listen, strings.Join(cfg.DNS.Hijack, ","), ups, cfg.DNSOutbound())
	} else {
		fmt.Fprintln(w, "  dns:       off")
	}
	r := cfg.Route
	fmt.Fprintf(w, "  route:     auto %s, table %d, priority %d, strict %s, set_system_dns %s, journal %s\n",
		onOff(r.Auto), r.Table, r.Priority, onOff(r.Strict), onOff(r.SetSystemDNS), r.Journal)
	var sel []string
	for _, s := range []struct {
		key string
		n   int
	}{{"include_uids", len(r.IncludeUIDs)}, {"exclude_uids", len(r.ExcludeUIDs)}, {"include_cgroups", len(r.IncludeCgroups)},
		{"exclude_cgroups", len(r.ExcludeCgroups)}, {"exclude_addresses", len(r.ExcludeAddresses)}} {
		if s.n > 0 {
			sel = append(sel, fmt.Sprintf("%s %d", s.key, s.n))
		}
	}
	if len(sel) > 0 {
		fmt.Fprintf(w, "             %s\n", strings.Join(sel, ", "))
	}
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func printState(w io.Writer, cfg *configs.Config, dc doctor.Config, st *doctor.HostState) {
	bands, _ := dc.Bands()
	var spans []string
	for _, b := range bands {
		spans = append(spans, fmt.Sprintf("ipv%d %d-%d", b.Family, b.First, b.Last))
	}
	fmt.Fprintf(w, "\nip rules in tungate's band (%s)\n", strings.Join(spans, ", "))
	n := 0
	for _, b := range bands {
		for _, ru := range st.Rules {
			if ru.Family == b.Family && ru.Priority >= b.First && ru.Priority <= b.Last {
				fmt.Fprintf(w, "  ipv%d %s\n", ru.Family, ru.Text)
				n++
			}
		}
	}
	if n == 0 {
		fmt.Fprintln(w, "  (none)")
	}
	fmt.Fprintf(w, "\nroutes in table %d\n", dc.Route.Table)
	for _, rt := range st.TableRoutes {
		fmt.Fprintf(w, "  ipv%d %s\n", rt.Family, rt.Text)
	}
	if len(st.TableRoutes) == 0 {
		fmt.Fprintln(w, "  (none)")
	}
	fmt.Fprintln(w, "\nnftables")
	switch {
	case !st.NFT.Checked:
		fmt.Fprintf(w, "  not checked: %s\n", st.NFT.Note)
	case len(st.NFT.TungateTables()) > 0:
		fmt.Fprintf(w, "  tungate's: table %s\n", strings.Join(st.NFT.TungateTables(), ", table "))
	default:
		fmt.Fprintf(w, "  no table named like tungate's (%d tables in all)\n", len(st.NFT.Tables))
	}
	r := st.Resolv
	fmt.Fprintln(w, "\nsystem resolver")
	switch {
	case r.Err != "":
		fmt.Fprintf(w, "  %s: %s\n", r.Path, r.Err)
	default:
		var ns []string
		for _, a := range r.Nameservers {
			ns = append(ns, a.String())
		}
		line := fmt.Sprintf("  %s: nameserver %s", r.Path, strings.Join(ns, ", "))
		if len(ns) == 0 {
			line = fmt.Sprintf("  %s: no nameserver", r.Path)
		}
		if r.Symlink != "" {
			line += " (symlink to " + r.Symlink + ")"
		}
		if r.ByTungate {
			line += " (written by tungate)"
		}
		if r.ByResolved {
			line += " (systemd-resolved)"
		}
		if cfg.DNS.Enabled && cfg.DNS.Listen.IsValid() {
			line += "; dns.listen is " + cfg.DNS.Listen.String()
		}
		fmt.Fprintln(w, line)
	}
	fmt.Fprintln(w, "\ndefault routes (main table)")
	for _, rt := range st.Defaults {
		fmt.Fprintf(w, "  ipv%d %s\n", rt.Family, rt.Text)
	}
	if len(st.Defaults) == 0 {
		fmt.Fprintln(w, "  (none)")
	}
}

// explainDestination prints how tungate and the kernel route q and
// returns the problems it found (a loop).
func explainDestination(w io.Writer, cfg *configs.Config, q explainQuery, uid *uint32) int {
	fmt.Fprintf(w, "\nexplain %s\n", q)
	tun := cfg.Tun.Name
	owner := uint32(os.Getuid())
	if uid != nil {
		owner = *uid
	}
	// The app's packet.
	app := sysroute.RouteLookup(sysroute.RouteQuery{Dst: q.dst.Addr(), Proto: q.proto, DPort: q.dst.Port(), UID: &owner})
	verdict := "bypasses tungate"
	entersTun := app.Err == nil && app.Dev == tun
	if entersTun {
		verdict = "into tungate's TUN"
	}
	if app.Err == nil && app.Table == cfg.Route.Table {
		verdict += " (tungate's table)"
	}
	fmt.Fprintf(w, "  kernel, the app's packet (uid %d, no mark): %s → %s\n", owner, app, verdict)
	if !entersTun {
		fmt.Fprintln(w, "  tungate never sees this flow; if it did:")
	}

	// tungate's decision: the routing step run uses.
	src := netip.AddrPort{}
	if app.Src.IsValid() {
		src = netip.AddrPortFrom(app.Src, 0)
	}
	e, err := gateway.Explain(cfg, gateway.Meta{Network: q.proto, Inbound: "tun", Src: src, Dst: q.dst, UID: &owner})
	d := e.Decision
	switch {
	case d.DNS:
		fmt.Fprintf(w, "  tungate: answered by its DNS proxy (dns.hijack %s); its upstream queries go out through outbound %q\n",
			strings.Join(cfg.DNS.Hijack, ","), cfg.DNSOutbound())
		return 0
	case err != nil && d.Outbound == "":
		fmt.Fprintf(w, "  tungate: the rules cannot be evaluated: %v\n", err)
		return 0
	case d.Rule >= 0:
		fmt.Fprintf(w, "  tungate: rules[%d] (%s) → outbound %q\n", d.Rule, d.RulePayload, d.Outbound)
	default:
		fmt.Fprintf(w, "  tungate: no rule matches → final outbound %q\n", d.Outbound)
	}
	for _, r := range cfg.Rules {
		if len(r.Domain)+len(r.DomainSuffix)+len(r.DomainKeyword)+len(r.DomainRegex) > 0 {
			fmt.Fprintln(w, "  (rules on domains are not tried: --explain knows only the address; a flow whose domain tungate knows may match one)")
			break
		}
	}

	// tungate's upstream.
	if err != nil {
		fmt.Fprintf(w, "  upstream: %v\n", err)
		return 0
	}
	o, _ := cfg.LookupOutbound(d.Outbound)
	up := e.Upstream
	switch {
	case !e.Known:
		fmt.Fprintf(w, "  upstream: outbound type %s is not explained\n", o.Type)
		return 0
	case up.None:
		fmt.Fprintf(w, "  upstream: none: %s\n", up.Note)
		return 0
	}
	dst, perr := netip.ParseAddrPort(up.Addr)
	if perr != nil {
		fmt.Fprintf(w, "  upstream: the %s proxy %s (a name: not looked up)\n", o.Type, up.Addr)
		return 0
	}
	uq := sysroute.RouteQuery{Dst: dst.Addr(), Proto: up.Network, DPort: dst.Port(), Mark: e.Socket.FWMark, Oif: e.Socket.Interface}
	mark := "no mark"
	if uq.Mark != 0 {
		mark = fmt.Sprintf("fwmark %#x", uq.Mark)
	}
	if uq.Oif != "" {
		mark += ", bound to " + uq.Oif
	}
	res := sysroute.RouteLookup(uq)
	fmt.Fprintf(w, "  kernel, %s (%s): %s\n", up.What, mark, res)
	if res.Err == nil && res.Dev == tun {
		f := doctor.Finding{Check: "loop", Problem: true,
			Detail: fmt.Sprintf("outbound %q's traffic to %s goes back into the TUN %s", d.Outbound, uq.Dst, tun),
			Fix:    "give the outbound an fwmark that route.auto excludes (outbounds[].fwmark), or bind it to the physical interface (outbounds[].interface)"}
		fmt.Fprintln(w, "  "+f.String())
		return 1
	}
	return 0
}
