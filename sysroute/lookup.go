package sysroute

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Reading the kernel's routing: its rules and routes as `ip rule` and `ip
// route` show them (DumpRules, ListRoutes) and its answer to a route lookup
// (RouteLookup), for `tungate doctor`. Nothing here changes anything.

// HostRule is one ip rule.
type HostRule struct {
	Family   int // 4 or 6
	Priority int
	Proto    uint8
	// Text is the rule as `ip rule` shows it.
	Text string
}

// HostRoute is one route.
type HostRoute struct {
	Family int
	Table  int
	Dst    netip.Prefix
	Type   string // "unicast", "unreachable", "blackhole"…
	Dev    string
	Proto  uint8
	// Text is the route as `ip route` shows it.
	Text string
}

// RouteDst renders a route's destination as `ip route` does: "default"
// or the prefix.
func RouteDst(rt HostRoute) string {
	if rt.Dst.IsValid() && rt.Dst.Bits() == 0 {
		return "default"
	}
	if rt.Dst.IsValid() {
		return rt.Dst.String()
	}
	return "…"
}

// ProtoName names a rule's or route's protocol the way `ip` does, and
// tungate's tag as "tungate".
func ProtoName(p uint8) string {
	switch p {
	case ProtoTungate:
		return "tungate"
	case 0:
		return "unspec"
	case 1:
		return "redirect"
	case 2:
		return "kernel"
	case 3:
		return "boot"
	case 4:
		return "static"
	case 16:
		return "dhcp"
	case 9:
		return "ra"
	}
	return strconv.Itoa(int(p))
}

// TableName names a routing table: "main", "local", "default", or its
// number.
func TableName(t int) string {
	switch t {
	case 253:
		return "default"
	case tableMain:
		return "main"
	case 255:
		return "local"
	}
	return strconv.Itoa(t)
}

// RouteQuery is a route lookup as the kernel makes it for a packet.
type RouteQuery struct {
	Dst netip.Addr
	// Proto ("tcp", "udp" or "") and DPort make rules on ipproto and
	// dport apply.
	Proto string
	DPort uint16
	// Mark is the packet's fwmark; Oif the interface its socket is bound
	// to ("" = none); UID the owner's uid (nil: the caller's).
	Mark uint32
	Oif  string
	UID  *uint32
}

// RouteAnswer is the kernel's answer to a RouteQuery.
type RouteAnswer struct {
	Table   int
	Type    string
	Dev     string
	Gateway netip.Addr
	Src     netip.Addr
	// Err is the kernel's refusal (network unreachable…).
	Err error
}

// String renders a like `ip route get` does, with the table named.
func (a RouteAnswer) String() string {
	if a.Err != nil {
		return a.Err.Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "table %s", TableName(a.Table))
	if a.Type != "" && a.Type != "unicast" {
		fmt.Fprintf(&b, " %s", a.Type)
	}
	if a.Gateway.IsValid() {
		fmt.Fprintf(&b, " via %s", a.Gateway)
	}
	if a.Dev != "" {
		fmt.Fprintf(&b, " dev %s", a.Dev)
	}
	if a.Src.IsValid() {
		fmt.Fprintf(&b, " src %s", a.Src)
	}
	return b.String()
}
