package sysroute

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netlinkTimeout bounds every netlink request: a reply that never comes
// fails the call instead of hanging start or shutdown.
const netlinkTimeout = 10 * time.Second

// netlinkKernel is the kernel interface over rtnetlink (and nftables for
// the cgroup marks), bound to one network namespace for its whole life.
type netlinkKernel struct {
	h      *netlink.Handle
	ns     string
	nsPath string // "" = the calling thread's namespace
	once   sync.Once

	nftMu  sync.Mutex
	nft    *nftables.Conn // see nftConn
	nsFile *os.File
}

// newNetlinkKernel opens a netlink handle in the namespace at nsPath ("" =
// the calling thread's).
func newNetlinkKernel(nsPath string) (*netlinkKernel, error) {
	var (
		h   *netlink.Handle
		err error
		id  string
	)
	if nsPath == "" {
		// The handle's socket belongs to the namespace of the thread that
		// creates it; name that namespace from the same thread.
		id, err = nsIdentity("/proc/thread-self/ns/net")
		if err == nil {
			h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		}
	} else {
		var ns netns.NsHandle
		if ns, err = netns.GetFromPath(nsPath); err == nil {
			id, err = nsIdentity(nsPath)
			if err == nil {
				h, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
			}
			ns.Close()
		}
	}
	if err != nil {
		return nil, fmt.Errorf("auto-route: netlink: %w", err)
	}
	if err := h.SetSocketTimeout(netlinkTimeout); err != nil {
		h.Close()
		return nil, fmt.Errorf("auto-route: netlink: %w", err)
	}
	return &netlinkKernel{h: h, ns: id, nsPath: nsPath}, nil
}

// nsIdentity names a network namespace by its nsfs device and inode.
func nsIdentity(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", fmt.Errorf("network namespace %s: %w", path, err)
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino), nil
}

func (k *netlinkKernel) NetNS() string { return k.ns }

func (k *netlinkKernel) Close() error {
	k.once.Do(func() {
		k.h.Close()
		k.closeNFT()
	})
	return nil
}

