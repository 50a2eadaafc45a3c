package sysroute

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/tungate/tungate/configs"
)

// ProtoTungate is the protocol number that tags every rule and route
// tungate creates (rtm_protocol of a route, FRA_PROTOCOL of a rule; `ip
// rule` and `ip route` show "proto 231"). Cleanup deletes only objects with
// this tag. 231 (0xe7, an echo of the default fwmark 0x2e7) is in none of
// the kernel's or iproute2's lists: the kernel keeps 0-4 (RTPROT_KERNEL,
// RTPROT_BOOT, RTPROT_STATIC…) and routing daemons use 8-19, 42, 99 and
// 186-192 (/etc/iproute2/rt_protos).
const ProtoTungate = 0xe7

// DefaultFWMark is the mark excluded from the TUN when Config.FWMarks is
// empty; it is the default fwmark of a direct outbound.
const DefaultFWMark = 0x2e7

// Kernel tables and limits the plan refers to.
const (
	tableMain = 254
	// lastPriority is the last priority tungate's band may use: the
	// main table's rule is at 32766 and must come after the band.
	lastPriority = 32765
)

// Config says what to install. Table, Priority and the selections carry
// the meaning of the route.* configuration keys of the same names.
type Config struct {
	// TunName is the TUN device that the default routes point into.
	TunName string
	// TunAddrs are the TUN's addresses: a family gets routes and rules only
	// if the TUN has an address of it (or, with Strict, is blocked).
	TunAddrs []netip.Prefix
	// Table is tungate's routing table; Priority the first ip rule
	// priority of its band (the band is as long as the rules need).
	Table, Priority int
	// FWMarks are the marks on tungate's own outbound sockets: traffic
	// carrying one of them skips the band, so relayed traffic never comes
	// back into the TUN. Zero marks are ignored; empty means DefaultFWMark.
	FWMarks []uint32
	// IncludeUIDs, when set, limits the TUN to these uids' traffic;
	// ExcludeUIDs' traffic bypasses it (exclusion wins).
	IncludeUIDs, ExcludeUIDs []configs.UIDRange
	// IncludeCgroups, when set, limits the TUN to the traffic of sockets
	// created in these cgroups (or below them); ExcludeCgroups' traffic
	// bypasses it (exclusion wins, over uids too). Paths are cgroup v2
	// paths relative to the hierarchy's root ("user.slice/app.slice"), as
	// /proc/PID/cgroup shows them ("/user.slice/app.slice"), or absolute
	// under its mount point. See cgroup.go.
	IncludeCgroups, ExcludeCgroups []string
	// CgroupRoot is the cgroup v2 hierarchy's mount point; "" finds it in
	// /proc/self/mountinfo. (Tests set it.)
	CgroupRoot string
	// ExcludeAddresses never enter the TUN (except port-53 traffic under
	// Strict).
	ExcludeAddresses []netip.Prefix
	// Strict blocks an address family the TUN does not carry and sends
	// DNS (port 53, UDP and TCP) to any resolver through the TUN.
	Strict bool
	// Journal is the write-ahead record of every change; see Install.
	Journal string
	// NetNS is the path of the network namespace to work in (e.g.
	// /run/netns/NAME); "" is the caller's own. Tests always set it.
	NetNS string
}

// family is 4 or 6.
type family int

func (f family) String() string { return fmt.Sprintf("ipv%d", int(f)) }

// action is what a rule does when it matches.
type action string

const (
	// actLookup looks the destination up in Table; if the table has no
	// route for it (or suppress_prefixlength rejects the one it has), the
	// kernel goes on with the next rule.
	actLookup action = "lookup"
	// actGoto jumps to the rule at priority Goto (forward only).
	actGoto action = "goto"
	// actNop does nothing: it is the end of tungate's band, the target of
	// every "skip the band" goto.
	actNop action = "nop"
)

