package gateway

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/router"
)

// Meta is what is known of a flow when it is routed.
type Meta struct {
	Network string // "tcp" or "udp"
	Inbound string // "tun"
	Src     netip.AddrPort
	Dst     netip.AddrPort
	// Domain is the flow's name when the caller knows it (doctor
	// --explain with a name); otherwise the routing step looks it up.
	Domain string
	// UID is the app's uid, when known.
	UID *uint32
}

// Decision is the routing step's answer for one flow.
type Decision struct {
	// DNS says the flow is hijacked DNS, answered by the DNS proxy; the
	// other fields are then unset.
	DNS bool
	// Loop says the flow came from one of tungate's own sockets and is
	// refused.
	Loop bool
	// Outbound is the chosen outbound's name.
	Outbound string
	// Rule is the index of the rule that matched, -1 for final; RuleName
	// is "rules[i]" or "final", RulePayload the rule's conditions.
	Rule        int
	RuleName    string
	RulePayload string
	// Chain is the outbounds the flow goes through, outermost first.
	Chain []string
	// Domain is the flow's name when known, and DomainSource where it came
	// from: "fake-ip", "dns" (real mode's answers), "given".
	Domain       string
	DomainSource string
}

// Names is how the routing step learns a destination's domain: the DNS
// proxy's fake-ip pool and remembered answers.
type Names interface {
	Domain(a netip.Addr) (string, bool)
	IsFake(a netip.Addr) bool
}

// routing is the immutable part of the routing step for one configuration:
// the rules and the DNS hijack. A reload swaps a new one in whole.
type routing struct {
	cfg    *configs.Config
	rules  *router.Router
	hijack *hijack // nil when DNS is off
}

func newRouting(cfg *configs.Config) (*routing, error) {
	rt, err := router.New(cfg.Rules, cfg.FinalOutbound())
	if err != nil {
		return nil, err
	}
	r := &routing{cfg: cfg, rules: rt}
	if cfg.DNS.Enabled {
		if r.hijack, err = newHijack(cfg.DNS); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// route is the one routing step: hijacked DNS, then the flow's name
// (given, or from names), then the rules. Loop detection is the running
// gateway's, around it.
func (r *routing) route(m Meta, names Names) Decision {
	if r.hijack.match(m.Dst) {
		return Decision{DNS: true}
	}
	d := Decision{Domain: m.Domain}
	switch {
	case d.Domain != "":
		d.DomainSource = "given"
	case names != nil:
		a := m.Dst.Addr()
		if name, ok := names.Domain(a); ok {
			d.Domain, d.DomainSource = name, "dns"
			if names.IsFake(a) {
				d.DomainSource = "fake-ip"
			}
		}
	}
	name, idx := r.rules.Match(router.Metadata{Network: m.Network, Src: m.Src, Dst: m.Dst, Domain: d.Domain})
	d.Outbound, d.Rule, d.Chain = name, idx, []string{name}
	if idx >= 0 {
		d.RuleName = fmt.Sprintf("rules[%d]", idx)
		d.RulePayload = DescribeRule(r.cfg.Rules[idx])
	} else {
		d.RuleName = "final"
	}
	return d
}

// Explanation is what `doctor --explain` prints of tungate's side of a
// flow: the routing step's decision and where the outbound's socket goes.
type Explanation struct {
	Decision Decision
	// Upstream is where the chosen outbound's socket goes, and Socket how
	// that socket is marked and bound.
	Upstream outbound.Upstream
	Socket   outbound.Socket
	// Known is false when the outbound cannot say where its socket goes.
	Known bool
}

// Explain runs the routing step of cfg for m, as the running gateway
// would for a flow it has no name for beyond m.Domain, and says where the
// outbound's socket goes.
func Explain(cfg *configs.Config, m Meta) (Explanation, error) {
	r, err := newRouting(cfg)
	if err != nil {
		return Explanation{}, err
	}
	e := Explanation{Decision: r.route(m, nil)}
	if e.Decision.DNS {
		return e, nil
	}
	o, ok := cfg.LookupOutbound(e.Decision.Outbound)
	if !ok {
		return e, fmt.Errorf("outbound %q is not configured", e.Decision.Outbound)
	}
	ex, ok := o.Settings.(outbound.Explainer)
	if !ok {
		return e, nil
	}
	e.Known = true
	e.Upstream = ex.Upstream(m.Dst, m.Network)
	switch so, owns := o.Settings.(outbound.SocketOwner); {
	case e.Upstream.Transport:
		e.Socket = transportSocket(cfg)
	case owns:
		e.Socket = so.Socket()
	}
	return e, nil
}

// DescribeRule renders a rule's conditions in the configuration's words.
func DescribeRule(r configs.Rule) string {
	var parts []string
	list := func(key string, vals []string) {
		if len(vals) > 0 {
			parts = append(parts, key+" "+strings.Join(vals, ","))
		}
	}
	strs := func(n int, f func(int) string) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = f(i)
		}
		return out
	}
	list("domain", r.Domain)
	list("domain_suffix", r.DomainSuffix)
	list("domain_keyword", r.DomainKeyword)
	list("domain_regex", r.DomainRegex)
	list("ip_cidr", strs(len(r.IPCIDR), func(i int) string { return r.IPCIDR[i].String() }))
	list("source_cidr", strs(len(r.SourceCIDR), func(i int) string { return r.SourceCIDR[i].String() }))
	list("port", strs(len(r.Port), func(i int) string { return r.Port[i].String() }))
	if r.Network != "" {
		parts = append(parts, "network "+r.Network)
	}
	list("uid", strs(len(r.UID), func(i int) string { return r.UID[i].String() }))
	list("cgroup", r.Cgroup)
	if len(parts) == 0 {
		return "no conditions: every flow"
	}
	return strings.Join(parts, ", ")
}
