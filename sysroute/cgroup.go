package sysroute

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"path"
	"strconv"
	"strings"
)

// Selection by cgroup (route.include_cgroups, route.exclude_cgroups).
//
// An ip rule cannot see a cgroup, so tungate marks the packets of the
// chosen cgroups in an nftables table of its own and its band matches the
// marks (see the package documentation). The table, "inet tungateTABLE"
// (tungate2022 for route.table 2022: the name is the table's tag, the way
// ProtoTungate tags rules and routes), holds:
//
//	chain mark: type route hook output priority mangle
//	    meta mark != 0 accept
//	        a packet its socket already marked (tungate's own outbound
//	        sockets, another VPN's) keeps its mark and its routing
//	    socket cgroupv2 level L ID meta mark set CgroupExcludeMark accept
//	        one per route.exclude_cgroups entry, first: exclusion wins
//	    socket cgroupv2 level L ID meta mark set CgroupIncludeMark accept
//	        one per route.include_cgroups entry
//	chain masquerade: type nat hook postrouting priority srcnat
//	                  (only with route.exclude_cgroups)
//	    meta mark CgroupExcludeMark oifname != TUN ip saddr TUNADDR masquerade
//	    (and ip6 saddr, per TUN address)
//
// ID is the cgroup's id (the inode number of its directory), L its depth
// below the hierarchy's root ("user.slice" is level 1): `socket cgroupv2
// level L ID` matches a socket whose cgroup is that cgroup or any cgroup
// below it, because it compares the id of the socket cgroup's ancestor at
// level L. A route chain re-routes a packet whose mark it changed, so the
// marked packet meets tungate's band with the mark.
//
// The mark is set after the socket's first route lookup, which chose the
// packet's source address: for an excluded app that lookup went into the
// TUN and picked the TUN's address, which the re-routed packet would carry
// out of the physical interface. The masquerade chain gives such a packet
// the outgoing interface's address instead (it needs conntrack in the
// namespace, which a nat chain turns on). An included app's first lookup
// used the host's routes, so its packets enter the TUN with the physical
// interface's address, which tungate accepts and answers.
//
// Limits:
//   - Cgroups are looked up at start. A cgroup created later below a
//     configured one is matched (the rule names the ancestor), but a
//     configured cgroup that is removed and created again (a transient
//     systemd scope such as app-firefox-1234.scope is new on every start
//     of the app) has a new id and is not: configure a lasting parent (a
//     slice) for apps that come and go, and restart tungate after
//     recreating a configured cgroup.
//   - A socket belongs to the cgroup of the process that created it; a
//     process moved to another cgroup keeps its sockets' cgroup.
//   - Levels count from the hierarchy's root as tungate sees it: tungate
//     must run in the initial cgroup namespace (not in a container with a
//     cgroup namespace of its own).
//   - route.include_cgroups: an included app's first lookup uses the
//     host's routes, so the host needs a route of its own to the
//     destination (a default route), as any host has; strict reverse-path
//     filtering (rp_filter=1) drops the replies that come out of the TUN
//     (use 2, loose, or 0), as with route.include_uids.
//   - route.exclude_cgroups with route.strict and a TUN without an address
//     family: the blocking route answers the socket's first lookup, before
//     there is a packet to mark, so excluded apps are blocked on that
//     family too.
//   - Packets without a full socket (a RST the kernel answers for a
//     closed port, a SYN-ACK of a listening socket's request) carry no
//     cgroup and are not marked.

// The marks tungate's nftables table sets on the packets of selected
// cgroups. They sit next to the default outbound mark (0x2e7) so that `ip
// rule` reads as tungate's, are clear of the bits others are known to test
// (kube-proxy 0x4000 and 0x8000, Tailscale 0xff0000, wg-quick 0xca6c),
// and are compared whole. The table only marks packets that carry no mark,
// so no other mark is ever changed. Two marks, because an excluded cgroup
// below an included one (or an excluded cgroup's process of an included
// uid) must skip the band, which a single "selected" mark could not say.
// An outbound's fwmark may not be either (Install says so).
const (
	CgroupIncludeMark = 0x2e8
	CgroupExcludeMark = 0x2e9
)

// nftFamily is the family of tungate's nftables table: inet covers IPv4
// and IPv6 with one chain.
const nftFamily = "inet"

// nftTablePrefix starts the name of tungate's nftables table.
const nftTablePrefix = "tungate"

// nftTableName is the name of tungate's nftables table for a route.table.
func nftTableName(table int) string { return nftTablePrefix + strconv.Itoa(table) }

// nftTable is tungate's nftables table, in the form the journal records
// (family and name: enough to delete it).
type nftTable struct {
	Family string `json:"family"`
	Name   string `json:"name"`

	// spec is what Install puts in it (not journaled).
	spec *cgroupSpec
}

func (t nftTable) String() string { return "nftables table " + t.Family + " " + t.Name }

// owned checks that t is a table tungate could have made for route.table
// table (0: for any table).
func (t nftTable) owned(table int) bool {
	if t.Family != nftFamily {
		return false
	}
	if table != 0 {
		return t.Name == nftTableName(table)
	}
	n, err := strconv.Atoi(strings.TrimPrefix(t.Name, nftTablePrefix))
	return strings.HasPrefix(t.Name, nftTablePrefix) && err == nil && n > 0
}

