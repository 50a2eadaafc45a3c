package netmon

import (
	"net/netip"
	"slices"
	"testing"
)

// Interface indexes of the links in the tests' tables.
const (
	ixLo = iota + 1
	ixEth0
	ixWlan0
	ixTun
	ixEth1
)

func testLinks(down ...string) []link {
	ls := []link{
		{ixLo, "lo", true}, {ixEth0, "eth0", true}, {ixWlan0, "wlan0", true},
		{ixTun, "tungate0", true}, {ixEth1, "eth1", true},
	}
	for i := range ls {
		if slices.Contains(down, ls[i].name) {
			ls[i].up = false
		}
	}
	return ls
}

func rt(dst string, metric int, links ...int) route {
	return route{dst: netip.MustParsePrefix(dst), metric: metric, links: links}
}

func blocked(dst string, metric int) route {
	return route{dst: netip.MustParsePrefix(dst), metric: metric, kind: kindBlock}
}

var ignoreTun = map[string]bool{"tungate0": true}

func TestDefaultIface(t *testing.T) {
	for _, tc := range []struct {
		name   string
		down   []string
		routes []route
		v4, v6 string
	}{
		{name: "no routes"},
		{name: "one default each",
			routes: []route{rt("0.0.0.0/0", 100, ixEth0), rt("::/0", 1024, ixWlan0)},
			v4:     "eth0", v6: "wlan0"},
		{name: "lowest metric wins",
			routes: []route{rt("0.0.0.0/0", 600, ixWlan0), rt("0.0.0.0/0", 100, ixEth0)},
			v4:     "eth0"},
		{name: "a down link is passed over",
			down:   []string{"eth0"},
			routes: []route{rt("0.0.0.0/0", 100, ixEth0), rt("0.0.0.0/0", 600, ixWlan0)},
			v4:     "wlan0"},
		{name: "the TUN's default is as if absent",
			routes: []route{rt("0.0.0.0/0", 0, ixTun), rt("0.0.0.0/0", 100, ixEth0), rt("::/0", 0, ixTun)},
			v4:     "eth0"},
		{name: "an unreachable default with a lower metric ends the lookup",
			routes: []route{blocked("0.0.0.0/0", 0), rt("0.0.0.0/0", 100, ixEth0)},
			v4:     ""},
		{name: "an unreachable default with a higher metric does not",
			routes: []route{blocked("0.0.0.0/0", 200), rt("0.0.0.0/0", 100, ixEth0)},
			v4:     "eth0"},
		{name: "multipath: the first usable next hop",
			routes: []route{rt("0.0.0.0/0", 0, ixTun, ixEth1, ixEth0)},
			v4:     "eth1"},
		{name: "a route to an unknown link is passed over",
			routes: []route{rt("0.0.0.0/0", 0, 99), rt("0.0.0.0/0", 5, ixEth0)},
			v4:     "eth0"},
		{name: "specific routes are not defaults",
			routes: []route{rt("192.168.1.0/24", 0, ixEth1), rt("fe80::/64", 256, ixEth0)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab := newTable(testLinks(tc.down...), tc.routes)
			if got := tab.defaultIface(false, ignoreTun); got != tc.v4 {
				t.Errorf("defaultIface(IPv4) = %q, want %q", got, tc.v4)
			}
			if got := tab.defaultIface(true, ignoreTun); got != tc.v6 {
				t.Errorf("defaultIface(IPv6) = %q, want %q", got, tc.v6)
			}
		})
	}
	var none *table
	if got := none.defaultIface(false, nil); got != "" {
		t.Errorf("nil table: defaultIface = %q", got)
	}
}

