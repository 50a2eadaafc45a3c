//go:build linux

package bench

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/netlab"
)

// The gateway's configuration and the policy routing that sends the
// tungate path into its TUN. These match e2e (copied, not imported: the e2e
// package is tests only).
const (
	tunName   = "tg0"
	apiAddr   = "127.0.0.1:9090"
	fwmark    = 0x2e7
	routeTab  = 100
	rulePrio  = 100
	startWait = 10 * time.Second
)

// The two paths, told apart only by the destination: remote host 1 is
// routed into the TUN, remote host 9 is pinned to the main table (the veth)
// by a rule ahead of the TUN's.
const (
	tungateRemote = 1
	kernelRemote  = 9
	kernelPrio    = 50 // before rulePrio
)

// userHZ is the unit of utime and stime in /proc/PID/stat: USER_HZ, which
// the kernel fixes at 100 for user space on every architecture tungate
// targets.
const userHZ = 100

// gateway is a running tungate inside a lab's app namespace.
type gateway struct {
	lab  *netlab.Lab
	proc *netlab.Proc
	http *http.Client
}

// gatewayConfig is tungate's configuration for the benchmark: a TUN in the
// app namespace, the direct outbound, the API on the namespace's loopback,
// the DNS proxy in real mode hijacking port 53 with dnsmasq in wan as its
// upstream (dns_test.go), no auto-route, info logging (debug logs every
// flow, which would be measured too).
func gatewayConfig(offload string) string {
	return fmt.Sprintf(`log:
  level: info
tun:
  name: %s
  mtu: 9000
  address: [172.19.0.1/30, "fdfe:dcba:9876::1/126"]
  offload: %s
outbounds:
  - name: direct
    type: direct
    fwmark: %#x
dns:
  enabled: true
  mode: real
  listen: 172.19.0.2
  hijack: ["any:53"]
  upstreams: ["udp://%s"]
  cache:
    size: %d
route:
  auto: false
api:
  listen: %s
`, tunName, offload, fwmark, netip.AddrPortFrom(netlab.Remote4(dnsUpstreamRemote), 53), dnsCacheSize, apiAddr)
}

// startGateway starts tungate in lab.App, waits for its TUN and API and
// routes the tungate path into the TUN. Setup problems fail t: without a
// gateway nothing can be measured.
func startGateway(t *testing.T, lab *netlab.Lab, binary, offload string) *gateway {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tungate.yaml")
	if err := os.WriteFile(path, []byte(gatewayConfig(offload)), 0o600); err != nil {
		t.Fatal(err)
	}
	g := &gateway{lab: lab}
	g.proc = lab.App.Start(t, binary, "run", "--config", path)
	lab.App.WaitLink(t, tunName, true, startWait)
	routeTungatePath(t, lab)
	g.http = lab.App.HTTPClient()
	lab.App.WaitHealthy(t, g.proc, apiAddr, startWait)
	return g
}

// routeTungatePath installs, in the app namespace only, the gateway's
// routing (netlab.RouteIntoTUN: everything but tungate's marked sockets
// into the TUN) and, ahead of it, the kernel path:
//
//	pref 50: to Remote4(9)/32 (Remote6(9)/128) lookup main
func routeTungatePath(t *testing.T, lab *netlab.Lab) {
	t.Helper()
	lab.App.RouteIntoTUN(t, tunName, routeTab, fwmark, rulePrio)
	h := lab.App.Netlink(t)
	for _, dst := range []netip.Addr{netlab.Remote4(kernelRemote), netlab.Remote6(kernelRemote)} {
		kernel := netlink.NewRule()
		kernel.Family = unix.AF_INET
		if dst.Is6() {
			kernel.Family = unix.AF_INET6
		}
		kernel.Dst = &net.IPNet{IP: dst.AsSlice(), Mask: net.CIDRMask(dst.BitLen(), dst.BitLen())}
		kernel.Table = unix.RT_TABLE_MAIN
		kernel.Priority = kernelPrio
		if err := h.RuleAdd(kernel); err != nil {
			t.Fatalf("RuleAdd(to %s lookup main pref %d): %v", dst, kernelPrio, err)
		}
	}
}

