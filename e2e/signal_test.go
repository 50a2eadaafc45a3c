//go:build linux

package e2e

import (
	"testing"

	"golang.org/x/sys/unix"
)

// TestStopSignals: every signal that ends tungate — SIGINT (Ctrl-C),
// SIGTERM, SIGQUIT (Ctrl-\) — makes it exit 0 with its routes, rules and
// journal undone, and SIGHUP (a closed terminal) does not end it: without
// --config there is nothing to reload, so it says so and keeps routing.
func TestStopSignals(t *testing.T) {
	for _, sig := range []unix.Signal{unix.SIGINT, unix.SIGTERM, unix.SIGQUIT} {
		t.Run(unix.SignalName(sig), func(t *testing.T) {
			lab := hostLab(t)
			lab.Wan.TCPEcho(t, remote4(1, 7))
			before := routingState(t, lab.App)
			g := startAuto(t, lab, autoConfig(t))
			flows := g.metric("tungate_tcp_flows_total")
			echo(t, lab, remote4(1, 7))
			g.wantFlows(flows+1, "a flow through the TUN")
			g.stopWith(sig)
			waitState(t, lab.App, before, "after "+unix.SignalName(sig))
		})
	}
}
