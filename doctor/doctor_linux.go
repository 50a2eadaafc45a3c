package doctor

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/sysdns"
	"github.com/tungate/tungate/sysroute"
)

// netlinkTimeout bounds every netlink request, as in sysroute.
const netlinkTimeout = 10 * time.Second

// nftTimeout bounds `nft list tables`.
const nftTimeout = 5 * time.Second

// Inspect reads the host state that c concerns — the TUN, every ip rule,
// tungate's table, the main table's default routes, the sysctls that
// matter, the nftables tables, the resolver file and the journals — in the
// calling thread's network namespace. It changes nothing.
func Inspect(c Config) (*HostState, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("doctor: netlink: %w", err)
	}
	defer h.Close()
	if err := h.SetSocketTimeout(netlinkTimeout); err != nil {
		return nil, fmt.Errorf("doctor: netlink: %w", err)
	}
	s := &HostState{Tun: TunState{Name: c.Route.TunName}, Sysctls: map[string]int{}}
	names := map[int]string{}
	tunIndex := 0
	links, err := h.LinkList()
	if err != nil {
		s.Errors = append(s.Errors, fmt.Sprintf("links: %v", err))
	}
	for _, l := range links {
		a := l.Attrs()
		names[a.Index] = a.Name
		s.Links = append(s.Links, a.Name)
		if a.Name == s.Tun.Name {
			s.Tun.Exists, s.Tun.Up, tunIndex = true, a.Flags&net.FlagUp != 0, a.Index
		}
	}
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		s.Errors = append(s.Errors, fmt.Sprintf("addresses: %v", err))
	}
	for _, a := range addrs {
		p, ok := sysroute.PrefixOf(a.IPNet)
		if !ok {
			continue
		}
		s.LocalAddrs = append(s.LocalAddrs, p.Addr())
		if a.LinkIndex == tunIndex && tunIndex != 0 {
			s.Tun.Addrs = append(s.Tun.Addrs, p)
		}
	}
	for _, f := range []int{4, 6} {
		rules, err := sysroute.DumpRules(f)
		if err != nil {
			s.Errors = append(s.Errors, fmt.Sprintf("ipv%d rules: %v", f, err))
		}
		s.Rules = append(s.Rules, rules...)
		table, err := sysroute.ListRoutes(h, f, c.Route.Table, names)
		if err != nil {
			s.Errors = append(s.Errors, fmt.Sprintf("ipv%d routes of table %d: %v", f, c.Route.Table, err))
		}
		s.TableRoutes = append(s.TableRoutes, table...)
		main, err := sysroute.ListRoutes(h, f, unix.RT_TABLE_MAIN, names)
		if err != nil {
			s.Errors = append(s.Errors, fmt.Sprintf("ipv%d routes of the main table: %v", f, err))
		}
		for _, rt := range main {
			if rt.Dst.Bits() == 0 {
				s.Defaults = append(s.Defaults, rt)
			}
		}
	}
	sysctls := map[string]string{
		"net.ipv4.conf.all.rp_filter":     "/proc/sys/net/ipv4/conf/all/rp_filter",
		"net.ipv4.conf.default.rp_filter": "/proc/sys/net/ipv4/conf/default/rp_filter",
		"net.ipv4.ip_forward":             "/proc/sys/net/ipv4/ip_forward",
		"net.ipv6.conf.all.forwarding":    "/proc/sys/net/ipv6/conf/all/forwarding",
	}
	if s.Tun.Exists {
		sysctls["net.ipv4.conf."+s.Tun.Name+".rp_filter"] = filepath.Join("/proc/sys/net/ipv4/conf", s.Tun.Name, "rp_filter")
	}
	for key, path := range sysctls {
		if b, err := os.ReadFile(path); err == nil {
			if v, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				s.Sysctls[key] = v
			}
		}
	}
	s.NFT = listNFT()
	s.Resolv = inspectResolv(sysdns.DefaultResolvConf)
	if c.Route.Journal != "" {
		_, err := os.Stat(c.Route.Journal)
		s.RouteJournal = err == nil
		_, err = os.Stat(sysdns.JournalPath(c.Route.Journal))
		s.DNSJournal = err == nil
	}
	return s, nil
}

// listNFT lists the nftables tables with the nft command.
func listNFT() NFTState {
	bin, err := exec.LookPath("nft")
	if err != nil {
		return NFTState{Note: "the nft command is not installed"}
	}
	ctx, cancel := context.WithTimeout(context.Background(), nftTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "list", "tables").CombinedOutput()
	if err != nil {
		return NFTState{Note: fmt.Sprintf("nft list tables: %v: %s", err, strings.TrimSpace(string(out)))}
	}
	st := NFTState{Checked: true}
	for line := range strings.SplitSeq(string(out), "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "table "); ok {
			st.Tables = append(st.Tables, rest)
		}
	}
	return st
}

func inspectResolv(path string) ResolvState {
	r := ResolvState{Path: path}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSymlink != 0 {
		r.Symlink, _ = os.Readlink(path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		r.Err = err.Error()
		return r
	}
	r.Nameservers = sysdns.Nameservers(data)
	r.ByTungate = bytes.Contains(data, []byte("Written by tungate"))
	r.ByResolved = sysdns.PointsAtResolved(path)
	return r
}
