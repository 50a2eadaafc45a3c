//go:build linux

package netmon

import (
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// changeWait bounds how long a kernel change takes to reach a subscriber.
const changeWait = 3 * time.Second

// nextChange returns the next change the subscriber got, failing t after
// changeWait.
func nextChange(t *testing.T, ch <-chan Change, after string) Change {
	t.Helper()
	select {
	case c := <-ch:
		return c
	case <-time.After(changeWait):
		t.Fatalf("after %s: no change within %v", after, changeWait)
		return Change{}
	}
}

// expectChange runs a command in ns and checks the one change it causes.
func expectChange(t *testing.T, ns *netlab.NS, ch <-chan Change, want Change, args ...string) {
	t.Helper()
	ns.MustRun(t, args[0], args[1:]...)
	what := strings.Join(args, " ")
	got := nextChange(t, ch, what)
	if got.Old != want.Old || got.New != want.New || !slices.Equal(got.Gone, want.Gone) {
		t.Fatalf("after %s: change %+v, want %+v", what, got, want)
	}
}

// monitorGoroutines lists the running goroutines that belong to a
// Monitor or to its netlink subscriptions.
func monitorGoroutines() []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var left []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, "vishvananda/netlink") || strings.Contains(g, "tungate/netmon.(*Monitor)") {
			left = append(left, g)
		}
	}
	return left
}

// checkNoGoroutines fails t if Monitor goroutines outlive Close by more
// than a moment.
func checkNoGoroutines(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for {
		left := monitorGoroutines()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines left after Close:\n%s", len(left), strings.Join(left, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMonitorNetns follows real netlink events in a lab's app namespace:
// defaults added and replaced, a default into an ignored device, links
// set down, deconfigured and deleted.
func TestMonitorNetns(t *testing.T) {
	lab := netlab.New(t)
	app := lab.App
	// A second uplink (veth1, its peer in wan) and a stand-in for the TUN
	// (tgtun, both ends in app), all inside the lab.
	app.MustRun(t, "ip", "link", "add", "veth1", "type", "veth", "peer", "name", "veth1", "netns", lab.Wan.Name)
	app.MustRun(t, "ip", "addr", "add", "10.233.2.1/24", "dev", "veth1")
	app.MustRun(t, "ip", "link", "set", "veth1", "up")
	lab.Wan.MustRun(t, "ip", "addr", "add", "10.233.2.2/24", "dev", "veth1")
	lab.Wan.MustRun(t, "ip", "link", "set", "veth1", "up")
	app.MustRun(t, "ip", "link", "add", "tgtun", "type", "veth", "peer", "name", "tgtunp")
	app.MustRun(t, "ip", "link", "set", "tgtun", "up")

	var m *Monitor
	if err := app.Do(func() error {
		m = New(Config{Ignore: []string{"tgtun"}}, nil)
		return m.Start()
	}); err != nil {
		t.Fatalf("Start in %s: %v", app.Name, err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			m.Close()
		}
	})
	changes := make(chan Change, 64)
	m.Subscribe(func(c Change) { changes <- c })

	// The lab's app namespace has no default route, whatever the test's
	// own namespace has.
	if got := m.State(); got != (State{}) {
		t.Fatalf("initial state %+v, want no default", got)
	}

	v0 := State{Default4: "veth0"}
	expectChange(t, app, changes, Change{New: v0},
		"ip", "route", "add", "default", "via", "10.233.0.2", "metric", "100")
	if got := m.Default(false); got != "veth0" {
		t.Errorf("Default(IPv4) = %q, want veth0", got)
	}

	// A better default into the ignored device changes nothing: the
	// next change seen is the replacement's.
	app.MustRun(t, "ip", "route", "add", "default", "dev", "tgtun", "metric", "10")
	v1 := State{Default4: "veth1"}
	expectChange(t, app, changes, Change{Old: v0, New: v1},
		"ip", "route", "replace", "default", "via", "10.233.2.2", "dev", "veth1", "metric", "100")

	v1v6 := State{Default4: "veth1", Default6: "veth0"}
	expectChange(t, app, changes, Change{Old: v1, New: v1v6},
		"ip", "-6", "route", "add", "default", "via", "fd00:233::2", "dev", "veth0")

	// veth1 down: its routes go, IPv4 has no default left (the ignored
	// device's does not count), and veth1 is gone for IPv4 (it never
	// carried IPv6: a link-local route does not count).
	v6only := State{Default6: "veth0"}
	expectChange(t, app, changes, Change{Old: v1v6, New: v6only, Gone: []Gone{{"veth1", false, ReasonDown}}},
		"ip", "link", "set", "veth1", "down")

	// veth0 loses its IPv4 configuration (with its last address the
	// kernel drops every IPv4 route through it) but keeps IPv6.
	app.MustRun(t, "ip", "-4", "addr", "flush", "dev", "veth0")
	c := nextChange(t, changes, "ip -4 addr flush dev veth0")
	if c.Old != v6only || c.New != v6only || !slices.Equal(c.Gone, []Gone{{"veth0", false, ReasonUnrouted}}) {
		t.Fatalf("after the IPv4 flush: change %+v, want veth0 gone for IPv4 (unrouted) only", c)
	}

	expectChange(t, app, changes, Change{Old: v6only, Gone: []Gone{{"veth0", true, ReasonDeleted}}},
		"ip", "link", "del", "veth0")

	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	closed = true
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	checkNoGoroutines(t)
	select {
	case c := <-changes:
		t.Errorf("a change after Close: %+v", c)
	default:
	}
}

// TestMonitorStartClose: Start and Close in a row, many times, leave no
// goroutine and no socket behind.
func TestMonitorStartClose(t *testing.T) {
	lab := netlab.New(t)
	for range 20 {
		var m *Monitor
		if err := lab.App.Do(func() error {
			m = New(Config{}, nil)
			return m.Start()
		}); err != nil {
			t.Fatalf("Start: %v", err)
		}
		if err := m.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
	checkNoGoroutines(t)
}