// cgroupSpec is what tungate's nftables table does.
type cgroupSpec struct {
	// Cgroups are the selected cgroups, excluded ones first.
	Cgroups []cgroupSel
	// Tun is the TUN's name and TunAddrs its addresses: the masquerade
	// rules for excluded cgroups match them.
	Tun      string
	TunAddrs []netip.Addr
}

// cgroupSel is one configured cgroup, looked up.
type cgroupSel struct {
	// Key is the configuration key ("route.include_cgroups[0]") and Path
	// its value.
	Key, Path string
	Exclude   bool
	// Level is the cgroup's depth below the hierarchy's root and ID its
	// id (the inode number of its directory).
	Level uint32
	ID    uint64
}

// Mark is the mark the cgroup's packets get.
func (s cgroupSel) Mark() uint32 {
	if s.Exclude {
		return CgroupExcludeMark
	}
	return CgroupIncludeMark
}

// byCgroup reports whether c selects traffic by cgroup.
func (c *Config) byCgroup() bool { return len(c.IncludeCgroups)+len(c.ExcludeCgroups) > 0 }

// cgroupTable returns the nftables table Install makes for c's cgroups (nil
// without any), looking each cgroup up.
func cgroupTable(c Config) (*nftTable, error) {
	if !c.byCgroup() {
		return nil, nil
	}
	h, err := findCgroupHierarchy(c.CgroupRoot)
	if err != nil {
		return nil, err
	}
	spec := &cgroupSpec{Tun: c.TunName}
	for _, l := range []struct {
		key     string
		paths   []string
		exclude bool
	}{
		{"route.exclude_cgroups", c.ExcludeCgroups, true},
		{"route.include_cgroups", c.IncludeCgroups, false},
	} {
		for i, p := range l.paths {
			key := fmt.Sprintf("%s[%d]", l.key, i)
			level, id, err := h.lookup(p)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", key, err)
			}
			spec.Cgroups = append(spec.Cgroups, cgroupSel{Key: key, Path: p, Exclude: l.exclude, Level: level, ID: id})
		}
	}
	for _, p := range c.TunAddrs {
		if p.IsValid() {
			spec.TunAddrs = append(spec.TunAddrs, p.Addr().Unmap())
		}
	}
	return &nftTable{Family: nftFamily, Name: nftTableName(c.Table), spec: spec}, nil
}

// cgroupHierarchy is where the cgroup v2 hierarchy is mounted.
type cgroupHierarchy struct {
	// Mount is the mount point; Root the hierarchy's directory mounted
	// there ("/" unless a subtree is mounted), as /proc/PID/cgroup names
	// cgroups.
	Mount, Root string
	// stat returns the id of the cgroup directory at an absolute path
	// (an error satisfying errors.Is(err, fs.ErrNotExist) if there is
	// none).
	stat func(dir string) (uint64, error)
}

// lookup returns the level and id of the cgroup at p: a path relative to
// the hierarchy's root, one as /proc/PID/cgroup shows it ("/a/b"), or an
// absolute path under the mount point.
func (h cgroupHierarchy) lookup(p string) (level uint32, id uint64, err error) {
	var rel string // below the mount point
	switch {
	case !strings.HasPrefix(p, "/"):
		rel = p
	case p == h.Mount || strings.HasPrefix(p, strings.TrimSuffix(h.Mount, "/")+"/"):
		rel = strings.TrimPrefix(p, strings.TrimSuffix(h.Mount, "/"))
	case h.Root == "/" || p == h.Root || strings.HasPrefix(p, h.Root+"/"):
		rel = strings.TrimPrefix(p, strings.TrimSuffix(h.Root, "/"))
	default:
		return 0, 0, fmt.Errorf("cgroup %q is not in the part of the hierarchy mounted at %s (%s)", p, h.Mount, h.Root)
	}
	for _, part := range strings.Split(rel, "/") {
		if part == ".." {
			return 0, 0, fmt.Errorf("cgroup %q: \"..\" is not allowed", p)
		}
	}
	rel = strings.TrimPrefix(path.Clean("/"+rel), "/")
	if rel == "" && h.Root == "/" {
		return 0, 0, fmt.Errorf("cgroup %q is the hierarchy's root, which holds every process: leave the list empty instead", p)
	}
	id, err = h.stat(path.Join(h.Mount, rel))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, 0, fmt.Errorf("cgroup %q not found under %s", p, h.Mount)
	}
	if err != nil {
		return 0, 0, fmt.Errorf("cgroup %q: %w", p, err)
	}
	return pathDepth(h.Root) + pathDepth(rel), id, nil
}

// pathDepth counts the parts of a slash-separated path.
func pathDepth(p string) uint32 {
	n := uint32(0)
	for part := range strings.SplitSeq(p, "/") {
		if part != "" {
			n++
		}
	}
	return n
}

// logCgroups says what the table selects.
func logCgroups(log *slog.Logger, t *nftTable) {
	log.Info("auto-route: selecting by cgroup", "nftables_table", t.Family+" "+t.Name,
		"include_mark", fmt.Sprintf("%#x", CgroupIncludeMark), "exclude_mark", fmt.Sprintf("%#x", CgroupExcludeMark))
	for _, s := range t.spec.Cgroups {
		log.Debug("auto-route: cgroup", "key", s.Key, "path", s.Path, "level", s.Level, "id", s.ID, "mark", fmt.Sprintf("%#x", s.Mark()))
	}
}
