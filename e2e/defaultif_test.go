//go:build linux

package e2e

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// Default-interface tests: with `interface: ""` the direct outbound binds
// each new socket to the interface of the app namespace's default route
// (main table), follows it when it moves, and resets the flows on an
// interface that vanishes.

// The app namespace's second uplink: veth1 to wan, 10.233.2.0/24 and
// fd00:233:2::/64, next to the lab's veth0 (10.233.0.0/24, fd00:233::/64).
const uplink2 = "veth1"

var (
	app2Addr4 = netip.MustParseAddr("10.233.2.1")
	wan2Addr4 = netip.MustParseAddr("10.233.2.2")
	app2Addr6 = netip.MustParseAddr("fd00:233:2::1")
	wan2Addr6 = netip.MustParseAddr("fd00:233:2::2")
)

// twoUplinkLab is hostLab (the app namespace's default routes via veth0)
// with a second veth pair between app and wan. The pair is created from
// inside app with its peer placed straight into wan: nothing of it ever
// exists in the test's own namespace.
func twoUplinkLab(t *testing.T) *netlab.Lab {
	t.Helper()
	lab := hostLab(t)
	lab.App.MustRun(t, "ip", "link", "add", uplink2, "type", "veth", "peer", "name", uplink2, "netns", lab.Wan.Name)
	for _, side := range []struct {
		ns     *netlab.NS
		a4, a6 netip.Addr
	}{{lab.App, app2Addr4, app2Addr6}, {lab.Wan, wan2Addr4, wan2Addr6}} {
		side.ns.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(side.a4, 24).String(), "dev", uplink2)
		side.ns.MustRun(t, "ip", "-6", "addr", "add", netip.PrefixFrom(side.a6, 64).String(), "dev", uplink2, "nodad")
		side.ns.MustRun(t, "ip", "link", "set", uplink2, "up")
	}
	// Packets sent before the kernel's link watcher activates a veth are
	// dropped: wait until both ends are operationally up.
	deadline := time.Now().Add(10 * time.Second)
	for _, ns := range []*netlab.NS{lab.App, lab.Wan} {
		for {
			state := strings.TrimSpace(ns.MustRun(t, "cat", "/sys/class/net/"+uplink2+"/operstate"))
			if state == "up" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s in %s is %q after 10 s", uplink2, ns.Name, state)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	settled(t, lab.App, uplink2)
	return lab
}

// sourceServer listens on addr in ns and, on every connection, first
// writes the address the connection came from (a line), then echoes.
// t.Cleanup closes it and its connections and waits for its goroutines.
func sourceServer(t *testing.T, ns *netlab.NS, addr string) {
	t.Helper()
	ns.ServeTCP(t, addr, func(c net.Conn) {
		from := netip.MustParseAddrPort(c.RemoteAddr().String()).Addr().Unmap()
		if _, err := io.WriteString(c, from.String()+"\n"); err != nil {
			return
		}
		io.Copy(c, c)
	})
}

// flow is one app connection to a sourceServer.
type flow struct {
	net.Conn
	r *bufio.Reader
	// src is the address the server saw: which uplink carried the flow.
	src netip.Addr
}

// openFlow connects from the app namespace and reads the source address
// the server saw.
func openFlow(t *testing.T, lab *netlab.Lab, addr string) *flow {
	t.Helper()
	c := dialApp(t, lab, addr)
	t.Cleanup(func() { c.Close() })
	f := &flow{Conn: c, r: bufio.NewReader(c)}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	line, err := f.r.ReadString('\n')
	if err != nil {
		t.Fatalf("flow to %s: reading the source line: %v", addr, err)
	}
	if f.src, err = netip.ParseAddr(strings.TrimSpace(line)); err != nil {
		t.Fatalf("flow to %s: source line %q: %v", addr, line, err)
	}
	c.SetReadDeadline(time.Time{})
	return f
}

// wantSource opens a flow to addr and checks the uplink it left by.
func wantSource(t *testing.T, lab *netlab.Lab, addr string, want netip.Addr, what string) *flow {
	t.Helper()
	f := openFlow(t, lab, addr)
	if f.src != want {
		t.Fatalf("%s: a new flow to %s left from %s, want %s", what, addr, f.src, want)
	}
	return f
}

// echoes checks that the flow still carries bytes both ways.
func (f *flow) echoes(t *testing.T, what string) {
	t.Helper()
	f.SetDeadline(time.Now().Add(5 * time.Second))
	defer f.SetDeadline(time.Time{})
	msg := "ping " + what + "\n"
	if _, err := io.WriteString(f, msg); err != nil {
		t.Fatalf("%s: write: %v", what, err)
	}
	got, err := f.r.ReadString('\n')
	if err != nil || got != msg {
		t.Fatalf("%s: echo %q, %v; want %q", what, got, err, msg)
	}
}

// stillOpen checks that nothing ends the flow for a while.
func (f *flow) stillOpen(t *testing.T, d time.Duration, what string) {
	t.Helper()
	f.SetReadDeadline(time.Now().Add(d))
	defer f.SetReadDeadline(time.Time{})
	if _, err := f.r.ReadByte(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: the flow ended (%v), want it left open", what, err)
	}
}

// ended checks that the flow is reset (or closed) within d of start, as
// an app sees it.
func (f *flow) ended(t *testing.T, start time.Time, d time.Duration, what string) {
	t.Helper()
	f.SetReadDeadline(start.Add(d))
	_, err := f.r.ReadByte()
	switch {
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.EOF):
		t.Logf("%s: the app saw %v after %v", what, err, time.Since(start).Round(time.Millisecond))
	case errors.Is(err, os.ErrDeadlineExceeded):
		t.Fatalf("%s: the flow still open %v later, want a reset", what, d)
	default:
		t.Fatalf("%s: read %v, want a reset", what, err)
	}
}

