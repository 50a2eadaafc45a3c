package router

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"

	"github.com/tungate/tungate/configs"
)

// Metadata is what is known of a flow when it is routed.
type Metadata struct {
	Network  string // "tcp" or "udp"
	Src, Dst netip.AddrPort
	Domain   string // lower case, no trailing dot; "" when unknown
}

// Router matches flows against an ordered rule list.
type Router struct {
	rules []rule
	final string
}

type rule struct {
	domains  map[string]struct{}
	suffixes []string
	keywords []string
	regexps  []*regexp.Regexp
	dst, src []netip.Prefix
	ports    []configs.PortRange
	network  string
	outbound string
}

// New compiles rules. final is the outbound for flows no rule matches.
func New(rules []configs.Rule, final string) (*Router, error) {
	if final == "" {
		return nil, fmt.Errorf("router: no final outbound")
	}
	r := &Router{final: final}
	for i, c := range rules {
		if len(c.UID) > 0 || len(c.Cgroup) > 0 {
			return nil, fmt.Errorf("rules[%d]: uid and cgroup conditions are not supported yet", i)
		}
		ru := rule{
			suffixes: lowerAll(c.DomainSuffix),
			keywords: lowerAll(c.DomainKeyword),
			dst:      c.IPCIDR,
			src:      c.SourceCIDR,
			ports:    c.Port,
			network:  c.Network,
			outbound: c.Outbound,
		}
		if len(c.Domain) > 0 {
			ru.domains = make(map[string]struct{}, len(c.Domain))
			for _, d := range c.Domain {
				ru.domains[normalize(d)] = struct{}{}
			}
		}
		for j, expr := range c.DomainRegex {
			re, err := regexp.Compile(expr)
			if err != nil {
				return nil, fmt.Errorf("rules[%d].domain_regex[%d]: %w", i, j, err)
			}
			ru.regexps = append(ru.regexps, re)
		}
		r.rules = append(r.rules, ru)
	}
	return r, nil
}

// Match returns the outbound for m and the index of the rule that matched,
// or -1 when none did and the final outbound applies.
func (r *Router) Match(m Metadata) (outbound string, ruleIndex int) {
	for i := range r.rules {
		if r.rules[i].match(&m) {
			return r.rules[i].outbound, i
		}
	}
	return r.final, -1
}

func (ru *rule) match(m *Metadata) bool {
	if ru.network != "" && ru.network != m.Network {
		return false
	}
	if len(ru.ports) > 0 && !portIn(ru.ports, m.Dst.Port()) {
		return false
	}
	if len(ru.dst) > 0 && !prefixIn(ru.dst, m.Dst.Addr()) {
		return false
	}
	if len(ru.src) > 0 && !prefixIn(ru.src, m.Src.Addr()) {
		return false
	}
	if ru.hasDomainCondition() && !ru.matchDomain(m.Domain) {
		return false
	}
	return true
}

func (ru *rule) hasDomainCondition() bool {
	return ru.domains != nil || len(ru.suffixes) > 0 || len(ru.keywords) > 0 || len(ru.regexps) > 0
}

// matchDomain is true when any of the rule's domain conditions matches: they
// are alternatives of one condition, as sing-box and mihomo users expect.
func (ru *rule) matchDomain(d string) bool {
	if d == "" {
		return false
	}
	if _, ok := ru.domains[d]; ok {
		return true
	}
	for _, s := range ru.suffixes {
		if d == s || (strings.HasSuffix(d, s) && d[len(d)-len(s)-1] == '.') {
			return true
		}
	}
	for _, k := range ru.keywords {
		if strings.Contains(d, k) {
			return true
		}
	}
	for _, re := range ru.regexps {
		if re.MatchString(d) {
			return true
		}
	}
	return false
}

func portIn(ranges []configs.PortRange, p uint16) bool {
	for _, r := range ranges {
		if r.Contains(p) {
			return true
		}
	}
	return false
}

func prefixIn(prefixes []netip.Prefix, a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func normalize(d string) string { return strings.TrimSuffix(strings.ToLower(d), ".") }

func lowerAll(in []string) []string {
	out := make([]string, len(in))
	for i, s := range in {
		out[i] = strings.TrimPrefix(normalize(s), ".")
	}
	return out
}
