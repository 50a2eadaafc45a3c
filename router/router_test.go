package router

import (
	"net/netip"
	"testing"

	"github.com/tungate/tungate/configs"
)

func TestMatch(t *testing.T) {
	rules := []configs.Rule{
		{DomainSuffix: []string{"example.org"}, Outbound: "proxy"},
		{IPCIDR: []netip.Prefix{netip.MustParsePrefix("10.233.1.0/24")}, Port: []configs.PortRange{{From: 80, To: 80}, {From: 8000, To: 8999}}, Network: "tcp", Outbound: "direct"},
		{SourceCIDR: []netip.Prefix{netip.MustParsePrefix("172.19.0.0/30")}, Network: "udp", Outbound: "block"},
		{Domain: []string{"Exact.Test."}, Outbound: "exact"},
		{DomainKeyword: []string{"ads"}, Outbound: "block"},
		{DomainRegex: []string{`^api[0-9]+\.svc$`}, Outbound: "regex"},
		{IPCIDR: []netip.Prefix{netip.MustParsePrefix("fd00:233:1::/64")}, Outbound: "v6"},
	}
	r, err := New(rules, "final")
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ap := netip.MustParseAddrPort
	tests := []struct {
		name string
		m    Metadata
		want string
		idx  int
	}{
		{"suffix itself", Metadata{Network: "tcp", Domain: "example.org", Dst: ap("1.1.1.1:443")}, "proxy", 0},
		{"suffix sub", Metadata{Network: "udp", Domain: "a.b.example.org", Dst: ap("1.1.1.1:443")}, "proxy", 0},
		{"suffix needs a label boundary", Metadata{Network: "tcp", Domain: "badexample.org", Dst: ap("1.1.1.1:443")}, "final", -1},
		{"cidr+port+network", Metadata{Network: "tcp", Dst: ap("10.233.1.5:8080")}, "direct", 1},
		{"cidr, port outside", Metadata{Network: "tcp", Dst: ap("10.233.1.5:9000")}, "final", -1},
		{"cidr, wrong network", Metadata{Network: "udp", Dst: ap("10.233.1.5:80")}, "final", -1},
		{"source cidr udp", Metadata{Network: "udp", Src: ap("172.19.0.1:5000"), Dst: ap("9.9.9.9:53")}, "block", 2},
		{"exact, case and dot folded", Metadata{Network: "tcp", Domain: "exact.test", Dst: ap("1.2.3.4:1")}, "exact", 3},
		{"keyword", Metadata{Network: "tcp", Domain: "x.ads.net", Dst: ap("1.2.3.4:1")}, "block", 4},
		{"regex", Metadata{Network: "tcp", Domain: "api12.svc", Dst: ap("1.2.3.4:1")}, "regex", 5},
		{"regex no match", Metadata{Network: "tcp", Domain: "api.svc", Dst: ap("1.2.3.4:1")}, "final", -1},
		{"no domain known", Metadata{Network: "tcp", Dst: ap("1.2.3.4:1")}, "final", -1},
		{"ipv6 cidr", Metadata{Network: "tcp", Dst: ap("[fd00:233:1::7]:22")}, "v6", 6},
		{"first match wins", Metadata{Network: "tcp", Domain: "ads.example.org", Dst: ap("10.233.1.5:80")}, "proxy", 0},
	}
	for _, tt := range tests {
		got, idx := r.Match(tt.m)
		if got != tt.want || idx != tt.idx {
			t.Errorf("%s: Match(%+v) = %q, %d; want %q, %d", tt.name, tt.m, got, idx, tt.want, tt.idx)
		}
	}
}

func TestNewErrors(t *testing.T) {
	if _, err := New(nil, ""); err == nil {
		t.Error("New with no final outbound: want error")
	}
	if _, err := New([]configs.Rule{{DomainRegex: []string{"("}, Outbound: "x"}}, "x"); err == nil {
		t.Error("New with a bad regexp: want error")
	}
	if _, err := New([]configs.Rule{{UID: []configs.UIDRange{{From: 1000, To: 1000}}, Outbound: "x"}}, "x"); err == nil {
		t.Error("New with a uid rule: want a not-supported error until uids are known")
	}
}