func TestLookup(t *testing.T) {
	tab := newTable(testLinks(), []route{
		rt("0.0.0.0/0", 100, ixEth0),
		rt("192.168.1.0/24", 0, ixEth1),
		rt("10.0.0.0/8", 0, ixEth1),
		rt("10.1.0.0/16", 0, ixTun), // into the TUN: as if absent
		blocked("10.9.0.0/16", 0),
		rt("::/0", 1024, ixWlan0),
		rt("fd00:1::/64", 256, ixEth1),
	})
	for _, tc := range []struct{ dst, want string }{
		{"8.8.8.8", "eth0"},
		{"192.168.1.5", "eth1"},
		{"10.1.2.3", "eth1"},
		{"10.200.0.1", "eth1"},
		{"10.9.0.1", ""},
		{"::ffff:192.168.1.5", "eth1"},
		{"2001:db8::1", "wlan0"},
		{"fd00:1::7", "eth1"},
	} {
		if got := tab.lookup(netip.MustParseAddr(tc.dst), ignoreTun); got != tc.want {
			t.Errorf("lookup(%s) = %q, want %q", tc.dst, got, tc.want)
		}
	}
	if got := tab.lookup(netip.Addr{}, ignoreTun); got != "" {
		t.Errorf("lookup(invalid) = %q", got)
	}
}

func TestGone(t *testing.T) {
	// A dual-stack eth0 with the defaults, a LAN on eth1, the TUN.
	base := []route{
		rt("0.0.0.0/0", 100, ixEth0), rt("192.168.0.0/24", 100, ixEth0),
		rt("::/0", 1024, ixEth0), rt("2001:db8::/64", 256, ixEth0), rt("fe80::/64", 256, ixEth0),
		rt("10.0.0.0/24", 0, ixEth1), rt("fe80::/64", 256, ixEth1),
		rt("172.19.0.0/30", 0, ixTun),
	}
	without := func(drop func(route) bool) []route {
		return slices.DeleteFunc(slices.Clone(base), drop)
	}
	via := func(ix int) func(route) bool {
		return func(r route) bool { return slices.Contains(r.links, ix) }
	}
	linksWithout := func(name string) []link {
		return slices.DeleteFunc(testLinks(), func(l link) bool { return l.name == name })
	}
	for _, tc := range []struct {
		name      string
		links     []link
		routes    []route
		newIgnore map[string]bool
		want      []Gone
	}{
		{name: "nothing changed", links: testLinks(), routes: base},
		{name: "link deleted: both families",
			links: linksWithout("eth0"), routes: without(via(ixEth0)),
			want: []Gone{{"eth0", false, ReasonDeleted}, {"eth0", true, ReasonDeleted}}},
		{name: "link set down (its routes flushed or not)",
			links: testLinks("eth1"), routes: base,
			want: []Gone{{"eth1", false, ReasonDown}}},
		{name: "IPv6 deconfigured, link-local left: IPv6 only",
			links: testLinks(), routes: without(func(r route) bool {
				return r.dst.Addr().Is6() && !isLinkLocal(r.dst) && slices.Contains(r.links, ixEth0)
			}),
			want: []Gone{{"eth0", true, ReasonUnrouted}}},
		{name: "default moved away, LAN route kept: not gone",
			links: testLinks(), routes: append(without(func(r route) bool { return r.dst.Bits() == 0 && r.dst.Addr().Is4() }),
				rt("0.0.0.0/0", 100, ixEth1)),
		},
		{name: "default moved away and nothing left: gone",
			links: testLinks(), routes: append(without(func(r route) bool { return r.dst.Addr().Is4() && slices.Contains(r.links, ixEth0) }),
				rt("0.0.0.0/0", 100, ixEth1)),
			want: []Gone{{"eth0", false, ReasonUnrouted}}},
		{name: "renamed: the same link",
			links: func() []link {
				ls := testLinks()
				ls[ixEth1-1].name = "lan0"
				return ls
			}(), routes: base},
		{name: "the TUN is never reported",
			links: linksWithout("tungate0"), routes: without(via(ixTun))},
		{name: "a link ignored from now on is not reported",
			links: testLinks(), routes: base, newIgnore: map[string]bool{"tungate0": true, "eth1": true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			newIgnore := tc.newIgnore
			if newIgnore == nil {
				newIgnore = ignoreTun
			}
			got := gone(newTable(testLinks(), base), newTable(tc.links, tc.routes), ignoreTun, newIgnore)
			if !slices.Equal(got, tc.want) {
				t.Errorf("gone = %v, want %v", got, tc.want)
			}
		})
	}
}
