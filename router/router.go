package router

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
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
//
// Matching does not scan every rule: rules whose domain conditions are
// exact names or suffixes are indexed by name (a lookup per label suffix of
// the flow's domain), rules with destination CIDRs by prefix (a lookup per
// distinct prefix length), and only the rest are scanned. The candidates
// each index yields are checked in full, and the lowest-numbered rule that
// matches wins, so the result is the same as a scan in order.
type Router struct {
	rules []rule
	final string

	byDomain map[string][]int32 // exact name or suffix → rule indexes, ascending
	byPrefix prefixIndex
	scanned  []int32 // rules neither index can find, ascending
}

// prefixIndex finds the rules whose destination CIDRs contain an address:
// one hash lookup per distinct prefix length, longest first. IPv4 keys are
// packed into a uint64 (address << 8 | length), which hashes several times
// faster than a netip.Prefix.
type prefixIndex struct {
	lengths4 []int
	rules4   map[uint64][]int32 // key4 → rule indexes, ascending
	lengths6 []int
	rules6   map[netip.Prefix][]int32
}

func key4(a netip.Addr, bits int) uint64 {
	b := a.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	if bits < 32 {
		v &^= 1<<(32-bits) - 1
	}
	return uint64(v)<<8 | uint64(bits)
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
	r.index()
	return r, nil
}

func (r *Router) index() {
	r.byDomain = make(map[string][]int32)
	r.byPrefix.rules4 = make(map[uint64][]int32)
	r.byPrefix.rules6 = make(map[netip.Prefix][]int32)
	seen4, seen6 := map[int]bool{}, map[int]bool{}
	for i := range r.rules {
		ru := &r.rules[i]
		idx := int32(i)
		switch {
		case ru.hasDomainCondition() && len(ru.keywords) == 0 && len(ru.regexps) == 0:
			// Only exact names and suffixes: the name index finds it.
			// A suffix is matched against every label suffix of the
			// flow's domain (which covers the name itself); exact names
			// carry a marker so they only match the whole domain.
			for d := range ru.domains {
				k := exactKey(d)
				r.byDomain[k] = appendOnce(r.byDomain[k], idx)
			}
			for _, sfx := range ru.suffixes {
				r.byDomain[sfx] = appendOnce(r.byDomain[sfx], idx)
			}
		case !ru.hasDomainCondition() && len(ru.dst) > 0:
			for _, p := range ru.dst {
				if a := p.Addr().Unmap(); a.Is4() {
					bits := min(p.Bits(), 32)
					k := key4(a, bits)
					r.byPrefix.rules4[k] = appendOnce(r.byPrefix.rules4[k], idx)
					if !seen4[bits] {
						seen4[bits] = true
						r.byPrefix.lengths4 = append(r.byPrefix.lengths4, bits)
					}
				} else {
					p = p.Masked()
					r.byPrefix.rules6[p] = appendOnce(r.byPrefix.rules6[p], idx)
					if !seen6[p.Bits()] {
						seen6[p.Bits()] = true
						r.byPrefix.lengths6 = append(r.byPrefix.lengths6, p.Bits())
					}
				}
			}
		default:
			r.scanned = append(r.scanned, idx)
		}
	}
	slices.Sort(r.byPrefix.lengths4)
	slices.Reverse(r.byPrefix.lengths4)
	slices.Sort(r.byPrefix.lengths6)
	slices.Reverse(r.byPrefix.lengths6)
}

// appendOnce appends idx unless it is already last; indexes arrive in
// ascending order, so the lists stay sorted and free of duplicates.
func appendOnce(list []int32, idx int32) []int32 {
	if n := len(list); n > 0 && list[n-1] == idx {
		return list
	}
	return append(list, idx)
}

// exactKey marks an exact-name entry so that it does not act as a suffix.
// A domain name cannot contain a space.
func exactKey(d string) string { return " " + d }

// Match returns the outbound for m and the index of the rule that matched,
// or -1 when none did and the final outbound applies. It does not allocate.
func (r *Router) Match(m Metadata) (outbound string, ruleIndex int) {
	best := int32(len(r.rules))
	try := func(list []int32) {
		for _, i := range list {
			if i >= best {
				return
			}
			if r.rules[i].match(&m) {
				best = i
				return
			}
		}
	}
	if d := m.Domain; d != "" {
		if list, ok := r.byDomain[exactKey(d)]; ok {
			try(list)
		}
		for {
			if list, ok := r.byDomain[d]; ok {
				try(list)
			}
			dot := strings.IndexByte(d, '.')
			if dot < 0 {
				break
			}
			d = d[dot+1:]
		}
	}
	if a := m.Dst.Addr().Unmap(); a.Is4() {
		for _, bits := range r.byPrefix.lengths4 {
			if list, ok := r.byPrefix.rules4[key4(a, bits)]; ok {
				try(list)
			}
		}
	} else if a.Is6() {
		for _, bits := range r.byPrefix.lengths6 {
			p, _ := a.Prefix(bits)
			if list, ok := r.byPrefix.rules6[p]; ok {
				try(list)
			}
		}
	}
	try(r.scanned)
	if int(best) < len(r.rules) {
		return r.rules[best].outbound, int(best)
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
