package sysroute

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/netlab"
)

func TestParseCgroupMountinfo(t *testing.T) {
	const (
		v1      = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
		hybrid  = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
		unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
		subtree = "50 23 0:26 /user.slice /mnt/my\\040cgroups rw,relatime shared:9 master:4 - cgroup2 cgroup2 rw\n"
	)
	tests := []struct {
		name        string
		data        string
		mount, root string
		ok          bool
	}{
		{"hybrid", "22 1 0:21 / / rw - ext4 /dev/sda rw\n" + v1 + hybrid, "/sys/fs/cgroup/unified", "/", true},
		{"unified, optional fields", unified, "/sys/fs/cgroup", "/", true},
		{"the whole hierarchy preferred over a subtree", subtree + unified, "/sys/fs/cgroup", "/", true},
		{"only a subtree, escaped space", subtree, "/mnt/my cgroups", "/user.slice", true},
		{"cgroup v1 only", v1, "", "", false},
		{"empty", "", "", "", false},
		{"a path that looks like a type", "60 1 0:5 / /srv/cgroup2 rw - tmpfs cgroup2 rw\n", "", "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m, ok := parseCgroupMountinfo([]byte(tc.data))
			if ok != tc.ok || m.mount != tc.mount || m.root != tc.root {
				t.Errorf("parseCgroupMountinfo = %+v, %v; want mount %q root %q, %v", m, ok, tc.mount, tc.root, tc.ok)
			}
		})
	}
}

// renderNFT renders tungate's table the way `nft list table` shows it
// (one line per chain header and per rule), from the expressions that go
// to the kernel: it knows the few expressions buildNFT uses and fails the
// test on any other.
func renderNFT(t *testing.T, o nftObjects) []string {
	t.Helper()
	hooks := map[nftables.ChainHook]string{*nftables.ChainHookOutput: "output", *nftables.ChainHookPostrouting: "postrouting"}
	prios := map[nftables.ChainPriority]string{*nftables.ChainPriorityMangle: "mangle", *nftables.ChainPriorityNATSource: "srcnat"}
	var out []string
	for _, ch := range o.chains {
		out = append(out, fmt.Sprintf("chain %s: type %s hook %s priority %s; policy accept", ch.Name, ch.Type, hooks[*ch.Hooknum], prios[*ch.Priority]))
		if ch.Table != o.table || *ch.Policy != nftables.ChainPolicyAccept {
			t.Errorf("chain %s: table %v, policy %v", ch.Name, ch.Table, *ch.Policy)
		}
		for _, r := range o.rules {
			if r.Chain != ch {
				continue
			}
			if r.Table != o.table {
				t.Errorf("rule in chain %s names table %v", ch.Name, r.Table)
			}
			out = append(out, "  "+renderRule(t, r))
		}
	}
	return out
}

func renderRule(t *testing.T, r *nftables.Rule) string {
	t.Helper()
	var parts []string
	lhs := ""
	var imm []byte
	for _, e := range r.Exprs {
		switch e := e.(type) {
		case *expr.Meta:
			if e.Register != nftRegister {
				t.Errorf("meta uses register %d", e.Register)
			}
			switch {
			case e.SourceRegister && e.Key == expr.MetaKeyMARK:
				parts = append(parts, fmt.Sprintf("meta mark set %#x", binaryutil.NativeEndian.Uint32(imm)))
			case e.Key == expr.MetaKeyMARK:
				lhs = "meta mark"
			case e.Key == expr.MetaKeyOIFNAME:
				lhs = "oifname"
			case e.Key == expr.MetaKeyNFPROTO:
				lhs = "meta nfproto"
			default:
				t.Errorf("meta key %d", e.Key)
			}
		case *expr.Socket:
			if e.Key != expr.SocketKeyCgroupv2 {
				t.Errorf("socket key %d", e.Key)
			}
			lhs = fmt.Sprintf("socket cgroupv2 level %d", e.Level)
		case *expr.Payload:
			switch {
			case e.Base == expr.PayloadBaseNetworkHeader && e.Offset == 12 && e.Len == 4:
				lhs = "ip saddr"
			case e.Base == expr.PayloadBaseNetworkHeader && e.Offset == 8 && e.Len == 16:
				lhs = "ip6 saddr"
			default:
				t.Errorf("payload %+v", e)
			}
		case *expr.Cmp:
			op := map[expr.CmpOp]string{expr.CmpOpEq: "", expr.CmpOpNeq: "!= "}[e.Op]
			var v string
			switch {
			case lhs == "meta mark":
				v = fmt.Sprintf("%#x", binaryutil.NativeEndian.Uint32(e.Data))
			case strings.HasPrefix(lhs, "socket"):
				v = fmt.Sprint(binaryutil.NativeEndian.Uint64(e.Data))
			case lhs == "oifname":
				if len(e.Data) != unix.IFNAMSIZ {
					t.Errorf("oifname compared with %d bytes", len(e.Data))
				}
				v = fmt.Sprintf("%q", bytes.TrimRight(e.Data, "\x00"))
			case lhs == "meta nfproto":
				v = map[byte]string{unix.NFPROTO_IPV4: "ipv4", unix.NFPROTO_IPV6: "ipv6"}[e.Data[0]]
			default:
				a, _ := netip.AddrFromSlice(e.Data)
				v = a.String()
			}
			parts = append(parts, lhs+" "+op+v)
		case *expr.Immediate:
			imm = e.Data
		case *expr.Verdict:
			if e.Kind != expr.VerdictAccept {
				t.Errorf("verdict %v", e.Kind)
			}
			parts = append(parts, "accept")
		case *expr.Masq:
			parts = append(parts, "masquerade")
		default:
			t.Errorf("unexpected expression %T", e)
		}
	}
	if c, ok := userdata.GetString(r.UserData, userdata.TypeComment); ok {
		parts = append(parts, fmt.Sprintf("comment %q", c))
	}
	return strings.Join(parts, " ")
}

