package sysroute

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// DumpRules lists the ip rules of family fam (4 or 6) with everything `ip
// rule` shows (the netlink library leaves out a rule's action), in the
// calling thread's network namespace.
func DumpRules(fam int) ([]HostRule, error) {
	f := family(fam)
	req := nl.NewNetlinkRequest(unix.RTM_GETRULE, unix.NLM_F_DUMP|unix.NLM_F_REQUEST)
	req.AddData(nl.NewIfInfomsg(afOf(f)))
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWRULE)
	if err != nil {
		return nil, err
	}
	var out []HostRule
	for _, m := range msgs {
		rt := nl.DeserializeRtMsg(m)
		attrs, err := nl.ParseRouteAttr(m[rt.Len():])
		if err != nil {
			return nil, err
		}
		out = append(out, formatRule(f, rt, attrs))
	}
	slices.SortStableFunc(out, func(a, b HostRule) int { return a.Priority - b.Priority })
	return out, nil
}

func u32(b []byte) uint32 {
	if len(b) < 4 {
		return 0
	}
	return binary.NativeEndian.Uint32(b)
}

func ipString(b []byte, bits uint8) string {
	a, ok := netip.AddrFromSlice(b)
	if !ok {
		return "?"
	}
	if int(bits) == a.BitLen() {
		return a.String()
	}
	return netip.PrefixFrom(a, int(bits)).String()
}

