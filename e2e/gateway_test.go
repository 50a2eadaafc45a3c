//go:build linux

package e2e

import (
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/netlab"
)

// tungateBin is the tungate binary under test: $TUNGATE_BIN, or built once by
// TestMain.
var tungateBin string

func TestMain(m *testing.M) {
	code := func() int {
		tungateBin = os.Getenv("TUNGATE_BIN")
		if tungateBin == "" {
			dir, err := os.MkdirTemp("", "tungate-e2e")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
			defer os.RemoveAll(dir)
			tungateBin = filepath.Join(dir, "tungate")
			out, err := exec.Command("go", "build", "-o", tungateBin, "../cmd/tungate").CombinedOutput()
			if err != nil {
				fmt.Fprintf(os.Stderr, "building tungate: %v\n%s", err, out)
				return 1
			}
		}
		return m.Run()
	}()
	os.Exit(code)
}

const (
	tunName   = "tg0"
	apiAddr   = "127.0.0.1:9090"
	fwmark    = 0x2e7
	routeTab  = 100
	rulePrio  = 100
	startWait = 10 * time.Second
)

// gateway is a running tungate inside a lab's app namespace.
type gateway struct {
	t    testing.TB
	lab  *netlab.Lab
	proc *netlab.Proc
	http *http.Client
	// config is the file tungate was started with (--config), which it
	// re-reads on SIGHUP.
	config string
}

// baseConfig is the configuration every test starts from: a TUN in the app
// namespace, the direct outbound, the API on the namespace's loopback, and
// no DNS or auto-route (those belong to other tests).
func baseConfig() map[string]any {
	offload := "auto"
	if v := os.Getenv("TUNGATE_E2E_OFFLOAD"); v != "" {
		offload = v
	}
	return map[string]any{
		"log": map[string]any{"level": "debug"},
		"tun": map[string]any{
			"name":    tunName,
			"mtu":     9000,
			"address": []string{"172.19.0.1/30", "fdfe:dcba:9876::1/126"},
			"offload": offload,
		},
		"outbounds": []any{map[string]any{"name": "direct", "type": "direct", "fwmark": fwmark}},
		"dns":       map[string]any{"enabled": false},
		"route":     map[string]any{"auto": false},
		"api":       map[string]any{"listen": apiAddr},
	}
}

// startGateway writes cfg, starts tungate in lab.App and routes the app
// namespace's traffic into its TUN: a table with default routes into the
// TUN and `not fwmark <mark>` rules sending everything else there.
func startGateway(t testing.TB, lab *netlab.Lab, cfg map[string]any) *gateway {
	t.Helper()
	path := writeYAML(t, cfg)
	g := &gateway{t: t, lab: lab, config: path}
	g.proc = lab.App.Start(t, tungateBin, "run", "--config", path)
	lab.App.WaitLink(t, tunName, true, startWait)
	lab.App.RouteIntoTUN(t, tunName, routeTab, fwmark, rulePrio)
	g.http = lab.App.HTTPClient()
	lab.App.WaitHealthy(t, g.proc, apiAddr, startWait)
	return g
}

// metric returns the current value of a Prometheus metric without labels.
func (g *gateway) metric(name string) float64 {
	g.t.Helper()
	v, err := g.lab.App.Metric(apiAddr, name)
	if err != nil {
		g.t.Fatal(err)
	}
	return v
}

// waitMetric polls until cond holds for the metric, failing after timeout.
func (g *gateway) waitMetric(name string, timeout time.Duration, desc string, cond func(float64) bool) float64 {
	g.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		v := g.metric(name)
		if cond(v) {
			return v
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("metric %s = %v, want %s within %v", name, v, desc, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop sends SIGTERM and checks tungate exits 0 within 5 s.
func (g *gateway) stop() { g.stopWith(unix.SIGTERM) }

// stopWith sends sig and checks tungate exits 0 within 5 s.
func (g *gateway) stopWith(sig unix.Signal) {
	g.t.Helper()
	start := time.Now()
	name := unix.SignalName(sig)
	if err := g.proc.Signal(sig); err != nil {
		g.t.Fatalf("%s: %v", name, err)
	}
	exited, err := g.proc.Wait(5 * time.Second)
	if !exited {
		g.t.Fatalf("tungate still running 5 s after %s\n%s", name, g.proc.Log())
	}
	if err != nil {
		g.t.Fatalf("tungate exit after %s: %v\n%s", name, err, g.proc.Log())
	}
	g.t.Logf("tungate stopped by %s in %v", name, time.Since(start).Round(time.Millisecond))
}

func remote4(i int, port int) string {
	return netip.AddrPortFrom(netlab.Remote4(i), uint16(port)).String()
}

func remote6(i int, port int) string {
	return netip.AddrPortFrom(netlab.Remote6(i), uint16(port)).String()
}
