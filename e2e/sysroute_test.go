//go:build linux

package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/netlab"
)

// Auto-route tests: tungate installs its own routes and rules in the app
// namespace (route.auto); the test adds none into the TUN.

const (
	autoTable    = 2022
	autoPriority = 9000
)

// hostLab is a lab whose app namespace reaches the remote hosts the way a
// host reaches the Internet: by its default route (via wan), instead of
// the lab's own routes to 10.233.1.0/24 and fd00:233:1::/64. Auto-route
// overrides the default route and deliberately leaves more specific main
// table routes (a LAN, a VPN, the lab's remote routes) alone; the veth
// subnet stays the app's LAN.
func hostLab(t *testing.T) *netlab.Lab {
	t.Helper()
	lab := netlab.New(t)
	for _, args := range [][]string{
		{"ip", "route", "del", "10.233.1.0/24"},
		{"ip", "-6", "route", "del", "fd00:233:1::/64"},
		{"ip", "route", "add", "default", "via", netlab.WanAddr4.String()},
		{"ip", "-6", "route", "add", "default", "via", netlab.WanAddr6.String()},
	} {
		lab.App.MustRun(t, args[0], args[1:]...)
	}
	settled(t, lab.App, netlab.VethName)
	return lab
}

// settled waits until the kernel has finished configuring devs: each has
// its IPv6 link-local address past duplicate address detection, whose end
// adds a route to the local table. A routing state taken earlier would
// differ from a later one by that route, whatever tungate did.
func settled(t testing.TB, ns *netlab.NS, devs ...string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, dev := range devs {
		for {
			out := ns.MustRun(t, "ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link")
			if strings.Contains(out, "fe80::") && !strings.Contains(out, "tentative") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no settled link-local address after 10 s: %q", dev, out)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// autoConfig is baseConfig with route.auto and a journal of the test's
// own.
func autoConfig(t *testing.T) map[string]any {
	cfg := baseConfig()
	cfg["route"] = map[string]any{
		"auto":     true,
		"table":    autoTable,
		"priority": autoPriority,
		"journal":  filepath.Join(t.TempDir(), "route.journal"),
	}
	return cfg
}

func routeKeys(cfg map[string]any) map[string]any { return cfg["route"].(map[string]any) }

func journalOf(cfg map[string]any) string { return routeKeys(cfg)["journal"].(string) }

func writeYAML(t testing.TB, cfg map[string]any) string {
	t.Helper()
	raw, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatalf("yaml.Marshal: %v", err)
	}
	path := filepath.Join(t.TempDir(), "tungate.yaml")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// startAuto starts tungate with cfg (route.auto on) in lab.App and waits
// until its routes are installed and its API answers.
func startAuto(t *testing.T, lab *netlab.Lab, cfg map[string]any) *gateway {
	t.Helper()
	path := writeYAML(t, cfg)
	g := &gateway{t: t, lab: lab, config: path}
	g.proc = lab.App.Start(t, tungateBin, "run", "--config", path)
	g.http = lab.App.HTTPClient()
	waitLog(t, g.proc, "auto-route installed", startWait)
	lab.App.WaitHealthy(t, g.proc, apiAddr, startWait)
	return g
}

// routingState is everything auto-route could change in the namespace.
func routingState(t testing.TB, ns *netlab.NS) string {
	t.Helper()
	cmds := [][]string{
		{"ip", "rule"}, {"ip", "-6", "rule"},
		{"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
	}
	if _, err := exec.LookPath("nft"); err == nil {
		cmds = append(cmds, []string{"nft", "list", "ruleset"})
	}
	var b strings.Builder
	for _, args := range cmds {
		fmt.Fprintf(&b, "# %s\n%s", strings.Join(args, " "), ns.MustRun(t, args[0], args[1:]...))
	}
	return b.String()
}

// waitState polls until the namespace's routing state is want (a device
// that goes with its process takes its routes along a moment later).
func waitState(t testing.TB, ns *netlab.NS, want, what string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		got := routingState(t, ns)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: routing state\n%s\nwant as before tungate started:\n%s", what, got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// echo sends a message over a fresh connection from the app namespace and
// checks that it comes back.
func echo(t testing.TB, lab *netlab.Lab, addr string) {
	t.Helper()
	c, err := lab.App.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("hello " + addr)
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("write to %s: %v", addr, err)
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo from %s: %q, %v; want %q", addr, got, err, msg)
	}
}

// wantFlows waits until tungate's TCP flow counter is want and checks
// that it stays there.
func (g *gateway) wantFlows(want float64, what string) {
	g.t.Helper()
	g.waitMetric("tungate_tcp_flows_total", 3*time.Second, fmt.Sprintf("%v (%s)", want, what), func(v float64) bool { return v >= want })
	if v := g.metric("tungate_tcp_flows_total"); v != want {
		g.t.Fatalf("tungate_tcp_flows_total = %v, want %v (%s)", v, want, what)
	}
}

func TestAutoRoute(t *testing.T) {
	lab := hostLab(t)
	lab.Wan.TCPEcho(t, remote4(1, 7))
	lab.Wan.TCPEcho(t, remote6(1, 7))
	lab.Wan.UDPEcho(t, remote4(1, 9))
	lan := lab.Wan.TCPEcho(t, netip.AddrPortFrom(netlab.WanAddr4, 7).String()).String()
	lan6 := lab.Wan.TCPEcho(t, netip.AddrPortFrom(netlab.WanAddr6, 7).String()).String()
	loopback := lab.App.TCPEcho(t, "127.0.0.1:0").String()
	before := routingState(t, lab.App)

	cfg := autoConfig(t)
	g := startAuto(t, lab, cfg)
	rules := lab.App.MustRun(t, "ip", "rule") + lab.App.MustRun(t, "ip", "-6", "rule")
	if n := strings.Count(rules, "proto 231"); n != 8 {
		t.Errorf("%d rules tagged proto 231, want 8 (4 per family):\n%s", n, rules)
	}

	flows := g.metric("tungate_tcp_flows_total")
	echo(t, lab, remote4(1, 7))
	echo(t, lab, remote6(1, 7))
	g.wantFlows(flows+2, "IPv4 and IPv6 connections to the remote host went through the TUN")

	for _, addr := range []string{lan, lan6, loopback} {
		echo(t, lab, addr)
	}
	g.wantFlows(flows+2, "the LAN and loopback stay direct")

	sessions := g.metric("tungate_udp_sessions_total")
	c := listenApp(t, lab, "udp4")
	dst := netip.MustParseAddrPort(remote4(1, 9))
	if _, err := c.WriteToUDPAddrPort([]byte("ping"), dst); err != nil {
		t.Fatal(err)
	}
	if got, _, err := readFrom(c, 5*time.Second); err != nil || string(got) != "ping" {
		t.Fatalf("UDP echo: %q, %v", got, err)
	}
	g.waitMetric("tungate_udp_sessions_total", 3*time.Second, "one more", func(v float64) bool { return v == sessions+1 })

	g.stop()
	waitState(t, lab.App, before, "after SIGTERM")
	if _, err := os.Stat(journalOf(cfg)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("journal after a clean exit: %v, want it removed", err)
	}
}

// kill ends tungate with SIGKILL: nothing of its own shutdown runs.
func (g *gateway) kill() {
	g.t.Helper()
	if err := g.proc.Signal(unix.SIGKILL); err != nil {
		g.t.Fatalf("SIGKILL: %v", err)
	}
	if exited, _ := g.proc.Wait(5 * time.Second); !exited {
		g.t.Fatal("tungate still running 5 s after SIGKILL")
	}
}

func TestAutoRouteRestartAfterKill(t *testing.T) {
	lab := hostLab(t)
	lab.Wan.TCPEcho(t, remote4(1, 7))
	before := routingState(t, lab.App)
	cfg := autoConfig(t)

	g := startAuto(t, lab, cfg)
	g.kill()
	left := routingState(t, lab.App)
	if left == before || !strings.Contains(left, "proto 231") {
		t.Fatalf("after SIGKILL nothing of tungate's is left; the test proves nothing:\n%s", left)
	}
	if _, err := os.Stat(journalOf(cfg)); err != nil {
		t.Fatalf("journal after SIGKILL: %v, want it kept", err)
	}

	g = startAuto(t, lab, cfg)
	if !strings.Contains(g.proc.Log(), "leftover") {
		t.Errorf("the second start does not mention the leftovers it removed:\n%s", g.proc.Log())
	}
	flows := g.metric("tungate_tcp_flows_total")
	echo(t, lab, remote4(1, 7))
	g.wantFlows(flows+1, "through the TUN after the restart")
	g.stop()
	waitState(t, lab.App, before, "after a restart and SIGTERM")
}

func TestCleanupAfterKill(t *testing.T) {
	lab := hostLab(t)
	before := routingState(t, lab.App)
	cfg := autoConfig(t)
	// Strict with an IPv4-only TUN leaves a route behind too (IPv6's
	// unreachable default), not only rules.
	cfg["tun"].(map[string]any)["address"] = []string{"172.19.0.1/30"}
	routeKeys(cfg)["strict"] = true
	path := writeYAML(t, cfg)

	g := startAuto(t, lab, cfg)
	g.kill()
	left := routingState(t, lab.App)
	if !strings.Contains(left, "unreachable default dev lo table 2022 proto 231") {
		t.Fatalf("after SIGKILL: no unreachable route of tungate's left; the test proves nothing:\n%s", left)
	}

	out := lab.App.MustRun(t, tungateBin, "cleanup", "--config", path)
	if !strings.Contains(out, "removed 13 rules, routes and nft tables") {
		t.Errorf("tungate cleanup said:\n%s\nwant it to count 12 rules and the unreachable route", out)
	}
	waitState(t, lab.App, before, "after tungate cleanup")
	if _, err := os.Stat(journalOf(cfg)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("journal after tungate cleanup: %v, want it removed", err)
	}
	if out := lab.App.MustRun(t, tungateBin, "cleanup", "--config", path); !strings.Contains(out, "removed 0") {
		t.Errorf("a second tungate cleanup said:\n%s\nwant nothing removed", out)
	}

	// While tungate runs, cleanup refuses instead of pulling its routes.
	g = startAuto(t, lab, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := lab.App.Run(ctx, tungateBin, "cleanup", "--config", path); err == nil || !strings.Contains(string(out), "running tungate") {
		t.Errorf("tungate cleanup while tungate runs: %v\n%s\nwant a refusal", err, out)
	}
	g.stop()
	waitState(t, lab.App, before, "after SIGTERM")
}

// TestUID runs curl as two users: an excluded (or not included) uid goes
// directly, the other through the TUN.
func TestUID(t *testing.T) {
	curl := netlab.RequireBinary(t, "curl")
	setpriv := netlab.RequireBinary(t, "setpriv")
	lab := hostLab(t)
	web := remote4(1, 8080)
	webServer(t, lab, web)
	before := routingState(t, lab.App)
	const chosen, other = 4242, 4343

	get := func(uid int) {
		t.Helper()
		out := lab.App.MustRun(t, setpriv, fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups",
			curl, "-sS", "--max-time", "5", "http://"+web+"/")
		if !strings.Contains(out, "hello from web.test") {
			t.Fatalf("curl as uid %d: %q", uid, out)
		}
	}
	for _, tc := range []struct {
		key            string
		chosenThroughT bool // whether the chosen uid's traffic goes through the TUN
	}{
		{"exclude_uids", false},
		{"include_uids", true},
	} {
		t.Run(tc.key, func(t *testing.T) {
			cfg := autoConfig(t)
			routeKeys(cfg)[tc.key] = []string{fmt.Sprint(chosen)}
			g := startAuto(t, lab, cfg)
			flows := g.metric("tungate_tcp_flows_total")
			for _, uid := range []int{chosen, other} {
				get(uid)
				if through := (uid == chosen) == tc.chosenThroughT; through {
					flows++
				}
				g.wantFlows(flows, fmt.Sprintf("%s: [%d]; curl as uid %d", tc.key, chosen, uid))
			}
			g.stop()
			waitState(t, lab.App, before, "after SIGTERM")
		})
	}
}

// TestStrict: with an IPv4-only TUN, IPv6 leaves by the veth unless
// route.strict blocks it; strict also sends DNS to a LAN resolver through
// the TUN.
func TestStrict(t *testing.T) {
	lab := hostLab(t)
	lab.Wan.TCPEcho(t, remote4(1, 7))
	lab.Wan.TCPEcho(t, remote6(1, 7))
	resolver := lab.Wan.TCPEcho(t, netip.AddrPortFrom(netlab.WanAddr4, 53).String()).String()
	before := routingState(t, lab.App)

	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprint("strict=", strict), func(t *testing.T) {
			cfg := autoConfig(t)
			cfg["tun"].(map[string]any)["address"] = []string{"172.19.0.1/30"}
			routeKeys(cfg)["strict"] = strict
			g := startAuto(t, lab, cfg)
			flows := g.metric("tungate_tcp_flows_total")

			echo(t, lab, remote4(1, 7))
			flows++
			g.wantFlows(flows, "IPv4 through the TUN")

			start := time.Now()
			c, err := lab.App.DialTimeout("tcp", remote6(1, 7), 3*time.Second)
			if strict {
				if err == nil {
					c.Close()
					t.Fatalf("IPv6 connection with strict and an IPv4-only TUN: connected (leaked past the TUN)")
				}
				if !errors.Is(err, syscall.EHOSTUNREACH) && !errors.Is(err, syscall.ENETUNREACH) {
					t.Fatalf("IPv6 connection under strict: %v, want unreachable", err)
				}
				if d := time.Since(start); d > time.Second {
					t.Errorf("IPv6 refusal took %v, want it at once", d)
				}
			} else {
				if err != nil {
					t.Fatalf("IPv6 connection without strict (directly by the veth): %v", err)
				}
				c.Close()
			}
			g.wantFlows(flows, "IPv6 never enters an IPv4-only TUN")

			echo(t, lab, resolver)
			if strict {
				flows++
			}
			g.wantFlows(flows, "DNS to a LAN resolver: through the TUN only under strict")
			g.stop()
			waitState(t, lab.App, before, "after SIGTERM")
		})
	}
}

// TestLoop: an outbound misconfigured to send its own traffic back into
// the TUN (no mark, bound to the TUN itself) has its flows refused at once
// with one log line instead of looping.
func TestLoop(t *testing.T) {
	lab := hostLab(t)
	lab.Wan.TCPEcho(t, remote4(1, 7))
	before := routingState(t, lab.App)
	cfg := autoConfig(t)
	cfg["outbounds"] = []any{
		map[string]any{"name": "direct", "type": "direct", "fwmark": fwmark},
		map[string]any{"name": "leaky", "type": "direct", "fwmark": 0, "interface": tunName},
	}
	cfg["final"] = "leaky"
	g := startAuto(t, lab, cfg)
	if !strings.Contains(g.proc.Log(), "loop guard on") {
		t.Fatalf("tungate did not turn its loop guard on:\n%s", g.proc.Log())
	}
	flows := g.metric("tungate_tcp_flows_total")
	refused := g.metric("tungate_tcp_refused_total")
	const attempts = 3
	for range attempts {
		start := time.Now()
		c, err := lab.App.DialTimeout("tcp", remote4(1, 7), 5*time.Second)
		if err == nil {
			c.Close()
			t.Fatal("connected through a looping outbound")
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial through a looping outbound: %v, want ECONNREFUSED", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("refusal took %v, want it at once", d)
		}
	}
	// Each attempt: the looping flow and the app's flow, both refused.
	g.waitMetric("tungate_tcp_refused_total", 3*time.Second, "two per attempt", func(v float64) bool { return v == refused+2*attempts })
	g.wantFlows(flows, "nothing relayed")
	if n := strings.Count(g.proc.Log(), "routing loop: a flow from tungate's own outbound socket"); n != 1 {
		t.Errorf("%d log lines about the loop, want exactly 1:\n%s", n, g.proc.Log())
	}
	if !strings.Contains(g.proc.Log(), "carries no fwmark") {
		t.Errorf("the loop line does not say how to fix it:\n%s", g.proc.Log())
	}

	// UDP: the app's datagram opens one session; the datagram that session
	// sends comes back as a new flow and is refused, ending the loop.
	lab.Wan.UDPEcho(t, remote4(1, 9))
	sessions := g.metric("tungate_udp_sessions_total")
	udpRefused := g.metric("tungate_udp_refused_total")
	c := listenApp(t, lab, "udp4")
	if _, err := c.WriteToUDPAddrPort([]byte("ping"), netip.MustParseAddrPort(remote4(1, 9))); err != nil {
		t.Fatal(err)
	}
	g.waitMetric("tungate_udp_refused_total", 3*time.Second, "the looping datagram refused", func(v float64) bool { return v == udpRefused+1 })
	if got, _, err := readFrom(c, 500*time.Millisecond); err == nil {
		t.Errorf("UDP through a looping outbound: got a reply %q", got)
	}
	if v := g.metric("tungate_udp_sessions_total"); v != sessions+1 {
		t.Errorf("tungate_udp_sessions_total = %v, want %v: only the app's session opens", v, sessions+1)
	}
	if v := g.metric("tungate_udp_refused_total"); v != udpRefused+1 {
		t.Errorf("tungate_udp_refused_total = %v, want %v: one looping datagram, refused once", v, udpRefused+1)
	}
	g.stop()
	waitState(t, lab.App, before, "after SIGTERM")
}
