//go:build linux

package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
	"github.com/tungate/tungate/sysdns"
)

// System DNS tests (route.set_system_dns). tungate rewrites
// /etc/resolv.conf, so it only ever runs here in a private mount
// namespace of its own in which /etc/resolv.conf is a bind mount of a file
// in t.TempDir(): the machine's resolver file is never written (checked
// with its sha256 before and after).

// hostResolvConf is the machine's resolver file.
const hostResolvConf = "/etc/resolv.conf"

// guardHostResolvConf records the machine's /etc/resolv.conf and fails
// the test if it differs at the end, or if a temporary file of tungate's
// appears beside it. It refuses to go on if the file is a symlink: a bind
// mount onto it would land on the link's target, and tungate, seeing a
// symlink, would replace it.
func guardHostResolvConf(t *testing.T) {
	t.Helper()
	fi, err := os.Lstat(hostResolvConf)
	if err != nil || !fi.Mode().IsRegular() {
		netlab.RequireE2E(t, "system DNS", false, fmt.Sprintf("%s must be a regular file to be bind-mounted over safely: %v, %v", hostResolvConf, fi, err))
	}
	sum := func() [32]byte {
		b, err := os.ReadFile(hostResolvConf)
		if err != nil {
			t.Fatalf("reading the machine's %s: %v", hostResolvConf, err)
		}
		return sha256.Sum256(b)
	}
	before := sum()
	t.Cleanup(func() {
		if sum() != before {
			t.Errorf("the machine's %s changed during the test", hostResolvConf)
		}
		if left, _ := filepath.Glob("/etc/.resolv.conf.tungate-*"); len(left) > 0 {
			t.Errorf("tungate left temporary files in the machine's /etc: %v", left)
		}
	})
}

// startInMountNS starts tungate with the config at path in lab.App, in a
// private mount namespace where /etc/resolv.conf is a bind mount of
// resolvFile. The shell checks that the bind mount is in place (the mount
// point is /etc/resolv.conf itself and shows resolvFile's content) before
// it execs tungate, and never starts it otherwise.
func startInMountNS(t *testing.T, lab *netlab.Lab, path, resolvFile string) *gateway {
	t.Helper()
	unshare := netlab.RequireBinary(t, "unshare")
	const script = `mount --bind "$1" /etc/resolv.conf &&
grep -q ' /etc/resolv.conf ' /proc/self/mountinfo &&
cmp -s "$1" /etc/resolv.conf &&
exec "$2" run --config "$3"`
	g := &gateway{t: t, lab: lab}
	g.proc = lab.App.Start(t, unshare, "--mount", "--propagation", "private",
		"sh", "-c", script, "sh", resolvFile, tungateBin, path)
	waitLog(t, g.proc, "system DNS set", startWait)
	return g
}

// resolveAs resolves name with the system resolver (getent: glibc, which
// reads /etc/resolv.conf) inside tungate's own mount and network
// namespaces.
func resolveAs(t *testing.T, g *gateway, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pid := fmt.Sprint(g.proc.Cmd.Process.Pid)
	out, err := exec.CommandContext(ctx, "nsenter", "--target", pid, "--mount", "--net",
		"getent", "ahostsv4", name).CombinedOutput()
	if err != nil {
		t.Fatalf("getent ahostsv4 %s in tungate's namespaces: %v\n%s\ntungate log:\n%s", name, err, out, g.proc.Log())
	}
	return string(out)
}

func TestSystemDNS(t *testing.T) {
	guardHostResolvConf(t)
	netlab.RequireBinary(t, "nsenter")
	netlab.RequireBinary(t, "getent")
	lab := hostLab(t)
	dnsmasq := startDnsmasq(t, lab)

	// The "system" resolver file: it names the lab's dnsmasq, which
	// tungate then uses as its upstream (dns.upstreams is empty) — after
	// a kill too, when it must read the original, not itself.
	original := []byte("# the lab's resolver\nnameserver " + netlab.Remote4(5).String() + "\nsearch test\noptions ndots:1 timeout:2\n")
	resolvFile := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(resolvFile, original, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := autoConfig(t)
	cfg["dns"] = map[string]any{"enabled": true, "mode": "real", "listen": dnsListen, "hijack": []string{"any:53"}, "upstreams": []string{}}
	routeKeys(cfg)["set_system_dns"] = true
	path := writeYAML(t, cfg)
	dnsJournal := sysdns.JournalPath(journalOf(cfg))

	wantPointed := func(g *gateway, what string) {
		t.Helper()
		got, err := os.ReadFile(resolvFile)
		if err != nil {
			t.Fatal(err)
		}
		ns := sysdns.Nameservers(got)
		if len(ns) != 1 || ns[0].String() != dnsListen {
			t.Fatalf("%s: the resolver file names %v, want only dns.listen %s:\n%s", what, ns, dnsListen, got)
		}
		if !bytes.Contains(got, []byte("search test\n")) {
			t.Errorf("%s: the resolver file lost the original's search line:\n%s", what, got)
		}
		if _, err := os.Stat(dnsJournal); err != nil {
			t.Errorf("%s: journal %s: %v", what, dnsJournal, err)
		}
		before := upstreamQueries(t, dnsmasq, "A", "web.test")
		if out := resolveAs(t, g, "web.test"); !strings.Contains(out, webAddr4.String()) {
			t.Fatalf("%s: the system resolver answered %q for web.test, want %s", what, out, webAddr4)
		}
		// Answered by tungate asking the original's resolver (dnsmasq
		// logs the query a moment later).
		deadline := time.Now().Add(2 * time.Second)
		for upstreamQueries(t, dnsmasq, "A", "web.test") <= before {
			if time.Now().After(deadline) {
				t.Fatalf("%s: dnsmasq never saw tungate's query for web.test:\n%s", what, dnsmasq.Log())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	wantOriginal := func(what string) {
		t.Helper()
		got, err := os.ReadFile(resolvFile)
		if err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(got) != sha256.Sum256(original) {
			t.Fatalf("%s: the resolver file is\n%q\nwant the original byte for byte\n%q", what, got, original)
		}
	}

	t.Run("SIGTERM", func(t *testing.T) {
		g := startInMountNS(t, lab, path, resolvFile)
		wantPointed(g, "while running")
		g.stop()
		wantOriginal("after SIGTERM")
		if _, err := os.Stat(dnsJournal); !os.IsNotExist(err) {
			t.Errorf("journal after a clean exit: %v, want it removed", err)
		}
	})

	t.Run("SIGKILL", func(t *testing.T) {
		g := startInMountNS(t, lab, path, resolvFile)
		wantPointed(g, "while running")
		g.kill()
		// The bind mount went with the killed process's mount
		// namespace; the file it showed still names tungate.
		got, _ := os.ReadFile(resolvFile)
		if !bytes.Contains(got, []byte("nameserver "+dnsListen)) {
			t.Fatalf("after SIGKILL the resolver file no longer names tungate; the test proves nothing:\n%s", got)
		}
		if _, err := os.Stat(dnsJournal); err != nil {
			t.Fatalf("journal after SIGKILL: %v, want it kept", err)
		}

		g = startInMountNS(t, lab, path, resolvFile)
		if !strings.Contains(g.proc.Log(), "restored the resolver a killed earlier run had changed") {
			t.Errorf("the start after a kill does not say it restored the resolver:\n%s", g.proc.Log())
		}
		wantPointed(g, "after a kill and a new start")
		g.stop()
		wantOriginal("after a kill, a new start and SIGTERM")
	})
}
