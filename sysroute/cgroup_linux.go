package sysroute

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// cgroupMountinfo is where the cgroup v2 hierarchy is looked for.
const cgroupMountinfo = "/proc/self/mountinfo"

// findCgroupHierarchy returns the cgroup v2 hierarchy mounted at mount, or
// ("") the one /proc/self/mountinfo lists.
func findCgroupHierarchy(mount string) (cgroupHierarchy, error) {
	h := cgroupHierarchy{Mount: mount, Root: "/", stat: cgroupID}
	if mount != "" {
		return h, nil
	}
	data, err := os.ReadFile(cgroupMountinfo)
	if err != nil {
		return h, fmt.Errorf("route.include_cgroups/route.exclude_cgroups: finding the cgroup v2 hierarchy: %w", err)
	}
	m, ok := parseCgroupMountinfo(data)
	if !ok {
		return h, errors.New(`route.include_cgroups/route.exclude_cgroups: no cgroup v2 hierarchy is mounted here (no cgroup2 in ` + cgroupMountinfo + `); ` +
			`"ip netns exec" mounts a /sys without it: enter the network namespace with "nsenter --net=/run/netns/NAME" instead`)
	}
	h.Mount, h.Root = m.mount, m.root
	return h, nil
}

type cgroup2Mount struct{ mount, root string }

// parseCgroupMountinfo returns the first cgroup2 mount of a mountinfo file,
// preferring one of the whole hierarchy. A line reads
//
//	41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
//
// (root and mount point fifth and fourth, optional fields before "-", the
// file system type after it; spaces in paths are written \040).
func parseCgroupMountinfo(data []byte) (cgroup2Mount, bool) {
	var found []cgroup2Mount
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if len(f) < 5 || sep < 0 || sep+1 >= len(f) || f[sep+1] != "cgroup2" {
			continue
		}
		found = append(found, cgroup2Mount{mount: unescapeMountField(f[4]), root: unescapeMountField(f[3])})
	}
	for _, m := range found {
		if m.root == "/" {
			return m, true
		}
	}
	if len(found) > 0 {
		return found[0], true
	}
	return cgroup2Mount{}, false
}

// unescapeMountField undoes the kernel's octal escapes (\040 for a space,
// \011, \012, \134).
func unescapeMountField(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// cgroupID returns the id of the cgroup whose directory is dir: its inode
// number (a kernfs node's id, which `socket cgroupv2` compares).
func cgroupID(dir string) (uint64, error) {
	fi, err := os.Stat(dir)
	if err != nil {
		return 0, err
	}
	if !fi.IsDir() {
		return 0, fmt.Errorf("%s is not a directory", dir)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, fmt.Errorf("%s: no inode number", dir)
	}
	return st.Ino, nil
}

// nftObjects is tungate's nftables table as google/nftables objects, in the
// order they are added.
type nftObjects struct {
	table  *nftables.Table
	chains []*nftables.Chain
	rules  []*nftables.Rule // each names its chain
}

// Chain names of tungate's table.
const (
	nftChainMark       = "mark"
	nftChainMasquerade = "masquerade"
)

// nftRegister is the register every rule works in (NFT_REG_1, 16 bytes:
// wide enough for a cgroup id and an IPv6 address).
const nftRegister = 1

// buildNFT returns the objects of t (see cgroup.go for what they are).
func buildNFT(t nftTable) nftObjects {
	tab := &nftables.Table{Family: nftables.TableFamilyINet, Name: t.Name}
	accept := nftables.ChainPolicyAccept
	mark := &nftables.Chain{
		Name: nftChainMark, Table: tab,
		Type: nftables.ChainTypeRoute, Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle,
		Policy: &accept,
	}
	o := nftObjects{table: tab, chains: []*nftables.Chain{mark}}
	rule := func(ch *nftables.Chain, comment string, exprs ...[]expr.Any) {
		r := &nftables.Rule{Table: tab, Chain: ch, UserData: nftComment(comment)}
		for _, e := range exprs {
			r.Exprs = append(r.Exprs, e...)
		}
		o.rules = append(o.rules, r)
	}
	rule(mark, "already marked by its socket: left alone", nftMarkCmp(expr.CmpOpNeq, 0), nftAccept())
	excluded := false
	for _, s := range t.spec.Cgroups {
		excluded = excluded || s.Exclude
		rule(mark, s.Key+": "+s.Path, nftSocketCgroup(s.Level, s.ID), nftMarkSet(s.Mark()), nftAccept())
	}
	if !excluded {
		return o
	}
	masq := &nftables.Chain{
		Name: nftChainMasquerade, Table: tab,
		Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource,
		Policy: &accept,
	}
	o.chains = append(o.chains, masq)
	for _, a := range t.spec.TunAddrs {
		rule(masq, "route.exclude_cgroups: the TUN's address chosen before the mark re-routed the packet",
			nftMarkCmp(expr.CmpOpEq, CgroupExcludeMark), nftOifnameNot(t.spec.Tun), nftSaddr(a), []expr.Any{&expr.Masq{}})
	}
	return o
}

// nftComment is a rule comment as nft shows it (at most 127 bytes).
func nftComment(s string) []byte {
	if len(s) > 127 {
		s = s[:124] + "..."
	}
	return userdata.AppendString(nil, userdata.TypeComment, s)
}

func nftMarkCmp(op expr.CmpOp, mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: nftRegister},
		&expr.Cmp{Op: op, Register: nftRegister, Data: binaryutil.NativeEndian.PutUint32(mark)},
	}
}

