package doctor

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/sysdns"
	"github.com/tungate/tungate/sysroute"
)

// Diagnose's checks with made-up host states: no root, nothing read.

func doctorCfg() Config {
	return Config{
		Route: sysroute.Config{
			TunName:  "tg0",
			TunAddrs: []netip.Prefix{netip.MustParsePrefix("172.19.0.1/30"), netip.MustParsePrefix("fdfe:dcba:9876::1/126")},
			Table:    2022,
			Priority: 9000,
			FWMarks:  []uint32{0x2e7},
			Journal:  "/run/tungate/route.journal",
		},
		Auto:       true,
		DNSEnabled: true,
		DNSListen:  netip.MustParseAddr("172.19.0.2"),
		ConfigFlag: "--config /etc/tungate.yaml",
	}
}

// healthyState is a host where tungate runs with c, as planned.
func healthyState(t *testing.T, c Config) *HostState {
	t.Helper()
	bands, err := c.Bands()
	if err != nil {
		t.Fatalf("plan: %v", err)
	}
	s := &HostState{
		Tun:        TunState{Name: c.Route.TunName, Exists: true, Up: true, Addrs: c.Route.TunAddrs},
		Links:      []string{"lo", "eth0", c.Route.TunName},
		LocalAddrs: []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("192.168.1.10"), netip.MustParseAddr("172.19.0.1")},
		Defaults: []sysroute.HostRoute{{Family: 4, Table: 254, Dst: netip.MustParsePrefix("0.0.0.0/0"), Type: "unicast", Dev: "eth0", Proto: 3,
			Text: "default via 192.168.1.1 dev eth0 table main proto boot"}},
		Sysctls: map[string]int{"net.ipv4.conf.all.rp_filter": 2, "net.ipv4.conf.default.rp_filter": 1, "net.ipv4.conf.tg0.rp_filter": 0,
			"net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0},
		NFT:          NFTState{Checked: true, Tables: []string{"inet filter"}},
		Resolv:       ResolvState{Path: sysdns.DefaultResolvConf, Nameservers: []netip.Addr{netip.MustParseAddr("192.168.1.1")}},
		RouteJournal: true,
	}
	// A band's rules have one priority each, First to Last.
	for _, b := range bands {
		if b.Last-b.First+1 != b.Rules {
			t.Fatalf("band %+v: not one rule a priority", b)
		}
		for prio := b.First; prio <= b.Last; prio++ {
			s.Rules = append(s.Rules, sysroute.HostRule{Family: b.Family, Priority: prio, Proto: sysroute.ProtoTungate, Text: fmt.Sprintf("%d: (tungate's rule) proto tungate", prio)})
		}
	}
	for _, f := range []int{4, 6} {
		s.Rules = append(s.Rules, sysroute.HostRule{Family: f, Priority: 32766, Proto: 2, Text: "32766: from all lookup main proto kernel"})
	}
	for _, rt := range c.Route.PlannedRoutes() {
		rt.Text = fmt.Sprintf("%s dev %s table %d", sysroute.RouteDst(rt), rt.Dev, rt.Table)
		s.TableRoutes = append(s.TableRoutes, rt)
	}
	return s
}

// problems returns the problem lines of Diagnose, and fails on a problem
// without a fix.
func problems(t *testing.T, c Config, s *HostState) []string {
	t.Helper()
	var out []string
	for _, f := range Diagnose(c, s) {
		if !f.Problem {
			continue
		}
		if f.Fix == "" {
			t.Errorf("problem without a fix: %s", f)
		}
		out = append(out, f.String())
	}
	return out
}

// wantProblems checks that the problems are exactly those containing the
// given substrings, one each.
func wantProblems(t *testing.T, what string, got []string, want ...string) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s: %d problems, want %d:\n%s", what, len(got), len(want), strings.Join(got, "\n"))
		return
	}
	for i, w := range want {
		if !strings.Contains(got[i], w) {
			t.Errorf("%s: problem %d = %q, want it to contain %q", what, i, got[i], w)
		}
	}
}

