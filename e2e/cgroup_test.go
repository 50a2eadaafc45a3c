//go:build linux

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/netlab"
)

// Selection by cgroup (route.include_cgroups / exclude_cgroups): tungate
// marks the packets of the chosen cgroups in an nftables table of its own
// in the app namespace, and its band routes by the marks.
//
// Two things about cgroups here: `ip netns exec` gives the process a /sys
// without the cgroup hierarchy, so tungate runs as `ip netns exec APP
// nsenter --mount=<the test's mount namespace> tungate …` (back in a mount
// namespace that has it, still in APP's network namespace); and a client
// joins its cgroup from the test's namespaces first and enters APP's
// network namespace after (`sh -c 'echo $$ > CG/cgroup.procs; exec nsenter
// --net=… curl …'`), so that its sockets are made in both.

// cgroupMount returns where the cgroup v2 hierarchy is mounted
// (/sys/fs/cgroup/unified in a hybrid layout, /sys/fs/cgroup in a unified
// one).
func cgroupMount(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		for i, field := range fields {
			if field == "-" && i+1 < len(fields) && fields[i+1] == "cgroup2" && fields[3] == "/" {
				return fields[4]
			}
		}
	}
	netlab.RequireE2E(t, "cgroup", false, "no cgroup v2 hierarchy mounted")
	return ""
}

var cgroupSeq atomic.Uint32

// testCgroups creates a cgroup of the test's own under the hierarchy's root
// with the given children, and removes them all in cleanup (moving any
// process left in them to the root cgroup first). It returns the parent's
// path relative to the hierarchy's root.
func testCgroups(t *testing.T, mount string, children ...string) string {
	t.Helper()
	parent := fmt.Sprintf("tungate-e2e-%d-%d", os.Getpid(), cgroupSeq.Add(1))
	var made []string // relative paths, in creation order
	t.Cleanup(func() {
		for i := len(made) - 1; i >= 0; i-- {
			removeCgroup(t, mount, made[i])
		}
	})
	for _, c := range append([]string{""}, children...) {
		rel := filepath.Join(parent, c)
		if err := os.Mkdir(filepath.Join(mount, rel), 0o755); err != nil {
			t.Fatalf("cgroup: %v", err)
		}
		made = append(made, rel)
	}
	return parent
}

// addCgroup creates one more cgroup (after tungate started) and removes it
// in cleanup (which runs before testCgroups' own).
func addCgroup(t *testing.T, mount, rel string) {
	t.Helper()
	if err := os.Mkdir(filepath.Join(mount, rel), 0o755); err != nil {
		t.Fatalf("cgroup: %v", err)
	}
	t.Cleanup(func() { removeCgroup(t, mount, rel) })
}