// rule is one ip rule of tungate's band, in the form the journal records.
type rule struct {
	Family   family       `json:"family"`
	Priority int          `json:"priority"`
	Action   action       `json:"action"`
	Table    int          `json:"table,omitempty"`
	Goto     int          `json:"goto,omitempty"`
	FWMark   uint32       `json:"fwmark,omitempty"`
	UIDs     *uidRange    `json:"uidrange,omitempty"`
	IPProto  string       `json:"ipproto,omitempty"` // "tcp" | "udp"
	DPort    uint16       `json:"dport,omitempty"`
	To       netip.Prefix `json:"to,omitzero"`
	// Suppress is suppress_prefixlength: the lookup's answer is rejected
	// when its prefix is this long or shorter.
	Suppress *int `json:"suppress_prefixlength,omitempty"`

	// Proto is the rule's protocol tag as listed by the kernel (rules
	// tungate adds always carry ProtoTungate; not journaled).
	Proto uint8 `json:"-"`
	// Why says what the rule is for (logs and tests; not journaled).
	Why string `json:"-"`
}

type uidRange struct {
	From uint32 `json:"from"`
	To   uint32 `json:"to"`
}

// String renders the rule the way `ip rule` shows it.
func (r rule) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d: from all", r.Priority)
	if r.To.IsValid() {
		fmt.Fprintf(&b, " to %s", r.To)
	}
	if r.FWMark != 0 {
		fmt.Fprintf(&b, " fwmark %#x", r.FWMark)
	}
	if r.IPProto != "" {
		fmt.Fprintf(&b, " ipproto %s", r.IPProto)
	}
	if r.DPort != 0 {
		fmt.Fprintf(&b, " dport %d", r.DPort)
	}
	if r.UIDs != nil {
		fmt.Fprintf(&b, " uidrange %d-%d", r.UIDs.From, r.UIDs.To)
	}
	switch r.Action {
	case actLookup:
		if r.Table == tableMain {
			b.WriteString(" lookup main")
		} else {
			fmt.Fprintf(&b, " lookup %d", r.Table)
		}
		if r.Suppress != nil {
			fmt.Fprintf(&b, " suppress_prefixlength %d", *r.Suppress)
		}
	case actGoto:
		fmt.Fprintf(&b, " goto %d", r.Goto)
	case actNop:
		b.WriteString(" nop")
	}
	return b.String()
}

// routeType is a route's kind.
type routeType string

const (
	// rtDev is a unicast route out of a device (the TUN).
	rtDev routeType = "dev"
	// rtUnreachable answers every lookup with "network unreachable".
	rtUnreachable routeType = "unreachable"
)

// route is one route of tungate's table, in the form the journal records.
type route struct {
	Family family       `json:"family"`
	Table  int          `json:"table"`
	To     netip.Prefix `json:"to"`
	Type   routeType    `json:"type"`
	Dev    string       `json:"dev,omitempty"`

	// Proto is the route's protocol as listed by the kernel (not
	// journaled: routes tungate adds always carry ProtoTungate).
	Proto uint8 `json:"-"`
}

// String renders the route the way `ip route show table N` shows it.
func (r route) String() string {
	to := r.To.String()
	if r.To.Bits() == 0 {
		to = "default"
	}
	if r.Type == rtUnreachable {
		return fmt.Sprintf("unreachable %s table %d", to, r.Table)
	}
	return fmt.Sprintf("%s dev %s table %d", to, r.Dev, r.Table)
}

