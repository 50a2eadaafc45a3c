package gateway

import (
	"log/slog"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/outbound/direct"
	"github.com/tungate/tungate/outbound/reject"
	"github.com/tungate/tungate/outbound/socks5"
)

func directOut(name string, mark uint32, iface string) configs.Outbound {
	return configs.Outbound{Name: name, Type: direct.Type, Settings: &direct.Config{FWMark: mark, Interface: iface}}
}

func TestOwnMarks(t *testing.T) {
	tests := []struct {
		name      string
		outbounds []configs.Outbound
		marks     []uint32
		unmarked  bool
	}{
		{"default", []configs.Outbound{directOut("direct", 0x2e7, "")}, []uint32{0x2e7}, false},
		{"two direct, one unmarked", []configs.Outbound{directOut("a", 0x2e7, ""), directOut("b", 0, "")}, []uint32{0x2e7}, true},
		{"proxies only: the transport's default mark", []configs.Outbound{{Name: "p", Type: socks5.Type, Settings: &socks5.Config{Address: "10.0.0.1:1080"}}}, []uint32{0x2e7}, false},
		{"marks of every direct outbound", []configs.Outbound{directOut("a", 1, ""), {Name: "r", Type: reject.Type, Settings: &reject.Config{}}, directOut("b", 2, "")}, []uint32{1, 2}, false},
	}
	for _, tc := range tests {
		cfg := configs.Default()
		cfg.Outbounds = tc.outbounds
		marks, unmarked := OwnMarks(cfg)
		if !reflect.DeepEqual(marks, tc.marks) || unmarked != tc.unmarked {
			t.Errorf("%s: OwnMarks = %v, %v; want %v, %v", tc.name, marks, unmarked, tc.marks, tc.unmarked)
		}
	}
	rc := RouteConfig(configs.Default(), "tungate0")
	if rc.TunName != "tungate0" || rc.Table != 2022 || rc.Priority != 9000 || rc.Journal != "/run/tungate/route.journal" || !reflect.DeepEqual(rc.FWMarks, []uint32{0x2e7}) {
		t.Errorf("RouteConfig(default) = %+v", rc)
	}
}

// The proxy transport is the first direct outbound's socket, or the
// default mark on the default interface without one; doctor, auto-route
// and the dialers all read it from transportSocket.
func TestTransportSocket(t *testing.T) {
	cfg := configs.Default()
	cfg.Outbounds = []configs.Outbound{{Name: "p", Type: socks5.Type, Settings: &socks5.Config{Address: "10.0.0.1:1080"}}, directOut("wan", 7, "eth1"), directOut("wan2", 8, "")}
	if s := transportSocket(cfg); s.FWMark != 7 || s.Interface != "eth1" {
		t.Errorf("transportSocket = %+v, want the first direct outbound's", s)
	}
	if followsDefault(cfg) != true {
		t.Error("followsDefault: wan2 follows the default interface")
	}
	cfg.Outbounds = cfg.Outbounds[:1]
	if s := transportSocket(cfg); s.FWMark != direct.DefaultFWMark || s.Interface != "" {
		t.Errorf("transportSocket without a direct outbound = %+v", s)
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
	if got, want := DescribeRule(r), "domain_suffix example.org, ip_cidr 10.0.0.0/8,fd00::/8, port 80,8000-8999, network tcp"; got != want {
		t.Errorf("DescribeRule = %q, want %q", got, want)
	}
	if got := DescribeRule(configs.Rule{Outbound: "x"}); got != "no conditions: every flow" {
		t.Errorf("DescribeRule(empty) = %q", got)
	}
}

func TestDoctorConfig(t *testing.T) {
	cfg := configs.Default()
	cfg.Outbounds = append(cfg.Outbounds, directOut("wan2", 7, "eth1"))
	cfg.Rules = []configs.Rule{{SourceCIDR: []netip.Prefix{netip.MustParsePrefix("192.168.50.0/24")}, Outbound: "direct"}}
	dc := DoctorConfig(cfg, "/etc/tungate.yaml")
	if dc.ConfigFlag != "--config /etc/tungate.yaml" || len(dc.Outbounds) != 1 || dc.Outbounds[0].Key != "outbounds[1] (wan2)" ||
		len(dc.SourceCIDRs) != 1 || dc.Route.TunName != cfg.Tun.Name || !dc.Auto {
		t.Errorf("DoctorConfig = %+v", dc)
	}
	if dc := DoctorConfig(cfg, ""); dc.ConfigFlag != "" {
		t.Errorf("DoctorConfig without a file: ConfigFlag %q", dc.ConfigFlag)
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
		g := &Gateway{log: slog.New(slog.DiscardHandler)}
		if err := g.setSystemDNS(cfg); err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("setSystemDNS: %v, want an error naming %s", err, tc.key)
		}
		if g.system.dns != nil {
			t.Error("setSystemDNS failed but left a resolver change")
		}
	}
}