func TestDiagnoseHealthy(t *testing.T) {
	c := doctorCfg()
	s := healthyState(t, c)
	fs := Diagnose(c, s)
	wantProblems(t, "healthy", problems(t, c, s))
	if Problems(fs) != 0 {
		t.Errorf("Problems = %d, want 0", Problems(fs))
	}
	var text []string
	for _, f := range fs {
		text = append(text, f.String())
	}
	all := strings.Join(text, "\n")
	for _, want := range []string{
		"ok: tun: tg0 exists and is up",
		"ok: ip rules: ipv4: tungate's 4 rules at 9000-9003, nobody else's",
		"ok: routes: table 2022 has ipv6 default dev tg0",
		"ok: default interface: detected ipv4 eth0",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("healthy findings lack %q:\n%s", want, all)
		}
	}
}

func TestDiagnoseTun(t *testing.T) {
	c := doctorCfg()
	s := healthyState(t, c)
	s.Tun.Up = false
	wantProblems(t, "TUN down", problems(t, c, s), "PROBLEM: tun: tg0 exists but is down")

	// Not running: the TUN is gone with its routes; the rules and the
	// journals of a killed run are left.
	s = healthyState(t, c)
	s.Tun = TunState{Name: "tg0"}
	s.TableRoutes = nil
	s.DNSJournal = true
	wantProblems(t, "killed", problems(t, c, s),
		"PROBLEM: tun: tg0 does not exist",
		"4 ipv4 rules of a tungate that is not running",
		"4 ipv6 rules of a tungate that is not running",
		"route.journal /run/tungate/route.journal exists but tungate is not running: a killed tungate's routes and rules may be left — fix: tungate cleanup --config /etc/tungate.yaml",
		"route.journal.dns exists but tungate is not running")
}

func TestDiagnoseBand(t *testing.T) {
	c := doctorCfg()
	s := healthyState(t, c)
	s.Rules = append(s.Rules, sysroute.HostRule{Family: 4, Priority: 9001, Proto: 0, Text: "9001: from all lookup 100"},
		sysroute.HostRule{Family: 6, Priority: 9004, Proto: 3, Text: "9004: from all lookup 100 proto boot"}) // past the ipv6 band
	wantProblems(t, "foreign rule", problems(t, c, s),
		`PROBLEM: ip rules: ipv4 rule "9001: from all lookup 100" (proto unspec) is not tungate's but sits in tungate's band 9000-9003`)
	if got := problems(t, c, s)[0]; !strings.Contains(got, "fix: remove it (ip -4 rule del priority 9001 from all lookup 100)") {
		t.Errorf("the fix does not give the command: %s", got)
	}

	// A band of another configuration: the running tungate is not this
	// one.
	c2 := c
	c2.Route.Strict = true
	wantProblems(t, "another configuration", problems(t, c2, healthyState(t, c)),
		"4 of tungate's 6 ipv4 rules are in the band 9000-9005",
		"4 of tungate's 6 ipv6 rules are in the band 9000-9005")

	c3 := c
	c3.Auto = false
	s = healthyState(t, c)
	s.Rules = append(s.Rules, sysroute.HostRule{Family: 4, Priority: 9001, Text: "9001: from all lookup 100"})
	s.TableRoutes = nil
	wantProblems(t, "route.auto off", problems(t, c3, s))
}

func TestDiagnoseTable(t *testing.T) {
	c := doctorCfg()
	s := healthyState(t, c)
	s.TableRoutes = s.TableRoutes[1:] // the IPv4 default is gone
	s.TableRoutes = append(s.TableRoutes, sysroute.HostRoute{Family: 4, Table: 2022, Dst: netip.MustParsePrefix("10.0.0.0/8"), Type: "unicast", Dev: "eth0", Proto: 3,
		Text: "10.0.0.0/8 dev eth0 table 2022 proto boot"})
	wantProblems(t, "table", problems(t, c, s),
		"table 2022 has a route that is not tungate's (10.0.0.0/8 dev eth0",
		"table 2022 lacks tungate's ipv4 default dev tg0")
	if got := problems(t, c, s)[0]; !strings.Contains(got, "ip -4 route del 10.0.0.0/8 table 2022") {
		t.Errorf("the fix does not give the command: %s", got)
	}
	s = healthyState(t, c)
	s.TableRoutes[0].Dev = "eth0"
	wantProblems(t, "wrong device", problems(t, c, s), `table 2022's ipv4 default goes to "eth0", not to the TUN tg0`)
}

