package netmon

import (
	"cmp"
	"net/netip"
	"slices"
)

// This file is the Monitor's decision logic, free of any OS: a table is
// what the kernel said (links and the main table's routes), and everything
// the Monitor reports is computed from two tables, the last and the one
// before.

// link is one network interface.
type link struct {
	index int
	name  string
	up    bool // administratively up (IFF_UP)
}

// routeKind is what a route does with the packets it matches.
type routeKind uint8

const (
	// kindUnicast sends them out of its links.
	kindUnicast routeKind = iota
	// kindBlock ends the lookup without a way out: unreachable,
	// blackhole, prohibit, throw and anything else not unicast.
	kindBlock
)

// route is one main-table route.
type route struct {
	dst    netip.Prefix // masked; the family is dst's
	metric int
	kind   routeKind
	links  []int // interface indexes of its usable next hops, in order
}

// table is the namespace's links and main-table routes at one moment.
// It is never changed once built.
type table struct {
	links map[int]link
	// routes per family (0: IPv4, 1: IPv6), longest prefix first, then
	// lowest metric, then in the kernel's order.
	routes [2][]route
}

func famIndex(v6 bool) int {
	if v6 {
		return 1
	}
	return 0
}

// newTable builds a table from what the kernel listed. Routes that can
// never match a flow of tungate's (a TOS of their own, a non-IP family)
// are for the caller to leave out.
func newTable(links []link, routes []route) *table {
	t := &table{links: make(map[int]link, len(links))}
	for _, l := range links {
		t.links[l.index] = l
	}
	for _, r := range routes {
		if !r.dst.IsValid() {
			continue
		}
		r.dst = r.dst.Masked()
		f := famIndex(r.dst.Addr().Is6())
		t.routes[f] = append(t.routes[f], r)
	}
	for f := range t.routes {
		slices.SortStableFunc(t.routes[f], func(a, b route) int {
			if c := cmp.Compare(b.dst.Bits(), a.dst.Bits()); c != 0 {
				return c
			}
			return cmp.Compare(a.metric, b.metric)
		})
	}
	return t
}

// out returns the interface a unicast route sends out of: its first next
// hop whose link is up and not ignored; "" when there is none.
func (t *table) out(r route, ignore map[string]bool) string {
	for _, i := range r.links {
		l, ok := t.links[i]
		if ok && l.up && !ignore[l.name] {
			return l.name
		}
	}
	return ""
}

// pick returns the interface of the first route (in lookup order) that
// match accepts and that has a way out. Routes through ignored or down
// interfaces are passed over as if absent; a blocking route ends the
// search with "", as it ends the kernel's lookup.
func (t *table) pick(v6 bool, ignore map[string]bool, match func(netip.Prefix) bool) string {
	if t == nil {
		return ""
	}
	for _, r := range t.routes[famIndex(v6)] {
		if !match(r.dst) {
			continue
		}
		if r.kind != kindUnicast {
			return ""
		}
		if name := t.out(r, ignore); name != "" {
			return name
		}
	}
	return ""
}

// defaultIface returns the interface of the family's default route.
func (t *table) defaultIface(v6 bool, ignore map[string]bool) string {
	return t.pick(v6, ignore, func(p netip.Prefix) bool { return p.Bits() == 0 })
}

// lookup returns the interface the main table sends dst out of (the
// longest matching prefix, then the lowest metric).
func (t *table) lookup(dst netip.Addr, ignore map[string]bool) string {
	dst = dst.Unmap()
	if !dst.IsValid() {
		return ""
	}
	return t.pick(dst.Is6(), ignore, func(p netip.Prefix) bool { return p.Contains(dst) })
}

var (
	linkLocal4 = netip.MustParsePrefix("169.254.0.0/16")
	linkLocal6 = netip.MustParsePrefix("fe80::/10")
)

// isLinkLocal reports whether p lies inside a link-local range.
func isLinkLocal(p netip.Prefix) bool {
	for _, ll := range []netip.Prefix{linkLocal4, linkLocal6} {
		if p.Bits() >= ll.Bits() && ll.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// carriers returns the indexes of the links that can carry the family:
// up, not ignored, and the way out of at least one unicast route that is
// not link-local. (Every up link has an fe80::/64 route, and many a
// 169.254.0.0/16 one, configured or not.)
func (t *table) carriers(v6 bool, ignore map[string]bool) map[int]bool {
	c := make(map[int]bool)
	if t == nil {
		return c
	}
	for _, r := range t.routes[famIndex(v6)] {
		if r.kind != kindUnicast || isLinkLocal(r.dst) {
			continue
		}
		for _, i := range r.links {
			if l, ok := t.links[i]; ok && l.up && !ignore[l.name] {
				c[i] = true
			}
		}
	}
	return c
}

// State is what the Monitor knows of the default route.
type State struct {
	// Default4 and Default6 name the interface of the main table's
	// default route for IPv4 and IPv6; "" when there is none (or it is
	// unreachable, or only through ignored interfaces).
	Default4, Default6 string
}

// Default returns Default6 when v6, else Default4.
func (s State) Default(v6 bool) string {
	if v6 {
		return s.Default6
	}
	return s.Default4
}

func (t *table) state(ignore map[string]bool) State {
	return State{Default4: t.defaultIface(false, ignore), Default6: t.defaultIface(true, ignore)}
}

// Why an interface is Gone (see the package documentation).
const (
	ReasonDeleted  = "deleted"
	ReasonDown     = "down"
	ReasonUnrouted = "unrouted"
)

// Gone is an interface that carried a family and can no longer.
type Gone struct {
	// Interface is the name the interface had while it carried the
	// family.
	Interface string
	V6        bool
	// Reason is ReasonDeleted, ReasonDown or ReasonUnrouted.
	Reason string
}

// Change is what changed between two readings of the kernel's state.
type Change struct {
	Old, New State
	// Gone lists the interfaces that stopped carrying a family, IPv4
	// before IPv6, by interface index.
	Gone []Gone
}

// gone compares two tables: the links, per family, that carried it in old
// and do not in new.
func gone(old, new *table, oldIgnore, newIgnore map[string]bool) []Gone {
	var out []Gone
	for _, v6 := range []bool{false, true} {
		before := old.carriers(v6, oldIgnore)
		after := new.carriers(v6, newIgnore)
		idx := make([]int, 0, len(before))
		for i := range before {
			if !after[i] {
				idx = append(idx, i)
			}
		}
		slices.Sort(idx)
		for _, i := range idx {
			name := old.links[i].name
			reason := ReasonUnrouted
			switch l, ok := new.links[i]; {
			case !ok:
				reason = ReasonDeleted
			case !l.up:
				reason = ReasonDown
			case newIgnore[l.name]:
				// Ignored from now on (the TUN adopted by name late):
				// not ours to report.
				continue
			}
			out = append(out, Gone{Interface: name, V6: v6, Reason: reason})
		}
	}
	return out
}
