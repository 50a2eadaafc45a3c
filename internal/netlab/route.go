//go:build linux

package netlab

import (
	"errors"
	"net"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RouteIntoTUN sends the namespace's traffic into the TUN device tun, in
// the namespace only, the way a gateway test needs it:
//
//	table <table>: default dev <tun> (IPv4 and IPv6)
//	pref <prio>:   not fwmark <mark> lookup <table>
//
// so that everything but tungate's own marked sockets enters the TUN. A rule
// that already exists is kept: rules outlive a restarted gateway's TUN,
// routes do not.
func (n *NS) RouteIntoTUN(t testing.TB, tun string, table int, mark uint32, prio int) {
	t.Helper()
	h := n.Netlink(t)
	link, err := h.LinkByName(tun)
	if err != nil {
		t.Fatalf("netlab: LinkByName(%s): %v", tun, err)
	}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		dst := &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}
		if family == unix.AF_INET6 {
			dst = &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		}
		if err := h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: dst, Table: table, Family: family}); err != nil {
			t.Fatalf("netlab: RouteAdd(default dev %s table %d, family %d): %v", tun, table, family, err)
		}
		rule := netlink.NewRule()
		rule.Family = family
		rule.Mark = mark
		rule.Invert = true
		rule.Table = table
		rule.Priority = prio
		if err := h.RuleAdd(rule); err != nil && !errors.Is(err, unix.EEXIST) {
			t.Fatalf("netlab: RuleAdd(not fwmark %#x table %d, family %d): %v", mark, table, family, err)
		}
	}
}
