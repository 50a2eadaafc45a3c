//go:build linux

package netmon

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// fakeKernel is a namespace's links and main table as netlink reports
// them, changed by fake events the way the kernel would change them.
type fakeKernel struct {
	links  []netlink.Link
	routes []netlink.Route
}

func (k *fakeKernel) addLink(index int, name string) {
	k.links = append(k.links, &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: index, Name: name, Flags: net.FlagUp}})
}

func (k *fakeKernel) linkIndex(name string) int {
	for _, l := range k.links {
		if l.Attrs().Name == name {
			return l.Attrs().Index
		}
	}
	panic("no link " + name)
}

// setDown is `ip link set NAME down`: IPv4 routes through it are flushed,
// IPv6 ones stay.
func (k *fakeKernel) setDown(name string) {
	ix := k.linkIndex(name)
	for _, l := range k.links {
		if l.Attrs().Index == ix {
			l.Attrs().Flags &^= net.FlagUp
		}
	}
	k.routes = slices.DeleteFunc(k.routes, func(r netlink.Route) bool { return r.LinkIndex == ix && r.Family == netlink.FAMILY_V4 })
}

// delLink is `ip link del NAME`: its routes go with it.
func (k *fakeKernel) delLink(name string) {
	ix := k.linkIndex(name)
	k.links = slices.DeleteFunc(k.links, func(l netlink.Link) bool { return l.Attrs().Index == ix })
	k.routes = slices.DeleteFunc(k.routes, func(r netlink.Route) bool { return r.LinkIndex == ix })
}

// replace is `ip route replace`: same destination and metric.
func (k *fakeKernel) replace(r netlink.Route) {
	k.routes = slices.DeleteFunc(k.routes, func(o netlink.Route) bool {
		return o.Family == r.Family && o.Dst.String() == r.Dst.String() && o.Priority == r.Priority
	})
	k.routes = append(k.routes, r)
}

func (k *fakeKernel) table() *table {
	var links []link
	for _, l := range k.links {
		links = append(links, linkOf(l))
	}
	var routes []route
	for _, r := range k.routes {
		if rt, ok := routeOf(r); ok {
			routes = append(routes, rt)
		}
	}
	return newTable(links, routes)
}

func ipnet(s string) *net.IPNet {
	p := netip.MustParsePrefix(s)
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func nlRoute(dst string, link, metric int) netlink.Route {
	fam := netlink.FAMILY_V4
	if netip.MustParsePrefix(dst).Addr().Is6() {
		fam = netlink.FAMILY_V6
	}
	return netlink.Route{Family: fam, Dst: ipnet(dst), LinkIndex: link, Priority: metric, Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST}
}

func TestRouteOf(t *testing.T) {
	def := nlRoute("0.0.0.0/0", 2, 100)
	def.Dst = nil // as older kernels and libraries give a default
	if r, ok := routeOf(def); !ok || r.dst != netip.MustParsePrefix("0.0.0.0/0") || !slices.Equal(r.links, []int{2}) {
		t.Errorf("routeOf(default, no Dst) = %+v, %v", r, ok)
	}
	mp := nlRoute("::/0", 0, 1024)
	mp.MultiPath = []*netlink.NexthopInfo{{LinkIndex: 3, Flags: unix.RTNH_F_DEAD}, {LinkIndex: 4}, {LinkIndex: 2}}
	if r, ok := routeOf(mp); !ok || !slices.Equal(r.links, []int{4, 2}) {
		t.Errorf("routeOf(multipath with a dead hop) = %+v, %v; want links [4 2]", r, ok)
	}
	unreach := nlRoute("0.0.0.0/0", 0, 0)
	unreach.Type = unix.RTN_UNREACHABLE
	if r, ok := routeOf(unreach); !ok || r.kind != kindBlock {
		t.Errorf("routeOf(unreachable) = %+v, %v", r, ok)
	}
	tos := nlRoute("0.0.0.0/0", 2, 0)
	tos.Tos = 0x10
	if _, ok := routeOf(tos); ok {
		t.Error("a TOS route was kept")
	}
	v4in6 := nlRoute("10.0.0.0/8", 2, 0)
	v4in6.Dst.IP = v4in6.Dst.IP.To16()
	if r, ok := routeOf(v4in6); !ok || r.dst != netip.MustParsePrefix("10.0.0.0/8") {
		t.Errorf("routeOf(16-byte IPv4 destination) = %+v, %v", r, ok)
	}
}

// TestFakeEvents feeds the Monitor the kernel's state after each of a
// series of link and route events, converted from netlink values as the
// watch loop converts them.
func TestFakeEvents(t *testing.T) {
	m := New(Config{Ignore: []string{"tungate0"}}, nil)
	var gone []Gone
	m.Subscribe(func(c Change) { gone = append(gone, c.Gone...) })
	k := &fakeKernel{}
	k.addLink(1, "lo")
	k.addLink(2, "eth0")
	k.addLink(3, "tungate0")
	k.routes = append(k.routes, nlRoute("10.0.0.0/24", 2, 0), nlRoute("0.0.0.0/0", 2, 0), nlRoute("fe80::/64", 2, 256))
	m.apply(k.table())
	want := func(what, v4, v6 string, wantGone ...Gone) {
		t.Helper()
		if got := m.State(); got != (State{Default4: v4, Default6: v6}) {
			t.Errorf("%s: state %+v, want v4 %q v6 %q", what, got, v4, v6)
		}
		if !slices.Equal(gone, wantGone) {
			t.Errorf("%s: gone %v, want %v", what, gone, wantGone)
		}
		gone = nil
	}
	want("start", "eth0", "")

	// tungate's own default into the TUN, in main (a manual setup).
	k.routes = append(k.routes, nlRoute("0.0.0.0/0", 3, 0), nlRoute("::/0", 3, 0))
	m.apply(k.table())
	want("TUN default added", "eth0", "")

	k.addLink(4, "wlan0")
	k.routes = append(k.routes, nlRoute("192.168.1.0/24", 4, 600), nlRoute("2001:db8::/64", 4, 600))
	k.replace(func() netlink.Route { r := nlRoute("0.0.0.0/0", 4, 0); r.Gw = net.IPv4(192, 168, 1, 1); return r }())
	k.routes = append(k.routes, nlRoute("::/0", 4, 1024))
	m.apply(k.table())
	want("default replaced by wlan0's", "wlan0", "wlan0")
	if got := m.InterfaceFor(netip.MustParseAddr("10.0.0.9")); got != "eth0" {
		t.Errorf("InterfaceFor(eth0's LAN) = %q, want eth0", got)
	}

	k.setDown("wlan0")
	m.apply(k.table())
	// IPv6 routes stay on a down link, and do not count.
	want("wlan0 down", "", "", Gone{"wlan0", false, ReasonDown}, Gone{"wlan0", true, ReasonDown})

	k.delLink("eth0")
	m.apply(k.table())
	want("eth0 deleted", "", "", Gone{"eth0", false, ReasonDeleted})
}