func defaultPrefix(f family) netip.Prefix {
	if f == 4 {
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
}

// validate checks what Install needs, naming the configuration key of each
// problem.
func (c *Config) validate() error {
	switch {
	case c.Table <= 0:
		return fmt.Errorf("route.table must be greater than 0, got %d", c.Table)
	case c.Table >= 253 && c.Table <= 255:
		return fmt.Errorf("route.table %d is a reserved kernel table", c.Table)
	case c.Priority <= 0 || c.Priority > lastPriority:
		return fmt.Errorf("route.priority %d is outside 1-%d", c.Priority, lastPriority)
	case c.Journal == "":
		return errors.New("route.journal must be set")
	}
	for _, u := range append(slices.Clone(c.IncludeUIDs), c.ExcludeUIDs...) {
		if u.From > u.To {
			return fmt.Errorf("route uid range %s is reversed", u)
		}
	}
	for _, p := range c.ExcludeAddresses {
		if !p.IsValid() {
			return errors.New("route.exclude_addresses has an invalid CIDR")
		}
	}
	if c.byCgroup() {
		for _, m := range c.marks() {
			if m == CgroupIncludeMark || m == CgroupExcludeMark {
				return fmt.Errorf("outbounds: fwmark %#x is a mark tungate sets on the traffic of route.include_cgroups (%#x) and route.exclude_cgroups (%#x); give the outbound another fwmark", m, CgroupIncludeMark, CgroupExcludeMark)
			}
		}
	}
	return nil
}

// families returns whether the TUN carries IPv4 and IPv6.
func (c *Config) families() (has4, has6 bool) {
	for _, p := range c.TunAddrs {
		if !p.IsValid() {
			continue
		}
		if p.Addr().Unmap().Is4() {
			has4 = true
		} else {
			has6 = true
		}
	}
	return has4, has6
}

// marks returns the distinct non-zero marks to exclude, in order.
func (c *Config) marks() []uint32 {
	var out []uint32
	for _, m := range c.FWMarks {
		if m != 0 && !slices.Contains(out, m) {
			out = append(out, m)
		}
	}
	if len(out) == 0 {
		out = []uint32{DefaultFWMark}
	}
	return out
}

// plan returns the routes and rules Install makes, routes first, rules in
// priority order per family (IPv4's, then IPv6's); the package
// documentation describes them.
func plan(c Config) ([]route, []rule, error) {
	if err := c.validate(); err != nil {
		return nil, nil, err
	}
	has4, has6 := c.families()
	if !has4 && !has6 {
		return nil, nil, errors.New("tun.address: the TUN has no address, so there is nothing to route into it")
	}
	var routes []route
	var rules []rule
	for _, f := range []family{4, 6} {
		has := (f == 4 && has4) || (f == 6 && has6)
		switch {
		case has:
			routes = append(routes, route{Family: f, Table: c.Table, To: defaultPrefix(f), Type: rtDev, Dev: c.TunName})
		case c.Strict:
			routes = append(routes, route{Family: f, Table: c.Table, To: defaultPrefix(f), Type: rtUnreachable})
		default:
			continue // the family keeps the host's routing
		}
		band := familyBand(c, f)
		if last := c.Priority + len(band) - 1; last > lastPriority {
			return nil, nil, fmt.Errorf("route.priority %d leaves no room for tungate's %d %s rules before the main table's rule at 32766 (they would end at %d)", c.Priority, len(band), f, last)
		}
		rules = append(rules, band...)
	}
	return routes, rules, nil
}

// labels of goto targets, resolved to priorities by familyBand.
const (
	labelEnd = -1
	labelSel = -2
)

// familyBand returns the rules of one family's band with priorities
// assigned (see plan).
func familyBand(c Config, f family) []rule {
	var rs []rule
	add := func(r rule) { r.Family = f; rs = append(rs, r) }

	for _, m := range c.marks() {
		add(rule{Action: actGoto, Goto: labelEnd, FWMark: m,
			Why: "tungate's own sockets skip the band (no loop)"})
	}
	for _, u := range c.ExcludeUIDs {
		add(rule{Action: actGoto, Goto: labelEnd, UIDs: &uidRange{u.From, u.To},
			Why: "route.exclude_uids: keeps the host's routing"})
	}
	if len(c.ExcludeCgroups) > 0 {
		add(rule{Action: actGoto, Goto: labelEnd, FWMark: CgroupExcludeMark,
			Why: "route.exclude_cgroups (marked by tungate's nftables table): keep the host's routing"})
	}
	if len(c.IncludeUIDs) > 0 || len(c.IncludeCgroups) > 0 {
		for _, u := range c.IncludeUIDs {
			add(rule{Action: actGoto, Goto: labelSel, UIDs: &uidRange{u.From, u.To},
				Why: "route.include_uids: selected"})
		}
		if len(c.IncludeCgroups) > 0 {
			add(rule{Action: actGoto, Goto: labelSel, FWMark: CgroupIncludeMark,
				Why: "route.include_cgroups (marked by tungate's nftables table): selected"})
		}
		add(rule{Action: actGoto, Goto: labelEnd,
			Why: "route.include_uids/include_cgroups: everything not selected keeps the host's routing"})
	}
	sel := len(rs)
	if c.Strict {
		for _, proto := range []string{"udp", "tcp"} {
			add(rule{Action: actLookup, Table: c.Table, IPProto: proto, DPort: 53,
				Why: "route.strict: DNS to any resolver goes through the TUN"})
		}
	}
	zero := 0
	add(rule{Action: actLookup, Table: tableMain, Suppress: &zero,
		Why: "main-table routes more specific than a default (LAN, link-local) win"})
	for _, p := range c.ExcludeAddresses {
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96) // ::ffff:a.b.c.d/n: IPv4
		}
		if p.Addr().Is4() != (f == 4) {
			continue
		}
		add(rule{Action: actGoto, Goto: labelEnd, To: p.Masked(),
			Why: "route.exclude_addresses: never enters the TUN"})
	}
	add(rule{Action: actLookup, Table: c.Table, Why: "everything else: tungate's table"})
	add(rule{Action: actNop, Why: "end of tungate's band"})

	end := c.Priority + len(rs) - 1
	for i := range rs {
		rs[i].Priority = c.Priority + i
		switch rs[i].Goto {
		case labelEnd:
			rs[i].Goto = end
		case labelSel:
			rs[i].Goto = c.Priority + sel
		}
	}
	return rs
}