// moveDefault replaces the app namespace's main-table default routes with
// ones via the second uplink.
func moveDefault(t *testing.T, lab *netlab.Lab) {
	t.Helper()
	lab.App.MustRun(t, "ip", "route", "replace", "default", "via", wan2Addr4.String(), "dev", uplink2)
	lab.App.MustRun(t, "ip", "-6", "route", "replace", "default", "via", wan2Addr6.String(), "dev", uplink2)
}

// TestDefaultInterface: new flows leave by the default route's interface,
// follow it when the default moves to another uplink (no restart), and
// flows on an uplink that is deleted are reset at once.
func TestDefaultInterface(t *testing.T) {
	lab := twoUplinkLab(t)
	addr4, addr6 := remote4(1, 7070), remote6(1, 7070)
	sourceServer(t, lab.Wan, addr4)
	sourceServer(t, lab.Wan, addr6)
	udpSenders := recordingUDPServer(t, lab.Wan, remote4(1, 7071))

	cfg := autoConfig(t) // the direct outbound: fwmark set, interface ""
	g := startAuto(t, lab, cfg)
	waitLog(t, g.proc, "ipv4=veth0 ipv6=veth0", startWait)
	flows := g.metric("tungate_tcp_flows_total")

	old4 := wantSource(t, lab, addr4, netlab.AppAddr4, "default via veth0")
	old6 := wantSource(t, lab, addr6, netlab.AppAddr6, "default via veth0")
	g.wantFlows(flows+2, "both flows went through tungate")
	udpFrom := func(what string) netip.Addr {
		t.Helper()
		c := listenApp(t, lab, "udp4")
		if _, err := c.WriteToUDPAddrPort([]byte("ping"), netip.MustParseAddrPort(remote4(1, 7071))); err != nil {
			t.Fatal(err)
		}
		if _, _, err := readFrom(c, 5*time.Second); err != nil {
			t.Fatalf("%s: UDP echo: %v", what, err)
		}
		return (<-udpSenders).Addr().Unmap()
	}
	if src := udpFrom("default via veth0"); src != netlab.AppAddr4 {
		t.Errorf("a UDP session left from %s, want %s", src, netlab.AppAddr4)
	}

	moveDefault(t, lab)
	waitLog(t, g.proc, "family=ipv4 from=veth0 to=veth1", 3*time.Second)
	waitLog(t, g.proc, "family=ipv6 from=veth0 to=veth1", 3*time.Second)
	new4 := wantSource(t, lab, addr4, app2Addr4, "default moved to veth1")
	new6 := wantSource(t, lab, addr6, app2Addr6, "default moved to veth1")
	if src := udpFrom("default moved to veth1"); src != app2Addr4 {
		t.Errorf("a new UDP session left from %s, want %s", src, app2Addr4)
	}
	// veth0 still has its LAN: its flows are left alone.
	old4.stillOpen(t, 300*time.Millisecond, "veth0's IPv4 flow after the move")
	old6.stillOpen(t, 300*time.Millisecond, "veth0's IPv6 flow after the move")

	deleted := time.Now()
	lab.App.MustRun(t, "ip", "link", "del", netlab.VethName)
	old4.ended(t, deleted, 3*time.Second, "veth0's IPv4 flow after veth0 was deleted")
	old6.ended(t, deleted, 3*time.Second, "veth0's IPv6 flow after veth0 was deleted")
	// IPv4: the TCP flow and the UDP session opened before the move.
	waitLog(t, g.proc, "interface=veth0 family=ipv4 reason=deleted flows=2", 3*time.Second)
	waitLog(t, g.proc, "interface=veth0 family=ipv6 reason=deleted flows=1", 3*time.Second)
	new4.echoes(t, "veth1's IPv4 flow after veth0 was deleted")
	new6.echoes(t, "veth1's IPv6 flow after veth0 was deleted")
	wantSource(t, lab, addr4, app2Addr4, "after veth0 was deleted")

	log := g.proc.Log()
	if n := strings.Count(log, "default interface changed"); n != 2 {
		t.Errorf("%d default-interface change lines, want 2 (one per family):\n%s", n, log)
	}
	g.stop()
}