func TestDiagnoseRPFilter(t *testing.T) {
	for _, tc := range []struct {
		name            string
		all, tun        int
		include, exclud []configs.UIDRange
		cgroups         []string
		problem         string
	}{
		{name: "strict without selection", all: 1, tun: 1},
		{name: "loose with include_uids", all: 2, tun: 0, include: []configs.UIDRange{{From: 1000, To: 1000}}},
		{name: "off with include_uids", all: 0, tun: 0, include: []configs.UIDRange{{From: 1000, To: 1000}}},
		{name: "strict all with include_uids", all: 1, tun: 0, include: []configs.UIDRange{{From: 1000, To: 1000}}, problem: "route.include_uids selects apps"},
		{name: "strict on the TUN with include_uids", all: 0, tun: 1, include: []configs.UIDRange{{From: 1000, To: 1999}}, problem: "net.ipv4.conf.tg0.rp_filter=1"},
		{name: "loose all wins over strict TUN", all: 2, tun: 1, include: []configs.UIDRange{{From: 1000, To: 1000}}},
		{name: "strict with include_cgroups", all: 1, tun: 1, cgroups: []string{"app.slice"}, problem: "route.include_cgroups"},
		{name: "strict excluding root", all: 1, tun: 1, exclud: []configs.UIDRange{{From: 0, To: 0}}, problem: "route.exclude_uids (with uid 0)"},
		{name: "strict excluding others", all: 1, tun: 1, exclud: []configs.UIDRange{{From: 1000, To: 1000}}},
	} {
		c := doctorCfg()
		c.Route.IncludeUIDs, c.Route.ExcludeUIDs, c.Route.IncludeCgroups = tc.include, tc.exclud, tc.cgroups
		s := healthyState(t, doctorCfg())
		s.Sysctls["net.ipv4.conf.all.rp_filter"] = tc.all
		s.Sysctls["net.ipv4.conf.tg0.rp_filter"] = tc.tun
		got := checkRPFilter(c, s)
		switch {
		case len(got) != 1:
			t.Errorf("%s: %d findings, want 1", tc.name, len(got))
		case tc.problem == "" && got[0].Problem:
			t.Errorf("%s: %s, want ok", tc.name, got[0])
		case tc.problem != "" && (!got[0].Problem || !strings.Contains(got[0].String(), tc.problem)):
			t.Errorf("%s: %s, want a problem naming %q", tc.name, got[0], tc.problem)
		case tc.problem != "" && !strings.Contains(got[0].Fix, "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.tg0.rp_filter=2"):
			t.Errorf("%s: fix %q does not give the sysctl command", tc.name, got[0].Fix)
		}
	}
	// Without the TUN, the default (what a new TUN gets) counts.
	c := doctorCfg()
	c.Route.IncludeUIDs = []configs.UIDRange{{From: 1000, To: 1000}}
	s := healthyState(t, doctorCfg())
	s.Tun = TunState{Name: "tg0"}
	s.Sysctls["net.ipv4.conf.all.rp_filter"] = 0
	if f := checkRPFilter(c, s); len(f) != 1 || !f[0].Problem || !strings.Contains(f[0].Detail, "net.ipv4.conf.default.rp_filter=1") {
		t.Errorf("no TUN, default strict: %v, want a problem naming the default", f)
	}
}

func TestDiagnoseForwarding(t *testing.T) {
	c := doctorCfg()
	c.SourceCIDRs = []netip.Prefix{netip.MustParsePrefix("192.168.1.0/24")} // holds this host's address
	s := healthyState(t, c)
	wantProblems(t, "own subnet", problems(t, c, s))

	c.SourceCIDRs = append(c.SourceCIDRs, netip.MustParsePrefix("10.50.0.0/16"), netip.MustParsePrefix("fd50::/64"))
	wantProblems(t, "other hosts", problems(t, c, s),
		"source_cidr 10.50.0.0/16) but net.ipv4.ip_forward=0",
		"source_cidr fd50::/64) but net.ipv6.conf.all.forwarding=0")
	s.Sysctls["net.ipv4.ip_forward"] = 1
	s.Sysctls["net.ipv6.conf.all.forwarding"] = 1
	wantProblems(t, "forwarding on", problems(t, c, s))
}