func afOf(f family) int {
	if f == 4 {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func (k *netlinkKernel) nlRoute(r route, forDelete bool) (*netlink.Route, error) {
	nr := &netlink.Route{
		Family:   afOf(r.Family),
		Table:    r.Table,
		Dst:      ipNet(r.To),
		Protocol: ProtoTungate,
	}
	switch r.Type {
	case rtUnreachable:
		nr.Type = unix.RTN_UNREACHABLE
	case rtDev:
		nr.Type = unix.RTN_UNICAST
		nr.Scope = netlink.SCOPE_LINK // as `ip route add default dev X`
		if !forDelete {
			link, err := k.h.LinkByName(r.Dev)
			if err != nil {
				return nil, fmt.Errorf("link %s: %w", r.Dev, err)
			}
			nr.LinkIndex = link.Attrs().Index
		}
	default:
		return nil, fmt.Errorf("unknown route type %q", r.Type)
	}
	if forDelete {
		// Match whatever scope and device it has (the device may be gone
		// and its index reused): table, destination, type and tungate's
		// protocol are what identify it.
		nr.Scope = netlink.SCOPE_NOWHERE
	}
	return nr, nil
}

func (k *netlinkKernel) AddRoute(r route) error {
	nr, err := k.nlRoute(r, false)
	if err != nil {
		return err
	}
	return k.h.RouteAdd(nr)
}

func (k *netlinkKernel) DelRoute(r route) error {
	nr, err := k.nlRoute(r, true)
	if err != nil {
		return err
	}
	return notFound(k.h.RouteDel(nr))
}

func (k *netlinkKernel) Routes(f family, table int) ([]route, error) {
	list, err := k.h.RouteListFiltered(afOf(f), &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, err
	}
	out := make([]route, 0, len(list))
	for _, nr := range list {
		r := route{Family: f, Table: nr.Table, To: defaultPrefix(f), Proto: uint8(nr.Protocol), Type: rtDev}
		if nr.Dst != nil {
			if p, ok := PrefixOf(nr.Dst); ok {
				r.To = p
			}
		}
		switch nr.Type {
		case unix.RTN_UNREACHABLE:
			r.Type = rtUnreachable
		case unix.RTN_UNICAST:
			if link, err := k.h.LinkByIndex(nr.LinkIndex); err == nil {
				r.Dev = link.Attrs().Name
			}
		default:
			r.Type = routeType(fmt.Sprintf("type-%d", nr.Type))
		}
		out = append(out, r)
	}
	return out, nil
}

// PrefixOf converts a netlink address or route destination to a prefix
// (an IPv4 one as IPv4, not IPv4-mapped).
func PrefixOf(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	if a.Is4In6() && len(n.Mask) == net.IPv4len {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, ones), true
}

func (k *netlinkKernel) nlRule(r rule) *netlink.Rule {
	nr := netlink.NewRule()
	nr.Family = afOf(r.Family)
	nr.Priority = r.Priority
	nr.Protocol = ProtoTungate
	switch r.Action {
	case actLookup:
		nr.Table = r.Table
		if r.Suppress != nil {
			nr.SuppressPrefixlen = *r.Suppress
		}
	case actGoto:
		nr.Goto = r.Goto
	case actNop:
		nr.Type = unix.FR_ACT_NOP
	}
	nr.Mark = r.FWMark
	if r.UIDs != nil {
		nr.UIDRange = netlink.NewRuleUIDRange(r.UIDs.From, r.UIDs.To)
	}
	switch r.IPProto {
	case "tcp":
		nr.IPProto = unix.IPPROTO_TCP
	case "udp":
		nr.IPProto = unix.IPPROTO_UDP
	}
	if r.DPort != 0 {
		nr.Dport = netlink.NewRulePortRange(r.DPort, r.DPort)
	}
	if r.To.IsValid() {
		nr.Dst = ipNet(r.To)
	}
	return nr
}

func (k *netlinkKernel) AddRule(r rule) error {
	return k.h.RuleAdd(k.nlRule(r))
}

func (k *netlinkKernel) DelRule(r rule) error {
	return notFound(k.h.RuleDel(k.nlRule(r)))
}

func (k *netlinkKernel) Rules(f family) ([]rule, error) {
	list, err := k.h.RuleList(afOf(f))
	if err != nil {
		return nil, err
	}
	out := make([]rule, 0, len(list))
	for _, nr := range list {
		r := rule{Family: f, Priority: nr.Priority, Proto: nr.Protocol, FWMark: nr.Mark}
		switch {
		case nr.Goto >= 0:
			r.Action, r.Goto = actGoto, nr.Goto
		case nr.Table == 0:
			// Every lookup rule has a table; the library does not
			// report the action, so a tableless, gotoless rule is
			// taken for a nop (tungate's only such rule).
			r.Action = actNop
		default:
			r.Action, r.Table = actLookup, nr.Table
		}
		if nr.SuppressPrefixlen >= 0 {
			s := nr.SuppressPrefixlen
			r.Suppress = &s
		}
		if nr.UIDRange != nil {
			r.UIDs = &uidRange{nr.UIDRange.Start, nr.UIDRange.End}
		}
		switch nr.IPProto {
		case unix.IPPROTO_TCP:
			r.IPProto = "tcp"
		case unix.IPPROTO_UDP:
			r.IPProto = "udp"
		case 0:
		default:
			r.IPProto = fmt.Sprint(nr.IPProto)
		}
		if nr.Dport != nil {
			r.DPort = nr.Dport.Start
		}
		if nr.Dst != nil {
			if p, ok := PrefixOf(nr.Dst); ok {
				r.To = p
			}
		}
		out = append(out, r)
	}
	return out, nil
}

// orDiscard returns log, or a logger that discards for nil.
func orDiscard(log *slog.Logger) *slog.Logger {
	if log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return log
}

// notFound turns the kernel's "no such object" answers into errNotFound.
func notFound(err error) error {
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("%w: %w", errNotFound, err)
	}
	return err
}

// Install cleans up what an earlier run left (see Cleanup), then adds
// tungate's routes and rules (see plan), recording each in the journal
// before making it. On error nothing of it is left behind. Close undoes it.
func Install(c Config, log *slog.Logger) (*Routes, error) {
	log = orDiscard(log)
	if err := c.validate(); err != nil {
		return nil, err
	}
	k, err := newNetlinkKernel(c.NetNS)
	if err != nil {
		return nil, err
	}
	r, err := install(c, k, log)
	if err != nil {
		k.Close()
		return nil, err
	}
	return r, nil
}

// Cleanup removes what a tungate with configuration c left behind when it
// was killed: every object its journal lists, then anything carrying
// ProtoTungate in c's band (rules) and table (routes); then it removes the
// journal. It returns how many objects it removed. It fails with
// ErrJournalBusy while that tungate still runs.
func Cleanup(c Config, log *slog.Logger) (int, error) {
	log = orDiscard(log)
	k, err := newNetlinkKernel(c.NetNS)
	if err != nil {
		return 0, err
	}
	defer k.Close()
	return cleanup(c, k, log)
}