func nftMarkSet(mark uint32) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: nftRegister, Data: binaryutil.NativeEndian.PutUint32(mark)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: nftRegister},
	}
}

// nftSocketCgroup matches a packet whose socket's cgroup has the cgroup id at
// level among its ancestors (itself included).
func nftSocketCgroup(level uint32, id uint64) []expr.Any {
	return []expr.Any{
		&expr.Socket{Key: expr.SocketKeyCgroupv2, Level: level, Register: nftRegister},
		&expr.Cmp{Op: expr.CmpOpEq, Register: nftRegister, Data: binaryutil.NativeEndian.PutUint64(id)},
	}
}

func nftOifnameNot(name string) []expr.Any {
	ifname := make([]byte, unix.IFNAMSIZ)
	copy(ifname, name)
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: nftRegister},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: nftRegister, Data: ifname},
	}
}

// nftSaddr matches the source address a (and its family, which the inet
// family needs before a network header load).
func nftSaddr(a netip.Addr) []expr.Any {
	proto, off := byte(unix.NFPROTO_IPV4), uint32(12)
	if !a.Is4() {
		proto, off = unix.NFPROTO_IPV6, 8
	}
	b := a.AsSlice()
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: nftRegister},
		&expr.Cmp{Op: expr.CmpOpEq, Register: nftRegister, Data: []byte{proto}},
		&expr.Payload{DestRegister: nftRegister, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: uint32(len(b))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: nftRegister, Data: b},
	}
}

func nftAccept() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }

// nftConn returns the nftables connection of the kernel's namespace,
// making it on first use (most runs never need one). It opens a netlink
// socket per request (in the namespace k.nsFile holds, or the calling
// thread's), each request bounded like rtnetlink's.
func (k *netlinkKernel) nftConn() (*nftables.Conn, error) {
	k.nftMu.Lock()
	defer k.nftMu.Unlock()
	if k.nft != nil {
		return k.nft, nil
	}
	opts := []nftables.ConnOption{nftables.WithSockOptions(func(c *netlink.Conn) error {
		return c.SetDeadline(time.Now().Add(netlinkTimeout))
	})}
	if k.nsPath != "" {
		f, err := os.Open(k.nsPath)
		if err != nil {
			return nil, fmt.Errorf("nftables: network namespace: %w", err)
		}
		if f.Fd() == 0 {
			// 0 would mean "the calling thread's namespace".
			f.Close()
			return nil, errors.New("nftables: network namespace file got descriptor 0")
		}
		k.nsFile = f // kept open: every request enters the namespace by it
		opts = append(opts, nftables.WithNetNSFd(int(f.Fd())))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	k.nft = c
	return c, nil
}

func (k *netlinkKernel) closeNFT() {
	k.nftMu.Lock()
	defer k.nftMu.Unlock()
	k.nft = nil
	if k.nsFile != nil {
		k.nsFile.Close()
		k.nsFile = nil
	}
}

func (k *netlinkKernel) AddNFTable(t nftTable) error {
	if t.spec == nil {
		return fmt.Errorf("%s: nothing to put in it", t)
	}
	c, err := k.nftConn()
	if err != nil {
		return err
	}
	o := buildNFT(t)
	// Fails if the table exists: never add to someone else's.
	c.CreateTable(o.table)
	for _, ch := range o.chains {
		c.AddChain(ch)
	}
	for _, r := range o.rules {
		c.AddRule(r)
	}
	// One batch, one transaction: all of it or nothing.
	return c.Flush()
}

func (k *netlinkKernel) DelNFTable(t nftTable) error {
	c, err := k.nftConn()
	if err != nil {
		return nftNotFound(err)
	}
	if t.Family != nftFamily {
		return fmt.Errorf("%s: not a family tungate uses", t)
	}
	c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: t.Name})
	return nftNotFound(c.Flush())
}

// nftNotFound is notFound for nftables, where a kernel without nftables
// has none of tungate's tables either.
func nftNotFound(err error) error {
	for _, e := range []error{unix.EPROTONOSUPPORT, unix.EOPNOTSUPP, unix.EAFNOSUPPORT} {
		if errors.Is(err, e) {
			return fmt.Errorf("%w: nftables unavailable: %w", errNotFound, err)
		}
	}
	return notFound(err)
}