func TestDiagnoseDefaultRouteAndInterfaces(t *testing.T) {
	c := doctorCfg()
	s := healthyState(t, c)
	s.Defaults = nil
	wantProblems(t, "no default", problems(t, c, s), "the main table has no default route")

	s = healthyState(t, c)
	s.Defaults = append(s.Defaults, sysroute.HostRoute{Family: 6, Dst: netip.MustParsePrefix("::/0"), Type: "unicast", Dev: "tg0", Text: "default dev tg0 table main"})
	wantProblems(t, "default into the TUN", problems(t, c, s), "the main table's ipv6 default route goes into the TUN")

	c.Outbounds = []OutboundInterface{{Key: "outbounds[0] (direct)", Interface: "eth0"}, {Key: "outbounds[1] (wan2)", Interface: "eth9"}, {Key: "outbounds[2] (bad)", Interface: "tg0"}}
	s = healthyState(t, c)
	wantProblems(t, "outbound interfaces", problems(t, c, s),
		"outbounds[1] (wan2) is bound to eth9, which does not exist: its connections fail — fix: set outbounds[1].interface",
		"outbounds[2] (bad) is bound to the TUN tg0")
}

func TestDiagnoseNFT(t *testing.T) {
	c := doctorCfg()
	c.Route.IncludeCgroups = []string{"app.slice"}
	s := healthyState(t, doctorCfg())
	f := checkNFT(c, s)
	if len(f) != 1 || !f[0].Problem || !strings.Contains(f[0].Detail, "no nftables table tungate2022") {
		t.Errorf("cgroups without a table: %v", f)
	}
	s.NFT.Tables = append(s.NFT.Tables, "inet tungate2023") // another tungate's
	if f := checkNFT(c, s); len(f) != 1 || !f[0].Problem {
		t.Errorf("cgroups with another table's: %v", f)
	}
	s.NFT.Tables = append(s.NFT.Tables, "inet tungate2022")
	if f := checkNFT(c, s); len(f) != 1 || f[0].Problem || !strings.Contains(f[0].Detail, "inet tungate2022") {
		t.Errorf("cgroups with a table: %v", f)
	}
	s.NFT = NFTState{Note: "the nft command is not installed"}
	if f := checkNFT(c, s); len(f) != 1 || f[0].Problem {
		t.Errorf("nft not installed: %v, want not checked", f)
	}
}

func TestDiagnoseDNS(t *testing.T) {
	listen := netip.MustParseAddr("172.19.0.2")
	c := doctorCfg()
	c.SetSystemDNS = true
	s := healthyState(t, c)
	wantProblems(t, "set_system_dns not applied", problems(t, c, s), "route.set_system_dns is on but /etc/resolv.conf names 192.168.1.1, not dns.listen 172.19.0.2")

	s.Resolv.Nameservers = []netip.Addr{listen}
	wantProblems(t, "set_system_dns applied", problems(t, c, s))

	s.Resolv = ResolvState{Path: sysdns.DefaultResolvConf, Symlink: "/run/systemd/resolve/stub-resolv.conf", Nameservers: []netip.Addr{netip.MustParseAddr("127.0.0.53")}, ByResolved: true}
	wantProblems(t, "systemd-resolved", problems(t, c, s))

	// Left pointing at a tungate that is not running.
	s = healthyState(t, c)
	s.Tun = TunState{Name: "tg0"}
	s.TableRoutes, s.Rules, s.RouteJournal = nil, nil, false
	s.Resolv.Nameservers = []netip.Addr{listen}
	wantProblems(t, "stale", problems(t, c, s), "tun: tg0 does not exist", "172.19.0.2, tungate's dns.listen, but tungate is not running")

	c = doctorCfg()
	c.DNSEnabled = false
	s = healthyState(t, c)
	s.Resolv.Nameservers = []netip.Addr{listen}
	wantProblems(t, "dns off", problems(t, c, s), "dns.enabled is false: nothing answers there")
}

func TestFindingString(t *testing.T) {
	ok := Finding{Check: "tun", Detail: "up"}
	bad := Finding{Check: "tun", Problem: true, Detail: "down", Fix: "restart"}
	if ok.String() != "ok: tun: up" || bad.String() != "PROBLEM: tun: down — fix: restart" {
		t.Errorf("String: %q, %q", ok, bad)
	}
	if got := ipRuleDel(6, "9001: from all iif eth0 lookup 100 proto boot"); got != "ip -6 rule del priority 9001 from all iif eth0 lookup 100 proto boot" {
		t.Errorf("ipRuleDel = %q", got)
	}
}