// formatRule renders a rule as `ip rule` does.
func formatRule(f family, rt *nl.RtMsg, attrs []syscall.NetlinkRouteAttr) HostRule {
	r := HostRule{Family: int(f)}
	var (
		from, to, mark, mask, iif, oif, uids, ipproto, sport, dport string
		table                                                       = int(rt.Table)
		gotoPrio                                                    = -1
		suppress                                                    = -1
	)
	from = "all"
	for _, a := range attrs {
		v := a.Value
		switch a.Attr.Type {
		case unix.FRA_PRIORITY:
			r.Priority = int(u32(v))
		case unix.FRA_SRC:
			from = ipString(v, rt.Src_len)
		case unix.FRA_DST:
			to = ipString(v, rt.Dst_len)
		case unix.FRA_FWMARK:
			mark = fmt.Sprintf("%#x", u32(v))
		case unix.FRA_FWMASK:
			if m := u32(v); m != 0xffffffff {
				mask = fmt.Sprintf("/%#x", m)
			}
		case unix.FRA_IIFNAME:
			iif = string(bytes.TrimRight(v, "\x00"))
		case unix.FRA_OIFNAME:
			oif = string(bytes.TrimRight(v, "\x00"))
		case unix.FRA_TABLE:
			table = int(u32(v))
		case unix.FRA_GOTO:
			gotoPrio = int(u32(v))
		case unix.FRA_SUPPRESS_PREFIXLEN:
			if s := u32(v); s != 0xffffffff {
				suppress = int(s)
			}
		case unix.FRA_UID_RANGE:
			if len(v) >= 8 {
				uids = fmt.Sprintf("%d-%d", u32(v[0:4]), u32(v[4:8]))
			}
		case unix.FRA_PROTOCOL:
			if len(v) > 0 {
				r.Proto = v[0]
			}
		case unix.FRA_IP_PROTO:
			if len(v) > 0 {
				switch v[0] {
				case unix.IPPROTO_TCP:
					ipproto = "tcp"
				case unix.IPPROTO_UDP:
					ipproto = "udp"
				case unix.IPPROTO_ICMP:
					ipproto = "icmp"
				default:
					ipproto = strconv.Itoa(int(v[0]))
				}
			}
		case unix.FRA_SPORT_RANGE, unix.FRA_DPORT_RANGE:
			if len(v) >= 4 {
				lo, hi := binary.NativeEndian.Uint16(v[0:2]), binary.NativeEndian.Uint16(v[2:4])
				s := strconv.Itoa(int(lo))
				if hi != lo {
					s += "-" + strconv.Itoa(int(hi))
				}
				if a.Attr.Type == unix.FRA_SPORT_RANGE {
					sport = s
				} else {
					dport = s
				}
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%d: ", r.Priority)
	if rt.Flags&unix.FIB_RULE_INVERT != 0 {
		b.WriteString("not ")
	}
	fmt.Fprintf(&b, "from %s", from)
	for _, kv := range [][2]string{{"to", to}, {"fwmark", mark + mask}, {"iif", iif}, {"oif", oif},
		{"uidrange", uids}, {"ipproto", ipproto}, {"sport", sport}, {"dport", dport}} {
		if kv[1] != "" {
			fmt.Fprintf(&b, " %s %s", kv[0], kv[1])
		}
	}
	switch rt.Type {
	case unix.FR_ACT_TO_TBL:
		fmt.Fprintf(&b, " lookup %s", TableName(table))
		if suppress >= 0 {
			fmt.Fprintf(&b, " suppress_prefixlength %d", suppress)
		}
	case unix.FR_ACT_GOTO:
		fmt.Fprintf(&b, " goto %d", gotoPrio)
	case unix.FR_ACT_NOP:
		b.WriteString(" nop")
	case unix.FR_ACT_BLACKHOLE:
		b.WriteString(" blackhole")
	case unix.FR_ACT_UNREACHABLE:
		b.WriteString(" unreachable")
	case unix.FR_ACT_PROHIBIT:
		b.WriteString(" prohibit")
	default:
		fmt.Fprintf(&b, " action %d", rt.Type)
	}
	if r.Proto != 0 {
		fmt.Fprintf(&b, " proto %s", ProtoName(r.Proto))
	}
	r.Text = b.String()
	return r
}

var routeTypes = map[int]string{
	unix.RTN_UNICAST: "unicast", unix.RTN_LOCAL: "local", unix.RTN_BROADCAST: "broadcast",
	unix.RTN_ANYCAST: "anycast", unix.RTN_MULTICAST: "multicast", unix.RTN_BLACKHOLE: "blackhole",
	unix.RTN_UNREACHABLE: "unreachable", unix.RTN_PROHIBIT: "prohibit", unix.RTN_THROW: "throw",
}

func routeTypeName(t int) string {
	if n, ok := routeTypes[t]; ok {
		return n
	}
	return "type-" + strconv.Itoa(t)
}

// ListRoutes lists the routes of one table of family fam (4 or 6)
// through h; names are the interfaces' names by index.
func ListRoutes(h *netlink.Handle, fam, table int, names map[int]string) ([]HostRoute, error) {
	f := family(fam)
	list, err := h.RouteListFiltered(afOf(f), &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, err
	}
	out := make([]HostRoute, 0, len(list))
	for _, nr := range list {
		rt := HostRoute{Family: int(f), Table: nr.Table, Dst: defaultPrefix(f), Type: routeTypeName(nr.Type), Proto: uint8(nr.Protocol)}
		if nr.Dst != nil {
			if p, ok := PrefixOf(nr.Dst); ok {
				rt.Dst = p
			}
		}
		gw, dev := nr.Gw, names[nr.LinkIndex]
		if len(nr.MultiPath) > 0 {
			gw, dev = nr.MultiPath[0].Gw, names[nr.MultiPath[0].LinkIndex]
		}
		rt.Dev = dev
		var b strings.Builder
		if rt.Type != "unicast" {
			b.WriteString(rt.Type + " ")
		}
		b.WriteString(RouteDst(rt))
		if gw != nil {
			fmt.Fprintf(&b, " via %s", gw)
		}
		if dev != "" {
			fmt.Fprintf(&b, " dev %s", dev)
		}
		if len(nr.MultiPath) > 1 {
			fmt.Fprintf(&b, " (and %d more next hops)", len(nr.MultiPath)-1)
		}
		fmt.Fprintf(&b, " table %s proto %s", TableName(nr.Table), ProtoName(rt.Proto))
		if nr.Priority > 0 {
			fmt.Fprintf(&b, " metric %d", nr.Priority)
		}
		rt.Text = b.String()
		out = append(out, rt)
	}
	return out, nil
}

// RouteLookup asks the kernel how it routes a packet (`ip route get`
// with mark, uid, oif, ipproto and dport), in the calling thread's network
// namespace.
func RouteLookup(q RouteQuery) RouteAnswer {
	dst := q.Dst.Unmap()
	f := family(4)
	if dst.Is6() {
		f = 6
	}
	req := nl.NewNetlinkRequest(unix.RTM_GETROUTE, unix.NLM_F_REQUEST)
	msg := &nl.RtMsg{}
	msg.Family = uint8(afOf(f))
	msg.Dst_len = uint8(dst.BitLen())
	msg.Flags = unix.RTM_F_LOOKUP_TABLE
	req.AddData(msg)
	req.AddData(nl.NewRtAttr(unix.RTA_DST, dst.AsSlice()))
	u32attr := func(t int, v uint32) {
		b := make([]byte, 4)
		binary.NativeEndian.PutUint32(b, v)
		req.AddData(nl.NewRtAttr(t, b))
	}
	if q.Oif != "" {
		ifi, err := net.InterfaceByName(q.Oif)
		if err != nil {
			return RouteAnswer{Err: fmt.Errorf("interface %s: %w", q.Oif, err)}
		}
		u32attr(unix.RTA_OIF, uint32(ifi.Index))
	}
	if q.UID != nil {
		u32attr(unix.RTA_UID, *q.UID)
	}
	if q.Mark != 0 {
		u32attr(unix.RTA_MARK, q.Mark)
	}
	switch q.Proto {
	case "tcp":
		req.AddData(nl.NewRtAttr(unix.RTA_IP_PROTO, []byte{unix.IPPROTO_TCP}))
	case "udp":
		req.AddData(nl.NewRtAttr(unix.RTA_IP_PROTO, []byte{unix.IPPROTO_UDP}))
	}
	if q.Proto != "" && q.DPort != 0 {
		req.AddData(nl.NewRtAttr(unix.RTA_DPORT, binary.BigEndian.AppendUint16(nil, q.DPort)))
	}
	msgs, err := req.Execute(unix.NETLINK_ROUTE, unix.RTM_NEWROUTE)
	if err != nil {
		var errno unix.Errno
		if errors.As(err, &errno) {
			return RouteAnswer{Err: fmt.Errorf("the kernel refuses it: %w", errno)}
		}
		return RouteAnswer{Err: err}
	}
	if len(msgs) == 0 {
		return RouteAnswer{Err: errors.New("no answer from the kernel")}
	}
	m := msgs[0]
	rt := nl.DeserializeRtMsg(m)
	attrs, err := nl.ParseRouteAttr(m[rt.Len():])
	if err != nil {
		return RouteAnswer{Err: err}
	}
	a := RouteAnswer{Table: int(rt.Table), Type: routeTypeName(int(rt.Type))}
	for _, at := range attrs {
		switch at.Attr.Type {
		case unix.RTA_TABLE:
			a.Table = int(u32(at.Value))
		case unix.RTA_OIF:
			if ifi, err := net.InterfaceByIndex(int(u32(at.Value))); err == nil {
				a.Dev = ifi.Name
			}
		case unix.RTA_GATEWAY:
			a.Gateway, _ = netip.AddrFromSlice(at.Value)
		case unix.RTA_PREFSRC:
			a.Src, _ = netip.AddrFromSlice(at.Value)
		}
	}
	return a
}
