package main

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/tungate/tungate/configs"
)

func TestParseExplain(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"1.2.3.4:443/tcp", "1.2.3.4:443/tcp", true},
		{"[2001:db8::1]:53/udp", "[2001:db8::1]:53/udp", true},
		{"[::ffff:1.2.3.4]:80/tcp", "1.2.3.4:80/tcp", true},
		{"1.2.3.4:443", "", false},
		{"1.2.3.4:443/icmp", "", false},
		{"example.org:443/tcp", "", false},
		{"1.2.3.4/tcp", "", false},
	} {
		q, err := parseExplain(tc.in)
		if (err == nil) != tc.ok || (tc.ok && q.String() != tc.want) {
			t.Errorf("parseExplain(%q) = %v, %v; want %q (ok %v)", tc.in, q, err, tc.want, tc.ok)
		}
	}
}

func TestDescribeRule(t *testing.T) {
	r := configs.Rule{
		DomainSuffix: []string{"example.org"},
		IPCIDR:       []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("fd00::/8")},
		Port:         []configs.PortRange{{From: 80, To: 80}, {From: 8000, To: 8999}},
		Network:      "tcp",
		Outbound:     "proxy",
	}
	if got, want := describeRule(r), "domain_suffix example.org, ip_cidr 10.0.0.0/8,fd00::/8, port 80,8000-8999, network tcp"; got != want {
		t.Errorf("describeRule = %q, want %q", got, want)
	}
	if got := describeRule(configs.Rule{Outbound: "x"}); got != "no conditions: every flow" {
		t.Errorf("describeRule(empty) = %q", got)
	}
}

func TestDoctorConfig(t *testing.T) {
	cfg := configs.Default()
	cfg.Outbounds = append(cfg.Outbounds, configs.Outbound{Name: "wan2", Type: configs.OutboundDirect, Interface: "eth1", FWMark: 7})
	cfg.Rules = []configs.Rule{{SourceCIDR: []netip.Prefix{netip.MustParsePrefix("192.168.50.0/24")}, Outbound: "direct"}}
	dc := doctorConfig(cfg, "/etc/tungate.yaml")
	if dc.ConfigFlag != "--config /etc/tungate.yaml" || len(dc.Outbounds) != 1 || dc.Outbounds[0].Key != "outbounds[1] (wan2)" ||
		len(dc.SourceCIDRs) != 1 || dc.Route.TunName != cfg.Tun.Name || !dc.Auto {
		t.Errorf("doctorConfig = %+v", dc)
	}
	if dc := doctorConfig(cfg, ""); dc.ConfigFlag != "" {
		t.Errorf("doctorConfig without a file: ConfigFlag %q", dc.ConfigFlag)
	}
}

// route.set_system_dns refuses a configuration that would point the
// system at nothing, naming the key, before touching anything.
func TestSetSystemDNSNeeds(t *testing.T) {
	for _, tc := range []struct {
		edit func(*configs.Config)
		key  string
	}{
		{func(c *configs.Config) { c.DNS.Enabled = false }, "dns.enabled"},
		{func(c *configs.Config) { c.DNS.Listen = netip.Addr{} }, "dns.listen"},
		{func(c *configs.Config) { c.Route.Journal = "" }, "route.journal"},
	} {
		cfg := configs.Default()
		cfg.Route.SetSystemDNS = true
		tc.edit(cfg)
		g := &gateway{log: slog.New(slog.DiscardHandler), routes: &systemState{}}
		if err := g.setSystemDNS(cfg); err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("setSystemDNS: %v, want an error naming %s", err, tc.key)
		}
		if g.routes.dns != nil {
			t.Error("setSystemDNS failed but left a resolver change")
		}
	}
}
