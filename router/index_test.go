package router

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/tungate/tungate/configs"
)

// linearMatch is the definition the indexes must agree with: the first rule
// in order that matches.
func linearMatch(r *Router, m Metadata) (string, int) {
	for i := range r.rules {
		if r.rules[i].match(&m) {
			return r.rules[i].outbound, i
		}
	}
	return r.final, -1
}

// TestIndexAgreesWithLinearScan builds random rule lists mixing every
// condition and checks Match against an in-order scan on random flows.
func TestIndexAgreesWithLinearScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	labels := []string{"a", "b", "example", "org", "net", "ads", "cdn", "x1"}
	name := func() string {
		n := 1 + rng.IntN(3)
		d := labels[rng.IntN(len(labels))]
		for range n {
			d = labels[rng.IntN(len(labels))] + "." + d
		}
		return d
	}
	prefix := func() netip.Prefix {
		if rng.IntN(4) == 0 {
			a := netip.AddrFrom16([16]byte{0xfd, 0, 2, 0x33, byte(rng.IntN(4))})
			return netip.PrefixFrom(a, 24+rng.IntN(16)).Masked()
		}
		a := netip.AddrFrom4([4]byte{10, byte(rng.IntN(4)), byte(rng.IntN(4)), byte(rng.IntN(256))})
		return netip.PrefixFrom(a, 8+rng.IntN(25)).Masked()
	}
	for round := range 50 {
		var rules []configs.Rule
		for i := range 40 {
			var c configs.Rule
			for c.Outbound == "" || (len(c.Domain)+len(c.DomainSuffix)+len(c.DomainKeyword)+len(c.DomainRegex)+len(c.IPCIDR)+len(c.SourceCIDR)+len(c.Port) == 0 && c.Network == "") {
				switch rng.IntN(9) {
				case 0:
					c.Domain = append(c.Domain, name())
				case 1, 2:
					c.DomainSuffix = append(c.DomainSuffix, name())
				case 3:
					c.DomainKeyword = append(c.DomainKeyword, labels[rng.IntN(len(labels))])
				case 4:
					c.IPCIDR = append(c.IPCIDR, prefix(), prefix())
				case 5:
					c.IPCIDR = append(c.IPCIDR, prefix())
				case 6:
					c.SourceCIDR = append(c.SourceCIDR, prefix())
				case 7:
					p := uint16(rng.IntN(3) * 100)
					c.Port = append(c.Port, configs.PortRange{From: p, To: p + 50})
				case 8:
					c.Network = []string{"tcp", "udp"}[rng.IntN(2)]
				}
				c.Outbound = fmt.Sprintf("out%d", i)
			}
			rules = append(rules, c)
		}
		r, err := New(rules, "final")
		if err != nil {
			t.Fatalf("round %d: New: %v", round, err)
		}
		for range 400 {
			m := Metadata{
				Network: []string{"tcp", "udp"}[rng.IntN(2)],
				Src:     netip.AddrPortFrom(prefix().Addr(), 1000),
				Dst:     netip.AddrPortFrom(prefix().Addr().Next(), uint16(rng.IntN(300))),
			}
			if rng.IntN(3) > 0 {
				m.Domain = name()
			}
			gotOut, gotIdx := r.Match(m)
			wantOut, wantIdx := linearMatch(r, m)
			if gotOut != wantOut || gotIdx != wantIdx {
				t.Fatalf("round %d: Match(%+v) = %q, %d; an in-order scan says %q, %d", round, m, gotOut, gotIdx, wantOut, wantIdx)
			}
		}
	}
}

// benchRouter has 10,000 domain-suffix rules and 10,000 CIDR rules, the
// scale of a large community rule set.
func benchRouter(b *testing.B) *Router {
	rng := rand.New(rand.NewPCG(3, 4))
	rules := make([]configs.Rule, 0, 20000)
	for i := range 10000 {
		rules = append(rules, configs.Rule{DomainSuffix: []string{fmt.Sprintf("site%d.example%d.com", i, i%97)}, Outbound: "proxy"})
	}
	for range 10000 {
		a := netip.AddrFrom4([4]byte{byte(11 + rng.IntN(200)), byte(rng.IntN(256)), byte(rng.IntN(256)), 0})
		rules = append(rules, configs.Rule{IPCIDR: []netip.Prefix{netip.PrefixFrom(a, 16+rng.IntN(9)).Masked()}, Outbound: "direct"})
	}
	r, err := New(rules, "final")
	if err != nil {
		b.Fatal(err)
	}
	return r
}

func BenchmarkMatch(b *testing.B) {
	r := benchRouter(b)
	cases := map[string]Metadata{
		"domain hit":   {Network: "tcp", Domain: "cdn.www.site4242.example69.com", Dst: netip.MustParseAddrPort("198.18.0.7:443")},
		"domain miss":  {Network: "tcp", Domain: "a.b.c.unknown-site.org", Dst: netip.MustParseAddrPort("8.8.4.4:443")},
		"cidr only":    {Network: "udp", Dst: netip.MustParseAddrPort("9.9.9.9:53")},
		"ipv6 no rule": {Network: "tcp", Dst: netip.MustParseAddrPort("[2001:db8::1]:443")},
	}
	for name, m := range cases {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r.Match(m)
			}
		})
	}
}
