package sysroute

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/internal/netlab"
)

// These tests change routes and rules, so each works inside the app
// namespace of its own lab, always through Config.NetNS; nothing touches
// the namespace the test runs in.

const testDev = "tun0"

// routedLab builds a lab whose app namespace looks like a host: a default
// route via wan (instead of the lab's routes to the remote hosts) and a
// device standing in for the TUN (a veth pair inside app; the kernel
// treats a route out of it like one out of a TUN).
func routedLab(t *testing.T) *netlab.Lab {
	t.Helper()
	lab := netlab.New(t)
	app := lab.App
	for _, args := range [][]string{
		{"ip", "route", "del", "10.233.1.0/24"},
		{"ip", "-6", "route", "del", "fd00:233:1::/64"},
		{"ip", "route", "add", "default", "via", "10.233.0.2"},
		{"ip", "-6", "route", "add", "default", "via", "fd00:233::2"},
		// The stand-in TUN's link-local addresses need no duplicate
		// address detection (this namespace's own setting).
		{"sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"},
		{"ip", "link", "add", testDev, "type", "veth", "peer", "name", testDev + "p"},
		{"ip", "addr", "add", "172.19.0.1/30", "dev", testDev},
		{"ip", "addr", "add", "fdfe:dcba:9876::1/126", "dev", testDev, "nodad"},
		{"ip", "link", "set", testDev + "p", "up"},
		{"ip", "link", "set", testDev, "up"},
	} {
		app.MustRun(t, args[0], args[1:]...)
	}
	// Wait for the kernel to finish configuring the devices: each one's
	// IPv6 link-local address, once past duplicate address detection,
	// adds a route to the local table, which would make two snapshots
	// differ whatever Install did.
	deadline := time.Now().Add(10 * time.Second)
	for _, dev := range []string{netlab.VethName, testDev, testDev + "p"} {
		for {
			out := app.MustRun(t, "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link")
			if strings.Contains(out, "fe80::") && !strings.Contains(out, "tentative") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no settled link-local address after 10 s: %q", dev, out)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return lab
}

func labConfig(t *testing.T, lab *netlab.Lab) Config {
	c := baseConfig()
	c.TunName = testDev
	c.NetNS = "/run/netns/" + lab.App.Name
	c.Journal = filepath.Join(t.TempDir(), "route.journal")
	return c
}

// snapshot is the namespace's whole routing state.
func snapshot(t *testing.T, lab *netlab.Lab) string {
	t.Helper()
	var b strings.Builder
	for _, args := range [][]string{
		{"ip", "rule"}, {"ip", "-6", "rule"},
		{"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
	} {
		b.WriteString("# " + strings.Join(args, " ") + "\n")
		b.WriteString(lab.App.MustRun(t, args[0], args[1:]...))
	}
	return b.String()
}

// routeGet returns the device `ip route get` picks (or the error text).
func routeGet(t *testing.T, lab *netlab.Lab, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := lab.App.Run(ctx, "ip", append([]string{"route", "get"}, args...)...)
	if err != nil {
		// IPv4's unreachable routes answer ENETUNREACH, IPv6's
		// EHOSTUNREACH.
		if strings.Contains(string(out), "unreachable") || strings.Contains(string(out), "No route to host") {
			return "unreachable"
		}
		t.Fatalf("ip route get %v: %v", args, err)
	}
	f := strings.Fields(string(out))
	for i, w := range f {
		if w == "dev" && i+1 < len(f) {
			return f[i+1]
		}
	}
	return string(out)
}

func TestInstallInNamespace(t *testing.T) {
	lab := routedLab(t)
	before := snapshot(t, lab)
	c := labConfig(t, lab)
	c.ExcludeUIDs = []configs.UIDRange{{From: 4242, To: 4242}}
	c.ExcludeAddresses = prefixes("10.233.7.0/24", "fd00:233:7::/64")
	c.Strict = true
	log, logs := testLogger(t)
	r, err := Install(c, log)
	if err != nil {
		t.Fatalf("Install: %v\n%s", err, logs)
	}
	rules := lab.App.MustRun(t, "ip", "rule")
	for _, want := range []string{
		"9000:\tfrom all fwmark 0x2e7 goto 9007 proto 231",
		"9004:\tfrom all lookup main suppress_prefixlength 0 proto 231",
		"9007:\tfrom all nop proto 231",
	} {
		if !strings.Contains(rules, want) {
			t.Errorf("ip rule lacks %q:\n%s", want, rules)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"10.233.5.5"}, testDev},                                  // the default route is overridden
		{[]string{"fd00:233:5::5"}, testDev},                               // for IPv6 too
		{[]string{"10.233.5.5", "mark", "0x2e7"}, netlab.VethName},         // tungate's own traffic leaves directly
		{[]string{"fd00:233:5::5", "mark", "0x2e7"}, netlab.VethName},      //
		{[]string{"10.233.0.2"}, netlab.VethName},                          // the LAN (a connected subnet) stays direct
		{[]string{"fd00:233::2"}, netlab.VethName},                         //
		{[]string{"10.233.5.5", "uid", "4242"}, netlab.VethName},           // an excluded uid
		{[]string{"10.233.5.5", "uid", "4243"}, testDev},                   // any other uid
		{[]string{"10.233.7.7"}, netlab.VethName},                          // an excluded address
		{[]string{"fd00:233:7::7"}, netlab.VethName},                       //
		{[]string{"10.233.7.7", "ipproto", "udp", "dport", "53"}, testDev}, // strict: DNS even to an excluded address
		{[]string{"10.233.0.2", "ipproto", "tcp", "dport", "53"}, testDev}, // strict: DNS even to the LAN
		{[]string{"10.233.0.2", "ipproto", "tcp", "dport", "54"}, netlab.VethName},
		{[]string{"10.233.0.2", "ipproto", "udp", "dport", "53", "mark", "0x2e7"}, netlab.VethName}, // tungate's own DNS
	} {
		if got := routeGet(t, lab, tc.args...); got != tc.want {
			t.Errorf("ip route get %s: %s, want %s", strings.Join(tc.args, " "), got, tc.want)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if after := snapshot(t, lab); after != before {
		t.Errorf("after Close:\n%s\nwant as before Install:\n%s", after, before)
	}
}

func TestInstallStrictBlocksMissingFamily(t *testing.T) {
	lab := routedLab(t)
	c := labConfig(t, lab)
	c.TunAddrs = prefixes("172.19.0.1/30")
	for _, strict := range []bool{false, true} {
		c.Strict = strict
		r, err := Install(c, nil)
		if err != nil {
			t.Fatalf("Install(strict=%v): %v", strict, err)
		}
		want := netlab.VethName
		if strict {
			want = "unreachable"
		}
		if got := routeGet(t, lab, "fd00:233:5::5"); got != want {
			t.Errorf("strict=%v, IPv4-only TUN: ip route get fd00:233:5::5 = %s, want %s", strict, got, want)
		}
		if got := routeGet(t, lab, "fe80::1", "oif", netlab.VethName); got != netlab.VethName {
			t.Errorf("strict=%v: link-local IPv6 = %s, want %s", strict, got, netlab.VethName)
		}
		if got := routeGet(t, lab, "10.233.5.5"); got != testDev {
			t.Errorf("strict=%v: IPv4 = %s, want %s", strict, got, testDev)
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestInstallAfterCrashAndCleanup(t *testing.T) {
	lab := routedLab(t)
	before := snapshot(t, lab)
	c := labConfig(t, lab)
	c.Strict = true
	c.TunAddrs = prefixes("172.19.0.1/30")
	r, err := Install(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	installed := snapshot(t, lab)
	crash(r)

	// A second run finds the journal, removes the leftovers and installs
	// the same state again.
	log, logs := testLogger(t)
	r2, err := Install(c, log)
	if err != nil {
		t.Fatalf("Install after a crash: %v\n%s", err, logs)
	}
	if got := snapshot(t, lab); got != installed {
		t.Errorf("after the second Install:\n%s\nwant:\n%s", got, installed)
	}
	if !strings.Contains(logs.String(), "leftover") {
		t.Errorf("no leftovers logged:\n%s", logs)
	}
	if _, err := Install(c, nil); !errors.Is(err, ErrJournalBusy) {
		t.Errorf("Install while another run holds the journal: %v, want ErrJournalBusy", err)
	}
	if _, err := Cleanup(c, nil); !errors.Is(err, ErrJournalBusy) {
		t.Errorf("Cleanup while a run holds the journal: %v, want ErrJournalBusy", err)
	}
	crash(r2)
	n, err := Cleanup(c, nil)
	if err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	if n == 0 {
		t.Error("Cleanup removed nothing")
	}
	if got := snapshot(t, lab); got != before {
		t.Errorf("after Cleanup:\n%s\nwant as before:\n%s", got, before)
	}

	// The journal lost: the sweep by tag still finds everything.
	r3, err := Install(c, nil)
	if err != nil {
		t.Fatal(err)
	}
	crash(r3)
	c.Journal = filepath.Join(t.TempDir(), "elsewhere.journal")
	if _, err := Cleanup(c, nil); err != nil {
		t.Fatalf("Cleanup without the journal: %v", err)
	}
	if got := snapshot(t, lab); got != before {
		t.Errorf("after a Cleanup by tag:\n%s\nwant as before:\n%s", got, before)
	}
}

func TestInstallRefusesSomeoneElsesBand(t *testing.T) {
	lab := routedLab(t)
	lab.App.MustRun(t, "ip", "rule", "add", "pref", "9001", "lookup", "100")
	before := snapshot(t, lab)
	c := labConfig(t, lab)
	_, err := Install(c, nil)
	if err == nil || !strings.Contains(err.Error(), "route.priority") {
		t.Fatalf("Install over a rule at 9001: %v, want a route.priority error", err)
	}
	if got := snapshot(t, lab); got != before {
		t.Errorf("after the refused Install:\n%s\nwant as before:\n%s", got, before)
	}
}
