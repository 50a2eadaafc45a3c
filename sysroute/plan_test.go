package sysroute

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tungate/tungate/configs"
)

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// baseConfig is a typical configuration: a dual-stack TUN, the default
// table, band and mark.
func baseConfig() Config {
	return Config{
		TunName:  "tg0",
		TunAddrs: prefixes("172.19.0.1/30", "fdfe:dcba:9876::1/126"),
		Table:    2022,
		Priority: 9000,
		FWMarks:  []uint32{0x2e7},
		Journal:  "/nonexistent/route.journal",
	}
}

func renderRules(rules []rule) []string {
	out := make([]string, len(rules))
	for i, r := range rules {
		out[i] = r.Family.String() + " " + r.String()
	}
	return out
}

func renderRoutes(routes []route) []string {
	out := make([]string, len(routes))
	for i, r := range routes {
		out[i] = r.Family.String() + " " + r.String()
	}
	return out
}

// band repeats one family's expected rules for both families.
func both(rules ...string) []string {
	var out []string
	for _, f := range []string{"ipv4", "ipv6"} {
		for _, r := range rules {
			out = append(out, f+" "+r)
		}
	}
	return out
}

func TestPlan(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Config)
		routes []string
		rules  []string
	}{
		{
			name:   "typical: dual-stack TUN",
			change: func(*Config) {},
			routes: []string{"ipv4 default dev tg0 table 2022", "ipv6 default dev tg0 table 2022"},
			rules: both(
				"9000: from all fwmark 0x2e7 goto 9003",
				"9001: from all lookup main suppress_prefixlength 0",
				"9002: from all lookup 2022",
				"9003: from all nop",
			),
		},
		{
			name:   "IPv4-only TUN: IPv6 keeps the host's routing",
			change: func(c *Config) { c.TunAddrs = prefixes("172.19.0.1/30") },
			routes: []string{"ipv4 default dev tg0 table 2022"},
			rules: []string{
				"ipv4 9000: from all fwmark 0x2e7 goto 9003",
				"ipv4 9001: from all lookup main suppress_prefixlength 0",
				"ipv4 9002: from all lookup 2022",
				"ipv4 9003: from all nop",
			},
		},
		{
			name:   "IPv6-only TUN",
			change: func(c *Config) { c.TunAddrs = prefixes("fdfe:dcba:9876::1/126") },
			routes: []string{"ipv6 default dev tg0 table 2022"},
			rules: []string{
				"ipv6 9000: from all fwmark 0x2e7 goto 9003",
				"ipv6 9001: from all lookup main suppress_prefixlength 0",
				"ipv6 9002: from all lookup 2022",
				"ipv6 9003: from all nop",
			},
		},
		{
			name: "strict, IPv4-only TUN: IPv6 unreachable, DNS captured",
			change: func(c *Config) {
				c.TunAddrs = prefixes("172.19.0.1/30")
				c.Strict = true
			},
			routes: []string{"ipv4 default dev tg0 table 2022", "ipv6 unreachable default table 2022"},
			rules: both(
				"9000: from all fwmark 0x2e7 goto 9005",
				"9001: from all ipproto udp dport 53 lookup 2022",
				"9002: from all ipproto tcp dport 53 lookup 2022",
				"9003: from all lookup main suppress_prefixlength 0",
				"9004: from all lookup 2022",
				"9005: from all nop",
			),
		},
		{
			name: "exclude uids and addresses of both families",
			change: func(c *Config) {
				c.ExcludeUIDs = []configs.UIDRange{{From: 1000, To: 1000}, {From: 2000, To: 2999}}
				c.ExcludeAddresses = prefixes("10.0.0.0/8", "fd00::/8", "::ffff:192.168.1.7/120")
			},
			routes: []string{"ipv4 default dev tg0 table 2022", "ipv6 default dev tg0 table 2022"},
			rules: []string{
				"ipv4 9000: from all fwmark 0x2e7 goto 9007",
				"ipv4 9001: from all uidrange 1000-1000 goto 9007",
				"ipv4 9002: from all uidrange 2000-2999 goto 9007",
				"ipv4 9003: from all lookup main suppress_prefixlength 0",
				"ipv4 9004: from all to 10.0.0.0/8 goto 9007",
				"ipv4 9005: from all to 192.168.1.0/24 goto 9007",
				"ipv4 9006: from all lookup 2022",
				"ipv4 9007: from all nop",
				"ipv6 9000: from all fwmark 0x2e7 goto 9006",
				"ipv6 9001: from all uidrange 1000-1000 goto 9006",
				"ipv6 9002: from all uidrange 2000-2999 goto 9006",
				"ipv6 9003: from all lookup main suppress_prefixlength 0",
				"ipv6 9004: from all to fd00::/8 goto 9006",
				"ipv6 9005: from all lookup 2022",
				"ipv6 9006: from all nop",
			},
		},
		{
			name: "include uids, one excluded, strict",
			change: func(c *Config) {
				c.TunAddrs = prefixes("172.19.0.1/30")
				c.IncludeUIDs = []configs.UIDRange{{From: 1000, To: 1999}, {From: 3000, To: 3000}}
				c.ExcludeUIDs = []configs.UIDRange{{From: 1500, To: 1500}}
				c.Strict = true
			},
			routes: []string{"ipv4 default dev tg0 table 2022", "ipv6 unreachable default table 2022"},
			rules: both(
				"9000: from all fwmark 0x2e7 goto 9009",
				"9001: from all uidrange 1500-1500 goto 9009",
				"9002: from all uidrange 1000-1999 goto 9005",
				"9003: from all uidrange 3000-3000 goto 9005",
				"9004: from all goto 9009",
				"9005: from all ipproto udp dport 53 lookup 2022",
				"9006: from all ipproto tcp dport 53 lookup 2022",
				"9007: from all lookup main suppress_prefixlength 0",
				"9008: from all lookup 2022",
				"9009: from all nop",
			),
		},
		{
			name:   "include cgroups: only marked traffic is selected",
			change: func(c *Config) { c.IncludeCgroups = []string{"user.slice/app.slice", "system.slice/x.service"} },
			routes: []string{"ipv4 default dev tg0 table 2022", "ipv6 default dev tg0 table 2022"},
			rules: both(
				"9000: from all fwmark 0x2e7 goto 9005",
				"9001: from all fwmark 0x2e8 goto 9003",
				"9002: from all goto 9005",
				"9003: from all lookup main suppress_prefixlength 0",
				"9004: from all lookup 2022",
				"9005: from all nop",
			),
		},
		{
			name:   "exclude cgroups: marked traffic skips the band",
			change: func(c *Config) { c.ExcludeCgroups = []string{"user.slice/app.slice/firefox.scope"} },
			routes: []string{"ipv4 default dev tg0 table 2022", "ipv6 default dev tg0 table 2022"},
			rules: both(
				"9000: from all fwmark 0x2e7 goto 9004",
				"9001: from all fwmark 0x2e9 goto 9004",
				"9002: from all lookup main suppress_prefixlength 0",
				"9003: from all lookup 2022",
				"9004: from all nop",
			),
		},
		{
			name: "cgroups and uids, strict: exclusions first, then the selections (either selects)",
			change: func(c *Config) {
				c.TunAddrs = prefixes("172.19.0.1/30")
				c.Strict = true
				c.IncludeUIDs = []configs.UIDRange{{From: 1000, To: 1000}}
				c.ExcludeUIDs = []configs.UIDRange{{From: 1001, To: 1001}}
				c.IncludeCgroups = []string{"user.slice"}
				c.ExcludeCgroups = []string{"user.slice/app.slice/firefox.scope"}
			},
			routes: []string{"ipv4 default dev tg0 table 2022", "ipv6 unreachable default table 2022"},
			rules: both(
				"9000: from all fwmark 0x2e7 goto 9010",
				"9001: from all uidrange 1001-1001 goto 9010",
				"9002: from all fwmark 0x2e9 goto 9010",
				"9003: from all uidrange 1000-1000 goto 9006",
				"9004: from all fwmark 0x2e8 goto 9006",
				"9005: from all goto 9010",
				"9006: from all ipproto udp dport 53 lookup 2022",
				"9007: from all ipproto tcp dport 53 lookup 2022",
				"9008: from all lookup main suppress_prefixlength 0",
				"9009: from all lookup 2022",
				"9010: from all nop",
			),
		},
		{
			name:   "every outbound mark excluded, zeros and repeats dropped",
			change: func(c *Config) { c.FWMarks = []uint32{0, 0x2e7, 0x100, 0x2e7} },
			routes: []string{"ipv4 default dev tg0 table 2022", "ipv6 default dev tg0 table 2022"},
			rules: both(
				"9000: from all fwmark 0x2e7 goto 9004",
				"9001: from all fwmark 0x100 goto 9004",
				"9002: from all lookup main suppress_prefixlength 0",
				"9003: from all lookup 2022",
				"9004: from all nop",
			),
		},
		{
			name:   "no mark given: the default one",
			change: func(c *Config) { c.FWMarks = nil; c.Table = 100; c.Priority = 32762 },
			routes: []string{"ipv4 default dev tg0 table 100", "ipv6 default dev tg0 table 100"},
			rules: both(
				"32762: from all fwmark 0x2e7 goto 32765",
				"32763: from all lookup main suppress_prefixlength 0",
				"32764: from all lookup 100",
				"32765: from all nop",
			),
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := baseConfig()
			tc.change(&c)
			routes, rules, err := plan(c)
			if err != nil {
				t.Fatalf("plan: %v", err)
			}
			if got := renderRoutes(routes); !slices.Equal(got, tc.routes) {
				t.Errorf("routes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.routes, "\n"))
			}
			if got := renderRules(rules); !slices.Equal(got, tc.rules) {
				t.Errorf("rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.rules, "\n"))
			}
			// Every goto jumps forward to a rule of its own family's band.
			for _, r := range rules {
				if r.Action != actGoto {
					continue
				}
				if r.Goto <= r.Priority || !slices.ContainsFunc(rules, func(o rule) bool { return o.Family == r.Family && o.Priority == r.Goto }) {
					t.Errorf("%s %s: goto target missing or backwards", r.Family, r)
				}
			}
			first, last := sweepBand(c)
			for _, r := range rules {
				if r.Priority < first || r.Priority > last {
					t.Errorf("%s %s is outside the sweep band %d-%d", r.Family, r, first, last)
				}
			}
		})
	}
}