// removeCgroup moves what is left in a cgroup to the root cgroup, then
// removes it.
func removeCgroup(t *testing.T, mount, rel string) {
	dir := filepath.Join(mount, rel)
	deadline := time.Now().Add(5 * time.Second)
	for {
		procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if errors.Is(err, os.ErrNotExist) {
			return
		}
		for pid := range strings.FieldsSeq(string(procs)) {
			if err := os.WriteFile(filepath.Join(mount, "cgroup.procs"), []byte(pid), 0o644); err != nil {
				t.Logf("cgroup %s: moving pid %s out: %v", rel, pid, err)
			}
		}
		err = unix.Rmdir(dir)
		if err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("cgroup %s: rmdir: %v (processes: %q)", rel, err, procs)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// startCgroupAuto is startAuto for a tungate that sees the cgroup
// hierarchy (see the top of this file).
func startCgroupAuto(t *testing.T, lab *netlab.Lab, cfg map[string]any) *gateway {
	t.Helper()
	nsenter := netlab.RequireBinary(t, "nsenter")
	path := writeYAML(t, cfg)
	g := &gateway{t: t, lab: lab}
	g.proc = lab.App.Start(t, nsenter, fmt.Sprintf("--mount=/proc/%d/ns/mnt", os.Getpid()), "--", tungateBin, "run", "--config", path)
	g.http = lab.App.HTTPClient()
	waitLog(t, g.proc, "auto-route installed", startWait)
	lab.App.WaitHealthy(t, g.proc, apiAddr, startWait)
	return g
}

// bigBody is what the test's web server sends: large enough to take many
// full-sized segments each way through whatever path the flow takes.
const bigBody = 2 << 20

// bigServer serves bigBody bytes at addr in the wan namespace.
func bigServer(t *testing.T, lab *netlab.Lab, addr string) {
	t.Helper()
	ln, err := lab.Wan.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	body := bytes.Repeat([]byte("tungate cgroup e2e\n"), bigBody/19+1)[:bigBody]
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Write(body)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// curlFrom runs curl for url in the app namespace as a process of the
// cgroup rel (relative to mount) and checks it receives the whole body.
func curlFrom(t *testing.T, lab *netlab.Lab, mount, rel, url string) {
	t.Helper()
	curl := netlab.RequireBinary(t, "curl")
	nsenter := netlab.RequireBinary(t, "nsenter")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// The shell joins the cgroup, then becomes curl in the app's network
	// namespace: curl's sockets belong to both.
	script := `echo $$ > "$1/cgroup.procs" && exec "$2" --net="$3" "$4" -sS --max-time 10 -o /dev/null -w '%{size_download}' "$5"`
	cmd := exec.CommandContext(ctx, "sh", "-c", script, "sh",
		filepath.Join(mount, rel), nsenter, "/run/netns/"+lab.App.Name, curl, url)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("curl %s from cgroup %s: %v\n%s", url, rel, err, out)
	}
	if n, err := strconv.Atoi(strings.TrimSpace(string(out))); err != nil || n != bigBody {
		t.Fatalf("curl %s from cgroup %s: received %q bytes, want %d", url, rel, out, bigBody)
	}
}

// keepRootRuleset reads the test's own namespace's nftables ruleset (read
// only) and checks in cleanup that it has not changed.
func keepRootRuleset(t *testing.T) {
	t.Helper()
	nft := netlab.RequireBinary(t, "nft")
	list := func() string {
		out, err := exec.Command(nft, "list", "ruleset").CombinedOutput()
		if err != nil {
			t.Fatalf("nft list ruleset: %v\n%s", err, out)
		}
		return string(out)
	}
	before := list()
	t.Cleanup(func() {
		if after := list(); after != before {
			t.Errorf("the root namespace's nftables ruleset changed:\n%s\nwas:\n%s", after, before)
		}
	})
}

// TestCgroup: a client in an included cgroup (or one below it, even one
// created after tungate started) goes through tungate, one in another
// cgroup does not; an excluded cgroup's client goes directly, by IPv4 and
// IPv6, with the whole body, while others go through tungate. After
// SIGTERM, the app namespace's routing and nftables are as before.
func TestCgroup(t *testing.T) {
	keepRootRuleset(t)
	mount := cgroupMount(t)
	lab := hostLab(t)
	netlab.RequireBinary(t, "nft")
	web4, web6 := remote4(1, 8080), remote6(1, 8080)
	bigServer(t, lab, web4)
	bigServer(t, lab, web6)
	url4, url6 := "http://"+web4+"/", "http://"+web6+"/"
	echoAddr := remote4(1, 7)
	lab.Wan.TCPEcho(t, echoAddr)
	before := routingState(t, lab.App)

	t.Run("include_cgroups", func(t *testing.T) {
		cg := testCgroups(t, mount, "in", "out")
		in, out := cg+"/in", cg+"/out"
		cfg := autoConfig(t)
		routeKeys(cfg)["include_cgroups"] = []string{in}
		g := startCgroupAuto(t, lab, cfg)
		if !strings.Contains(g.proc.Log(), "selecting by cgroup") {
			t.Errorf("tungate's log does not mention the cgroup selection:\n%s", g.proc.Log())
		}
		flows := g.metric("tungate_tcp_flows_total")

		curlFrom(t, lab, mount, in, url4)
		flows++
		g.wantFlows(flows, "IPv4 from the included cgroup: through tungate")
		curlFrom(t, lab, mount, in, url6)
		flows++
		g.wantFlows(flows, "IPv6 from the included cgroup: through tungate")
		curlFrom(t, lab, mount, out, url4)
		curlFrom(t, lab, mount, out, url6)
		g.wantFlows(flows, "from a sibling cgroup: directly")
		echo(t, lab, echoAddr) // from the test's own cgroup
		g.wantFlows(flows, "from the test's cgroup: directly")

		// A cgroup created below the included one after the start.
		late := in + "/late"
		addCgroup(t, mount, late)
		curlFrom(t, lab, mount, late, url4)
		flows++
		g.wantFlows(flows, "from a cgroup made later below the included one: through tungate")

		g.stop()
		waitState(t, lab.App, before, "after SIGTERM")
		if _, err := os.Stat(journalOf(cfg)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("journal after a clean exit: %v, want it removed", err)
		}
	})

	t.Run("exclude_cgroups", func(t *testing.T) {
		cg := testCgroups(t, mount, "ex", "other")
		ex, other := cg+"/ex", cg+"/other"
		cfg := autoConfig(t)
		// An absolute path under the mount point works too.
		routeKeys(cfg)["exclude_cgroups"] = []string{filepath.Join(mount, ex)}
		g := startCgroupAuto(t, lab, cfg)
		flows := g.metric("tungate_tcp_flows_total")

		// Excluded: directly by the veth, with the source address the
		// veth's (the socket's first lookup chose the TUN's).
		curlFrom(t, lab, mount, ex, url4)
		curlFrom(t, lab, mount, ex, url6)
		g.wantFlows(flows, "from the excluded cgroup: directly")

		curlFrom(t, lab, mount, other, url4)
		curlFrom(t, lab, mount, other, url6)
		flows += 2
		g.wantFlows(flows, "from another cgroup: through tungate")
		echo(t, lab, echoAddr) // from the test's own cgroup
		flows++
		g.wantFlows(flows, "from the test's cgroup: through tungate")

		g.stop()
		waitState(t, lab.App, before, "after SIGTERM")
	})
}

// TestCgroupRestartAfterKill: SIGKILL leaves the nftables table (with the
// rules); the next start removes it and makes its own, and after SIGTERM
// nothing is left. `tungate cleanup` removes what a killed one left.
func TestCgroupRestartAfterKill(t *testing.T) {
	keepRootRuleset(t)
	mount := cgroupMount(t)
	lab := hostLab(t)
	netlab.RequireBinary(t, "nft")
	web := remote4(1, 8080)
	bigServer(t, lab, web)
	before := routingState(t, lab.App)
	cg := testCgroups(t, mount, "in", "ex")
	cfg := autoConfig(t)
	routeKeys(cfg)["include_cgroups"] = []string{cg}
	routeKeys(cfg)["exclude_cgroups"] = []string{"/" + cg + "/ex"} // as /proc/PID/cgroup shows it
	path := writeYAML(t, cfg)

	g := startCgroupAuto(t, lab, cfg)
	g.kill()
	left := routingState(t, lab.App)
	if !strings.Contains(left, "table inet tungate2022") || !strings.Contains(left, "socket cgroupv2 level 2") {
		t.Fatalf("after SIGKILL no nftables table of tungate's is left; the test proves nothing:\n%s", left)
	}

	g = startCgroupAuto(t, lab, cfg)
	if log := g.proc.Log(); !strings.Contains(log, "removed a leftover") || !strings.Contains(log, "nftables table inet tungate2022") {
		t.Errorf("the second start does not mention the leftover table:\n%s", g.proc.Log())
	}
	flows := g.metric("tungate_tcp_flows_total")
	curlFrom(t, lab, mount, cg+"/in", "http://"+web+"/")
	flows++
	g.wantFlows(flows, "from the included cgroup after the restart: through tungate")
	curlFrom(t, lab, mount, cg+"/ex", "http://"+web+"/")
	g.wantFlows(flows, "from the excluded cgroup below it: directly")
	g.stop()
	waitState(t, lab.App, before, "after a restart and SIGTERM")

	// Killed again: `tungate cleanup` (which needs no cgroup hierarchy:
	// it deletes the table by its name) removes the table with the rest.
	g = startCgroupAuto(t, lab, cfg)
	g.kill()
	out := lab.App.MustRun(t, tungateBin, "cleanup", "--config", path)
	// 7 rules per family and the table (the TUN's routes went with it).
	if !strings.Contains(out, "removed 15 ") {
		t.Errorf("tungate cleanup said:\n%s\nwant 15 objects removed", out)
	}
	waitState(t, lab.App, before, "after SIGKILL and tungate cleanup")
}

// TestCgroupMissing: a configured cgroup that does not exist stops the
// start with an error naming the key, and nothing is left.
func TestCgroupMissing(t *testing.T) {
	keepRootRuleset(t)
	mount := cgroupMount(t)
	lab := hostLab(t)
	before := routingState(t, lab.App)
	cg := testCgroups(t, mount)
	cfg := autoConfig(t)
	routeKeys(cfg)["include_cgroups"] = []string{cg, cg + "/nope"}
	nsenter := netlab.RequireBinary(t, "nsenter")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := lab.App.Run(ctx, nsenter, fmt.Sprintf("--mount=/proc/%d/ns/mnt", os.Getpid()), "--", tungateBin, "run", "--config", writeYAML(t, cfg))
	want := fmt.Sprintf(`route.include_cgroups[1]: cgroup "%s/nope" not found under %s`, cg, mount)
	if err == nil || !strings.Contains(string(out), want) {
		t.Fatalf("tungate run with a missing cgroup: %v\n%s\nwant it to fail saying %q", err, out, want)
	}
	waitState(t, lab.App, before, "after the failed start")
}