// sweepBand returns the priorities [first, last] that a cleanup by tag
// searches for c: the widest band c could produce (both families, strict
// or not), so that it is found whatever the TUN's addresses were.
func sweepBand(c Config) (first, last int) {
	c.Strict = true
	n := max(len(familyBand(c, 4)), len(familyBand(c, 6)))
	return c.Priority, min(c.Priority+n-1, lastPriority)
}

// Band is tungate's rule band of one family for a configuration.
type Band struct {
	Family      int
	First, Last int
	// Rules is how many rules tungate installs there (0 when the
	// configuration cannot be planned; then First-Last is the widest band
	// any configuration with this route.priority could use).
	Rules int
}

// Bands returns the band of each family that c's auto-route uses (both
// families, the widest possible, when the plan fails), and the plan's
// error.
func (c *Config) Bands() ([]Band, error) {
	_, rules, err := plan(*c)
	if err != nil || len(rules) == 0 {
		first, last := sweepBand(*c)
		return []Band{{Family: 4, First: first, Last: last}, {Family: 6, First: first, Last: last}}, err
	}
	var out []Band
	for _, f := range []family{4, 6} {
		b := Band{Family: int(f), First: -1}
		for _, ru := range rules {
			if ru.Family != f {
				continue
			}
			if b.First < 0 || ru.Priority < b.First {
				b.First = ru.Priority
			}
			b.Last = max(b.Last, ru.Priority)
			b.Rules++
		}
		if b.Rules > 0 {
			out = append(out, b)
		}
	}
	return out, nil
}

// PlannedRoutes returns the routes c's auto-route puts in its table, as
// ListRoutes reports them (without Text): a route into the TUN is
// "unicast", route.strict's block "unreachable".
func (c *Config) PlannedRoutes() []HostRoute {
	routes, _, err := plan(*c)
	if err != nil {
		return nil
	}
	out := make([]HostRoute, len(routes))
	for i, r := range routes {
		typ := "unicast"
		if r.Type == rtUnreachable {
			typ = "unreachable"
		}
		out[i] = HostRoute{Family: int(r.Family), Table: r.Table, Dst: r.To, Type: typ, Dev: r.Dev, Proto: ProtoTungate}
	}
	return out
}