func TestPlanErrors(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Config)
		want   string
	}{
		{"outbound mark is the cgroup include mark", func(c *Config) {
			c.IncludeCgroups = []string{"user.slice"}
			c.FWMarks = []uint32{0x2e7, CgroupIncludeMark}
		}, "fwmark 0x2e8 is a mark tungate sets"},
		{"outbound mark is the cgroup exclude mark", func(c *Config) {
			c.ExcludeCgroups = []string{"user.slice"}
			c.FWMarks = []uint32{CgroupExcludeMark}
		}, "fwmark 0x2e9 is a mark tungate sets"},
		{"band past the main rule", func(c *Config) { c.Priority = 32763 }, "leaves no room"},
		{"no tun address", func(c *Config) { c.TunAddrs = nil }, "no address"},
		{"main table", func(c *Config) { c.Table = 254 }, "reserved"},
		{"zero priority", func(c *Config) { c.Priority = 0 }, "route.priority"},
		{"no journal", func(c *Config) { c.Journal = "" }, "route.journal"},
		{"reversed uids", func(c *Config) { c.IncludeUIDs = []configs.UIDRange{{From: 5, To: 1}} }, "reversed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := baseConfig()
			tc.change(&c)
			_, _, err := plan(c)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("plan: %v, want an error containing %q", err, tc.want)
			}
		})
	}
	// Without cgroups, those marks are an outbound's to use.
	c := baseConfig()
	c.FWMarks = []uint32{CgroupIncludeMark}
	if _, _, err := plan(c); err != nil {
		t.Errorf("plan with fwmark %#x and no cgroups: %v", CgroupIncludeMark, err)
	}
}

func TestAddOrder(t *testing.T) {
	c := baseConfig()
	c.ExcludeAddresses = prefixes("10.0.0.0/8")
	_, rules, err := plan(c)
	if err != nil {
		t.Fatal(err)
	}
	got := renderRules(addOrder(rules))
	want := []string{
		"ipv4 9004: from all nop",
		"ipv4 9000: from all fwmark 0x2e7 goto 9004",
		"ipv4 9001: from all lookup main suppress_prefixlength 0",
		"ipv4 9002: from all to 10.0.0.0/8 goto 9004",
		"ipv4 9003: from all lookup 2022",
		"ipv6 9003: from all nop",
		"ipv6 9000: from all fwmark 0x2e7 goto 9003",
		"ipv6 9001: from all lookup main suppress_prefixlength 0",
		"ipv6 9002: from all lookup 2022",
	}
	if !slices.Equal(got, want) {
		t.Errorf("addOrder:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