func TestBuildNFT(t *testing.T) {
	inc := cgroupSel{Key: "route.include_cgroups[0]", Path: "user.slice", Level: 1, ID: 7}
	exc := cgroupSel{Key: "route.exclude_cgroups[0]", Path: "/user.slice/app.slice/firefox.scope", Exclude: true, Level: 3, ID: 1 << 40}
	const (
		markChain = "chain mark: type route hook output priority mangle; policy accept"
		left      = `  meta mark != 0x0 accept comment "already marked by its socket: left alone"`
		incRule   = `  socket cgroupv2 level 1 7 meta mark set 0x2e8 accept comment "route.include_cgroups[0]: user.slice"`
		excRule   = `  socket cgroupv2 level 3 1099511627776 meta mark set 0x2e9 accept comment "route.exclude_cgroups[0]: /user.slice/app.slice/firefox.scope"`
		masqChain = "chain masquerade: type nat hook postrouting priority srcnat; policy accept"
		masq4     = `  meta mark 0x2e9 oifname != "tg0" meta nfproto ipv4 ip saddr 172.19.0.1 masquerade comment "route.exclude_cgroups: the TUN's address chosen before the mark re-routed the packet"`
		masq6     = `  meta mark 0x2e9 oifname != "tg0" meta nfproto ipv6 ip6 saddr fdfe:dcba:9876::1 masquerade comment "route.exclude_cgroups: the TUN's address chosen before the mark re-routed the packet"`
	)
	dual := []netip.Addr{netip.MustParseAddr("172.19.0.1"), netip.MustParseAddr("fdfe:dcba:9876::1")}
	tests := []struct {
		name    string
		cgroups []cgroupSel
		addrs   []netip.Addr
		want    []string
	}{
		{"include: marks only, no masquerade", []cgroupSel{inc}, dual, []string{markChain, left, incRule}},
		{"exclude: marks, and masquerade of the TUN's addresses", []cgroupSel{exc}, dual, []string{markChain, left, excRule, masqChain, masq4, masq6}},
		{"both, IPv4-only TUN", []cgroupSel{exc, inc}, dual[:1], []string{markChain, left, excRule, incRule, masqChain, masq4}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := buildNFT(nftTable{Family: "inet", Name: "tungate2022", spec: &cgroupSpec{Cgroups: tc.cgroups, Tun: "tg0", TunAddrs: tc.addrs}})
			if o.table.Name != "tungate2022" || o.table.Family != nftables.TableFamilyINet {
				t.Errorf("table %+v, want inet tungate2022", o.table)
			}
			if got := renderNFT(t, o); !slices.Equal(got, tc.want) {
				t.Errorf("table:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

// cgroupRoot makes a stand-in cgroup hierarchy (plain directories: the
// lookup needs only their inode numbers) and returns its root.
func cgroupRoot(t *testing.T, dirs ...string) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func cgroupConfig(t *testing.T) Config {
	c := journalConfig(t)
	c.CgroupRoot = cgroupRoot(t, "user.slice/app.slice/firefox.scope")
	c.IncludeCgroups = []string{"user.slice"}
	c.ExcludeCgroups = []string{"user.slice/app.slice/firefox.scope"}
	return c
}

func TestCgroupTable(t *testing.T) {
	c := cgroupConfig(t)
	c.TunAddrs = append(prefixes("::ffff:172.19.0.1/126"), c.TunAddrs[1])
	tab, err := cgroupTable(c)
	if err != nil {
		t.Fatal(err)
	}
	want := []cgroupSel{
		{Key: "route.exclude_cgroups[0]", Path: "user.slice/app.slice/firefox.scope", Exclude: true, Level: 3,
			ID: inode(t, filepath.Join(c.CgroupRoot, "user.slice/app.slice/firefox.scope"))},
		{Key: "route.include_cgroups[0]", Path: "user.slice", Level: 1, ID: inode(t, filepath.Join(c.CgroupRoot, "user.slice"))},
	}
	if tab.Name != "tungate2022" || tab.Family != "inet" || !slices.Equal(tab.spec.Cgroups, want) {
		t.Errorf("cgroupTable = %s %+v, want inet tungate2022 %+v", tab, tab.spec.Cgroups, want)
	}
	if got := fmt.Sprint(tab.spec.TunAddrs); got != "[172.19.0.1 fdfe:dcba:9876::1]" || tab.spec.Tun != "tg0" {
		t.Errorf("TUN %s %s, want tg0 [172.19.0.1 fdfe:dcba:9876::1]", tab.spec.Tun, got)
	}
	c.IncludeCgroups = nil
	c.ExcludeCgroups = nil
	if tab, err := cgroupTable(c); tab != nil || err != nil {
		t.Errorf("cgroupTable without cgroups = %v, %v; want nil, nil", tab, err)
	}
}

func TestInstallWithCgroups(t *testing.T) {
	c := cgroupConfig(t)
	k := newFakeKernel(t)
	k.journal = c.Journal
	log, logs := testLogger(t)
	r, err := install(c, k, log)
	if err != nil {
		t.Fatalf("install: %v", err)
	}
	wantRules := both(
		"9000: from all fwmark 0x2e7 goto 9006",
		"9001: from all fwmark 0x2e9 goto 9006",
		"9002: from all fwmark 0x2e8 goto 9004",
		"9003: from all goto 9006",
		"9004: from all lookup main suppress_prefixlength 0",
		"9005: from all lookup 2022",
		"9006: from all nop",
	)
	if got := r.Rules(); !slices.Equal(got, wantRules) {
		t.Errorf("Rules() =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(wantRules, "\n"))
	}
	if len(k.log) == 0 || k.log[0] != "add nftables table inet tungate2022" {
		t.Errorf("adds: %q; want the nftables table first (its marks mean nothing until the rules exist)", k.log)
	}
	if !strings.Contains(logs.String(), "selecting by cgroup") {
		t.Errorf("log does not say it selects by cgroup:\n%s", logs)
	}
	adds := slices.Clone(k.log)
	k.log = nil
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, a := range slices.Backward(adds) {
		want = append(want, "del"+strings.TrimPrefix(a, "add"))
	}
	if !slices.Equal(k.log, want) || k.state() != "" {
		t.Errorf("Close removed, in order:\n%s\nwant:\n%s\nleft:\n%s", strings.Join(k.log, "\n"), strings.Join(want, "\n"), k.state())
	}
}

func TestInstallCgroupErrorsChangeNothing(t *testing.T) {
	tests := []struct {
		name   string
		change func(*Config)
		want   string
	}{
		{"missing include", func(c *Config) { c.IncludeCgroups = []string{"user.slice", "nope.slice"} },
			`route.include_cgroups[1]: cgroup "nope.slice" not found under `},
		{"missing exclude", func(c *Config) { c.ExcludeCgroups = []string{"user.slice/gone.scope"} },
			`route.exclude_cgroups[0]: cgroup "user.slice/gone.scope" not found under `},
		{"a file, not a cgroup", func(c *Config) {
			if err := os.WriteFile(filepath.Join(c.CgroupRoot, "user.slice", "cgroup.procs"), nil, 0o644); err != nil {
				panic(err)
			}
			c.IncludeCgroups = []string{"user.slice/cgroup.procs"}
		}, "is not a directory"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := cgroupConfig(t)
			tc.change(&c)
			k := newFakeKernel(t)
			log, _ := testLogger(t)
			_, err := install(c, k, log)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("install: %v, want an error containing %q", err, tc.want)
			}
			if len(k.log) != 0 {
				t.Errorf("changes made: %q", k.log)
			}
			if _, err := os.Stat(c.Journal); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("journal: %v, want none", err)
			}
		})
	}
}

func TestInstallWithCgroupsFailureLeavesNothing(t *testing.T) {
	testInstallFailureLeavesNothing(t, 4, cgroupConfig)
}

func TestCgroupLeftovers(t *testing.T) {
	c := cgroupConfig(t)
	k := newFakeKernel(t)
	log, logs := testLogger(t)
	r, err := install(c, k, log)
	if err != nil {
		t.Fatal(err)
	}
	installed := k.state()
	crash(r)

	// The next start removes the table and makes it again.
	r2, err := install(c, k, log)
	if err != nil {
		t.Fatalf("install after a crash: %v\n%s", err, logs)
	}
	if k.state() != installed {
		t.Errorf("after the second install:\n%s\nwant:\n%s", k.state(), installed)
	}
	if !strings.Contains(logs.String(), "removed a leftover of an earlier run") || !strings.Contains(logs.String(), "nftables table inet tungate2022") {
		t.Errorf("log does not mention the leftover table:\n%s", logs)
	}
	crash(r2)

	// tungate cleanup, by the journal: 2 routes, 14 rules, the table.
	n, err := cleanup(c, k, log)
	if err != nil || n != 17 || k.state() != "" {
		t.Fatalf("cleanup = %d, %v; left:\n%s\nwant 17 removed, nothing left", n, err, k.state())
	}

	// The journal lost: the table is found by its name; a configuration
	// without cgroups still finds it.
	r3, err := install(c, k, log)
	if err != nil {
		t.Fatal(err)
	}
	crash(r3)
	c.Journal = filepath.Join(t.TempDir(), "other.journal")
	c.IncludeCgroups, c.ExcludeCgroups = nil, nil
	if _, err := cleanup(c, k, log); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(k.state(), "nftables") {
		t.Errorf("after a cleanup by tag:\n%s\nwant the table gone", k.state())
	}
}

// rootRuleset is the nftables ruleset of the namespace the test runs in
// (read only: the tests must never change it).
func rootRuleset(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("nft", "list", "ruleset").CombinedOutput()
	if err != nil {
		t.Fatalf("nft list ruleset: %v\n%s", err, out)
	}
	return string(out)
}

// nftState is the lab app namespace's routing state and nftables ruleset.
func nftState(t *testing.T, lab *netlab.Lab) string {
	return snapshot(t, lab) + "# nft list ruleset\n" + lab.App.MustRun(t, "nft", "list", "ruleset")
}

func TestCgroupInstallInNamespace(t *testing.T) {
	lab := routedLab(t)
	netlab.RequireBinary(t, "nft")
	root := rootRuleset(t)
	t.Cleanup(func() {
		if got := rootRuleset(t); got != root {
			t.Errorf("the test's own namespace's nftables ruleset changed:\n%s\nwas:\n%s", got, root)
		}
	})
	before := nftState(t, lab)
	c := labConfig(t, lab)
	c.CgroupRoot = cgroupRoot(t, "user.slice/app.slice/firefox.scope")
	c.IncludeCgroups = []string{"user.slice"}
	c.ExcludeCgroups = []string{"/user.slice/app.slice/firefox.scope"}
	log, logs := testLogger(t)
	r, err := Install(c, log)
	if err != nil {
		t.Fatalf("Install: %v\n%s", err, logs)
	}
	// The kernel's own account of the table, as nft shows it.
	got := lab.App.MustRun(t, "nft", "list", "table", "inet", "tungate2022")
	inc, exc := inode(t, filepath.Join(c.CgroupRoot, "user.slice")), inode(t, filepath.Join(c.CgroupRoot, "user.slice/app.slice/firefox.scope"))
	for _, want := range []string{
		"type route hook output priority mangle; policy accept;",
		`meta mark != 0x00000000 accept comment "already marked by its socket: left alone"`,
		fmt.Sprintf(`socket cgroupv2 level 3 %d meta mark set 0x000002e9 accept comment "route.exclude_cgroups[0]: /user.slice/app.slice/firefox.scope"`, exc),
		fmt.Sprintf(`socket cgroupv2 level 1 %d meta mark set 0x000002e8 accept comment "route.include_cgroups[0]: user.slice"`, inc),
		"type nat hook postrouting priority srcnat; policy accept;",
		`meta mark 0x000002e9 oifname != "tun0" ip saddr 172.19.0.1 masquerade`,
		`meta mark 0x000002e9 oifname != "tun0" ip6 saddr fdfe:dcba:9876::1 masquerade`,
	} {
		if !strings.Contains(got, want) {
			t.Errorf("nft list table inet tungate2022 lacks %q:\n%s", want, got)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"10.233.5.5"}, netlab.VethName},                            // not in an included cgroup
		{[]string{"10.233.5.5", "mark", "0x2e8"}, testDev},                   // included
		{[]string{"fd00:233:5::5", "mark", "0x2e8"}, testDev},                //
		{[]string{"10.233.5.5", "mark", "0x2e9"}, netlab.VethName},           // excluded
		{[]string{"10.233.0.2", "mark", "0x2e8"}, netlab.VethName},           // the LAN stays direct
		{[]string{"10.233.5.5", "mark", "0x2e7"}, netlab.VethName},           // tungate's own
		{[]string{"fd00:233:5::5", "mark", "0x2e9"}, netlab.VethName},        //
		{[]string{"10.233.5.5", "uid", "4242", "mark", "0x2e8"}, testDev},    // any uid
		{[]string{"fd00:233:5::5", "uid", "4242"}, netlab.VethName},          //
		{[]string{"10.233.5.5", "mark", "0x2ea"}, netlab.VethName},           // another mark
		{[]string{"172.19.0.2", "mark", "0x2e9"}, testDev},                   // the TUN's own subnet, by the main table
		{[]string{"fd00:233:5::5", "mark", "0x2e8", "uid", "0"}, testDev},    //
		{[]string{"10.233.5.5", "mark", "0x2e8", "ipproto", "udp"}, testDev}, //
	} {
		if got := routeGet(t, lab, tc.args...); got != tc.want {
			t.Errorf("ip route get %s: %s, want %s", strings.Join(tc.args, " "), got, tc.want)
		}
	}

	// Killed: the next start removes the table and makes it again; then
	// killed again, `tungate cleanup` removes everything.
	installed := nftState(t, lab)
	crash(r)
	r2, err := Install(c, log)
	if err != nil {
		t.Fatalf("Install after a crash: %v\n%s", err, logs)
	}
	if got := nftState(t, lab); got != installed {
		t.Errorf("after the second Install:\n%s\nwant:\n%s", got, installed)
	}
	crash(r2)
	if n, err := Cleanup(c, nil); err != nil || n != 17 {
		t.Errorf("Cleanup = %d, %v; want 17 (2 routes, 14 rules, the table)", n, err)
	}
	if got := nftState(t, lab); got != before {
		t.Errorf("after Cleanup:\n%s\nwant as before:\n%s", got, before)
	}

	// Stopped: Close removes it all.
	r3, err := Install(c, log)
	if err != nil {
		t.Fatal(err)
	}
	if err := r3.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if got := nftState(t, lab); got != before {
		t.Errorf("after Close:\n%s\nwant as before Install:\n%s", got, before)
	}
}

// TestCgroupTableExists: a table of the same name that appears between
// the sweep and the add (someone else's) is not added to.
func TestCgroupTableExists(t *testing.T) {
	lab := routedLab(t)
	netlab.RequireBinary(t, "nft")
	c := labConfig(t, lab)
	c.CgroupRoot = cgroupRoot(t, "a")
	c.IncludeCgroups = []string{"a"}
	k, err := newNetlinkKernel(c.NetNS)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	tab, err := cgroupTable(c)
	if err != nil {
		t.Fatal(err)
	}
	if err := k.AddNFTable(*tab); err != nil {
		t.Fatalf("AddNFTable: %v", err)
	}
	if err := k.AddNFTable(*tab); !errors.Is(err, unix.EEXIST) {
		t.Errorf("AddNFTable over an existing table: %v, want EEXIST", err)
	}
	if err := k.DelNFTable(*tab); err != nil {
		t.Fatalf("DelNFTable: %v", err)
	}
	if err := k.DelNFTable(*tab); !errors.Is(err, errNotFound) {
		t.Errorf("DelNFTable of a missing table: %v, want errNotFound", err)
	}
}
