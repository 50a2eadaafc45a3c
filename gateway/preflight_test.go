package gateway

import (
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/outbound/socks5"
)

// TestCheckEqualsRun: what `tungate check` accepts (configs' Validate),
// the gateway builds (its preflight: the routing step and every outbound),
// and what the gateway would refuse, check refuses with the key.
func TestCheckEqualsRun(t *testing.T) {
	base := func() *configs.Config {
		return loadConfig(t, `
outbounds:
  - {name: direct, type: direct}
  - {name: proxy, type: socks5, address: "192.0.2.1:1080", username: u, password: p}
rules:
  - {domain_suffix: [example.org], outbound: proxy}
dns: {upstreams: ["udp://192.0.2.53:53"]}
route: {auto: false}
`)
	}
	socks := func(c *configs.Config) *socks5.Config { return c.Outbounds[1].Settings.(*socks5.Config) }
	for _, tc := range []struct {
		name string
		edit func(*configs.Config)
		key  string // "" when both accept
	}{
		{"the base", func(*configs.Config) {}, ""},
		{"uid rule condition", func(c *configs.Config) { c.Rules[0].UID = []configs.UIDRange{{From: 1000, To: 1000}} }, "rules[0].uid"},
		{"cgroup rule condition", func(c *configs.Config) { c.Rules[0].Cgroup = []string{"a.slice"} }, "rules[0].cgroup"},
		{"proxy by name", func(c *configs.Config) { socks(c).Address = "proxy.example:1080" }, "outbounds[1].address"},
		{"proxy port 0", func(c *configs.Config) { socks(c).Address = "192.0.2.1:0" }, "outbounds[1].address"},
		{"socks5 username over 255 bytes", func(c *configs.Config) { socks(c).Username = strings.Repeat("u", 256) }, "outbounds[1].username"},
		{"socks5 password without username", func(c *configs.Config) { socks(c).Username = "" }, "outbounds[1].password"},
		{"rule to a missing outbound", func(c *configs.Config) { c.Rules[0].Outbound = "nosuch" }, "rules[0].outbound"},
		{"bad domain regex", func(c *configs.Config) { c.Rules[0].DomainRegex = []string{"(a"} }, "rules[0].domain_regex[0]"},
		{"zero dial timeout", func(c *configs.Config) { c.Stack.TCP.DialTimeout = 0 }, "stack.tcp.dial_timeout"},
		{"zero udp idle timeout", func(c *configs.Config) { c.Stack.UDP.IdleTimeout = 0 }, "stack.udp.idle_timeout"},
		{"a valid change", func(c *configs.Config) { c.Stack.UDP.IdleTimeout = time.Second }, ""},
	} {
		cfg := base()
		tc.edit(cfg)
		checkErr := cfg.Validate()
		runErr := preflight(cfg)
		switch {
		case tc.key == "" && (checkErr != nil || runErr != nil):
			t.Errorf("%s: check %v, run %v; want both to accept", tc.name, checkErr, runErr)
		case tc.key != "" && (checkErr == nil || !strings.Contains(checkErr.Error(), tc.key+":")):
			t.Errorf("%s: check %v; want it refused under %s", tc.name, checkErr, tc.key)
		}
		if _, err := New(cfg, Deps{}); (err == nil) != (tc.key == "") {
			t.Errorf("%s: gateway.New %v; want it to agree with check (%v)", tc.name, err, checkErr)
		}
	}
}
