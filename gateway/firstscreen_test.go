package gateway

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/tungate/tungate/configs"
)

// The first screen says in plain words what the configuration does.
func TestFirstScreen(t *testing.T) {
	tests := []struct {
		name string
		edit func(*configs.Config)
		sc   screen
		want []string
	}{
		{
			name: "embedded default",
			edit: func(*configs.Config) {},
			sc:   screen{tun: "tungate0", upstreams: []string{"udp://10.233.0.2:53", "udp://10.233.0.3:53"}},
			want: []string{
				"routing: all traffic except the LAN goes through tungate0 (route.auto)",
				"flows: no rules; every flow goes out through direct",
				"DNS: answered by tungate at 172.19.0.2 and on port 53 of any address routed into tungate0 (dns.listen, dns.hijack), mode real, upstreams udp://10.233.0.2:53, udp://10.233.0.3:53 through outbound direct",
				"API: off (api.listen)",
				"stop: Ctrl-C or SIGTERM; after a crash: tungate cleanup (with the same --config, if one was given)",
			},
		},
		{
			name: "no auto-route, rules, API with token and profiler, no DNS",
			edit: func(c *configs.Config) {
				c.Route.Auto = false
				c.Outbounds = append(c.Outbounds, configs.Outbound{Name: "proxy", Type: "socks5"})
				c.Rules = []configs.Rule{{Outbound: "direct"}, {Outbound: "proxy"}}
				c.Final = "proxy"
				c.DNS.Enabled = false
				c.API = configs.API{Listen: "127.0.0.1:0", Secret: "x", PProf: true}
				c.Log.Flows = true
			},
			sc: screen{tun: "tg0", api: "127.0.0.1:9090"},
			want: []string{
				"routing: nothing is routed into tg0 by tungate (route.auto: false); route traffic into it yourself",
				"flows: 2 rules pick the outbound; a flow that matches none goes out through proxy (socks5); each flow's end is logged (log.flows)",
				"DNS: not answered by tungate (dns.enabled: false); port-53 traffic is routed like any other",
				"API: http://127.0.0.1:9090 (bearer token: api.secret); Go's profiler at /debug/pprof/",
				"stop: Ctrl-C or SIGTERM",
			},
		},
		{
			name: "per-app selection, strict, system DNS, one hijacked address",
			edit: func(c *configs.Config) {
				c.Route.IncludeUIDs = []configs.UIDRange{{From: 1000, To: 1000}, {From: 2000, To: 2999}}
				c.Route.IncludeCgroups = []string{"user.slice/app.slice"}
				c.Route.ExcludeUIDs = []configs.UIDRange{{From: 0, To: 0}}
				c.Route.ExcludeAddresses = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
				c.Route.Strict = true
				c.Route.SetSystemDNS = true
				c.Rules = []configs.Rule{{Outbound: "direct"}}
				c.DNS.Hijack = []string{"10.233.0.2:53"}
				c.DNS.Mode = "fake-ip"
			},
			sc: screen{tun: "tungate0", upstreams: []string{"tls://10.233.0.2:853"}},
			want: []string{
				"routing: only the traffic of uids 1000, 2000-2999 and of cgroup user.slice/app.slice except the LAN, 10.0.0.0/8, the traffic of uid 0 goes through tungate0 (route.auto)",
				"routing: strict: DNS to any resolver goes through tungate0, and an address family tungate0 has no address of is blocked (route.strict)",
				"flows: 1 rule picks the outbound; a flow that matches none goes out through direct",
				"DNS: answered by tungate at 172.19.0.2 and at 10.233.0.2:53 (dns.listen, dns.hijack), mode fake-ip, upstreams tls://10.233.0.2:853 through outbound direct; the system resolver points at 172.19.0.2 until tungate stops (route.set_system_dns)",
				"API: off (api.listen)",
				"stop: Ctrl-C or SIGTERM; after a crash: tungate cleanup (with the same --config, if one was given)",
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := configs.Default()
			tc.edit(cfg)
			if got := firstScreen(cfg, tc.sc); !slices.Equal(got, tc.want) {
				t.Errorf("firstScreen =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}