// alive returns an error when tungate has exited.
func (g *gateway) alive() error {
	if g.proc.Exited() {
		_, err := g.proc.Wait(0)
		return fmt.Errorf("tungate exited (%v); log ends:\n%s", err, tailLines(g.proc.Log(), 20))
	}
	return nil
}

func (g *gateway) pid() int { return g.proc.Cmd.Process.Pid }

// metric returns the current value of a Prometheus metric without labels.
func (g *gateway) metric(name string) (float64, error) {
	return g.lab.App.Metric(apiAddr, name)
}

// waitMetric polls until cond holds for the metric, or fails after
// timeout.
func (g *gateway) waitMetric(name string, timeout time.Duration, want string, cond func(float64) bool) (float64, error) {
	deadline := time.Now().Add(timeout)
	for {
		v, err := g.metric(name)
		if err == nil && cond(v) {
			return v, nil
		}
		if err == nil && time.Now().After(deadline) {
			err = fmt.Errorf("metric %s = %v, want %s within %v", name, v, want, timeout)
		}
		if err != nil && time.Now().After(deadline) {
			return v, err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// relayedBytes is tungate's count of TCP bytes relayed, both directions.
func (g *gateway) relayedBytes() (float64, error) {
	up, err := g.metric("tungate_tcp_bytes_up_total")
	if err != nil {
		return 0, err
	}
	down, err := g.metric("tungate_tcp_bytes_down_total")
	return up + down, err
}

// cpuSeconds returns tungate's user plus system CPU time so far, from
// /proc/PID/stat.
func (g *gateway) cpuSeconds() (float64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", g.pid()))
	if err != nil {
		return 0, err
	}
	// pid (comm) state ppid …: comm may hold spaces and parentheses, so
	// split after the last ')'. Then field 3 (state) is index 0, utime
	// (field 14) index 11, stime (field 15) index 12.
	s := string(raw)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no ')' in %q", g.pid(), s)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields after comm", g.pid(), len(f))
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: utime %q stime %q", g.pid(), f[11], f[12])
	}
	return float64(utime+stime) / userHZ, nil
}

// rssKiB returns tungate's resident set (VmRSS) in KiB.
func (g *gateway) rssKiB() (float64, error) {
	path := fmt.Sprintf("/proc/%d/status", g.pid())
	raw, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(raw), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest) // "123456 kB"
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("%s: bad VmRSS line %q", path, line)
			}
			return strconv.ParseFloat(f[0], 64)
		}
	}
	return 0, fmt.Errorf("%s: no VmRSS", path)
}

// checkRouting proves the two paths are what they claim: connections to
// remote 1 (v4 and v6) become tungate flows, connections to remote 9 do
// not. echo is a TCP echo server's port, listening on the wildcard in wan.
func (g *gateway) checkRouting(echo uint16) error {
	base, err := g.metric("tungate_tcp_flows_total")
	if err != nil {
		return err
	}
	echoVia := func(dst netip.Addr) error {
		c, err := g.lab.App.DialTimeout("tcp", netip.AddrPortFrom(dst, echo).String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte{'r'}); err != nil {
			return err
		}
		var b [1]byte
		if _, err := c.Read(b[:]); err != nil || b[0] != 'r' {
			return fmt.Errorf("echo from %s: %q, %v", dst, b[:], err)
		}
		return nil
	}
	for _, dst := range []netip.Addr{netlab.Remote4(tungateRemote), netlab.Remote6(tungateRemote)} {
		if err := echoVia(dst); err != nil {
			return fmt.Errorf("tungate path to %s: %w", dst, err)
		}
	}
	if _, err := g.waitMetric("tungate_tcp_flows_total", 5*time.Second, fmt.Sprint(base+2), func(v float64) bool { return v == base+2 }); err != nil {
		return fmt.Errorf("2 connections to remote %d did not become 2 tungate flows: %w", tungateRemote, err)
	}
	for _, dst := range []netip.Addr{netlab.Remote4(kernelRemote), netlab.Remote6(kernelRemote)} {
		if err := echoVia(dst); err != nil {
			return fmt.Errorf("kernel path to %s: %w", dst, err)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if v, err := g.metric("tungate_tcp_flows_total"); err != nil || v != base+2 {
		return fmt.Errorf("connections to remote %d went through tungate: tungate_tcp_flows_total %v → %v (%v)", kernelRemote, base+2, v, err)
	}
	return nil
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