// TestDefaultInterfaceUnmarked: a direct outbound without a fwmark sends
// its sockets back into the TUN under auto-route unless they are bound to
// the physical interface; bound to the default interface, its flows leave
// by it and follow it when it moves.
func TestDefaultInterfaceUnmarked(t *testing.T) {
	lab := twoUplinkLab(t)
	addr4, addr6 := remote4(1, 7070), remote6(1, 7070)
	sourceServer(t, lab.Wan, addr4)
	sourceServer(t, lab.Wan, addr6)
	cfg := autoConfig(t)
	cfg["outbounds"] = []any{map[string]any{"name": "direct", "type": "direct", "fwmark": 0}}
	g := startAuto(t, lab, cfg)
	waitLog(t, g.proc, "ipv4=veth0 ipv6=veth0", startWait)
	refused := g.metric("tungate_tcp_refused_total")

	wantSource(t, lab, addr4, netlab.AppAddr4, "unmarked, default via veth0")
	wantSource(t, lab, addr6, netlab.AppAddr6, "unmarked, default via veth0")
	moveDefault(t, lab)
	waitLog(t, g.proc, "family=ipv6 from=veth0 to=veth1", 3*time.Second)
	wantSource(t, lab, addr4, app2Addr4, "unmarked, default moved to veth1")
	wantSource(t, lab, addr6, app2Addr6, "unmarked, default moved to veth1")
	if v := g.metric("tungate_tcp_refused_total"); v != refused {
		t.Errorf("tungate_tcp_refused_total went from %v to %v: a flow looped", refused, v)
	}
	g.stop()
}
