//go:build linux

package netlab

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

func TestRemoteAddrs(t *testing.T) {
	if got, want := Remote4(1), netip.MustParseAddr("10.233.1.1"); got != want {
		t.Errorf("Remote4(1) = %v, want %v", got, want)
	}
	if got, want := Remote6(9), netip.MustParseAddr("fd00:233:1::9"); got != want {
		t.Errorf("Remote6(9) = %v, want %v", got, want)
	}
	for _, i := range []int{0, 10} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("Remote4(%d) did not panic", i)
				}
			}()
			Remote4(i)
		}()
	}
}

func TestParseProcNetAddr(t *testing.T) {
	// Rows as a little-endian kernel (amd64) writes them.
	if !littleEndian() {
		t.Skip("test vectors are for little-endian machines")
	}
	for _, tc := range []struct{ in, want string }{
		{"0100007F:0035", "127.0.0.1:53"},
		{"0101E90A:0007", "10.233.1.1:7"},
		{"00000000:1F90", "0.0.0.0:8080"},
		{"00000000000000000000000000000000:0035", "[::]:53"},
		{"330200FD000001000000000001000000:0007", "[fd00:233:1::1]:7"},
	} {
		got, err := parseProcNetAddr(tc.in)
		if err != nil {
			t.Errorf("parseProcNetAddr(%q): %v", tc.in, err)
			continue
		}
		if got.String() != tc.want {
			t.Errorf("parseProcNetAddr(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestUDPWantMatches(t *testing.T) {
	for _, tc := range []struct {
		want, local string
		ok          bool
	}{
		{"10.233.1.1:53", "10.233.1.1:53", true},
		{"10.233.1.1:53", "10.233.1.2:53", false},
		{"10.233.1.1:53", "10.233.1.1:54", false},
		{"10.233.1.1:53", "0.0.0.0:53", true},
		{"10.233.1.1:53", "[::]:53", true},
		{"[fd00:233:1::1]:53", "0.0.0.0:53", false},
		{"[fd00:233:1::1]:53", "[::]:53", true},
		{":53", "10.233.1.3:53", true},
		{"0.0.0.0:53", "[fd00:233:1::1]:53", true},
	} {
		w, err := parseUDPWant(tc.want)
		if err != nil {
			t.Fatalf("parseUDPWant(%q): %v", tc.want, err)
		}
		if got := w.matches(netip.MustParseAddrPort(tc.local)); got != tc.ok {
			t.Errorf("want %s, bound %s: match = %v, want %v", tc.want, tc.local, got, tc.ok)
		}
	}
}

// echoTCP sends payload over a fresh connection from app to addr, half-closes,
// and checks that exactly the same bytes come back before EOF.
func echoTCP(t *testing.T, lab *Lab, addr string, payload []byte) {
	t.Helper()
	c, err := lab.App.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("DialTimeout(tcp, %s): %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		t.Fatalf("read echo from %s: %v", addr, err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("write to %s: %v", addr, err)
	}
	want := sha256.Sum256(payload)
	if n != int64(len(payload)) || !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatalf("echo from %s: got %d bytes (sha256 %x), want %d (sha256 %x)", addr, n, h.Sum(nil), len(payload), want)
	}
	if got, want := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(), appAddrFor(addr); got != want {
		t.Errorf("connection to %s left from %v, want %v", addr, got, want)
	}
}

func appAddrFor(addr string) netip.Addr {
	if netip.MustParseAddrPort(addr).Addr().Is4() {
		return AppAddr4
	}
	return AppAddr6
}

func TestLabEcho(t *testing.T) {
	t.Parallel()
	lab := New(t)

	payload := make([]byte, 1<<20)
	rand.Read(payload)
	for _, remote := range []netip.Addr{Remote4(1), Remote6(1), Remote4(9), Remote6(9)} {
		addr := netip.AddrPortFrom(remote, 7).String()
		lab.Wan.TCPEcho(t, addr)
		lab.Wan.WaitListen(t, "tcp", addr, 5*time.Second)
		echoTCP(t, lab, addr, payload)

		lab.Wan.UDPEcho(t, addr)
		lab.Wan.WaitListen(t, "udp", addr, 5*time.Second)
		c, err := lab.App.Dial("udp", addr)
		if err != nil {
			t.Fatalf("Dial(udp, %s): %v", addr, err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		for i := range 10 {
			msg := payload[i*1000 : i*1000+1000+i]
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("udp write to %s: %v", addr, err)
			}
			buf := make([]byte, 2000)
			m, err := c.Read(buf)
			if err != nil {
				t.Fatalf("udp read from %s: %v", addr, err)
			}
			if !bytes.Equal(buf[:m], msg) {
				t.Fatalf("udp echo %d from %s: got %d bytes, want %d equal bytes", i, addr, m, len(msg))
			}
		}
		c.Close()
	}

	// Unrouted: app has no default route, so anything outside the lab is
	// unreachable without a packet leaving.
	_, err := lab.App.DialTimeout("tcp", "10.233.2.1:7", time.Second)
	if !errors.Is(err, syscall.ENETUNREACH) {
		t.Errorf("dial outside the lab's routes: %v, want ENETUNREACH", err)
	}
	// Nothing on a port: refused, from the remote host itself.
	_, err = lab.App.DialTimeout("tcp", netip.AddrPortFrom(Remote4(2), 9).String(), time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial closed port: %v, want ECONNREFUSED", err)
	}
}

func TestNSHelpers(t *testing.T) {
	t.Parallel()
	lab := New(t)

	// Do runs inside the namespace: the veth address is local there.
	err := lab.App.Do(func() error {
		ifi, err := net.InterfaceByName(VethName)
		if err != nil {
			return err
		}
		addrs, err := ifi.Addrs()
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr() == AppAddr4 {
				return nil
			}
		}
		return fmt.Errorf("%v not on %s: %v", AppAddr4, VethName, addrs)
	})
	if err != nil {
		t.Fatalf("App.Do: %v", err)
	}

	// A panic inside Do reaches the caller.
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recover() = %v, want boom", r)
			}
		}()
		lab.App.Do(func() error { panic("boom") })
	}()

	// Run: output and errors.
	out := lab.Wan.MustRun(t, "cat", "/proc/net/if_inet6")
	if !strings.Contains(out, "fd000233000100000000000000000001") {
		t.Errorf("wan's /proc/net/if_inet6 lacks fd00:233:1::1:\n%s", out)
	}
	_, err = lab.Wan.Run(context.Background(), "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3")
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 || !strings.Contains(err.Error(), "to-stdout") || !strings.Contains(err.Error(), "to-stderr") {
		t.Errorf("Run(exit 3) error = %v, want exit status 3 with the output", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	start := time.Now()
	_, err = lab.Wan.Run(ctx, "sleep", "30")
	cancel()
	if err == nil || time.Since(start) > 5*time.Second {
		t.Errorf("Run(sleep 30) with a 200ms context: err %v after %v", err, time.Since(start))
	}

	// WaitLink, and Netlink handles see the namespace.
	lab.App.WaitLink(t, VethName, true, 5*time.Second)
	h := lab.Wan.Netlink(t)
	routes, err := h.RouteGet(Remote4(3).AsSlice())
	if err != nil || len(routes) != 1 || routes[0].Type != syscall.RTN_LOCAL {
		t.Errorf("wan RouteGet(%v) = %+v, %v, want one local route", Remote4(3), routes, err)
	}
	app := lab.App.Netlink(t)
	routes, err = app.RouteGet(Remote6(3).AsSlice())
	if err != nil || len(routes) != 1 || !net.IP(WanAddr6.AsSlice()).Equal(routes[0].Gw) {
		t.Errorf("app RouteGet(%v) = %+v, %v, want one route via %v", Remote6(3), routes, err, WanAddr6)
	}
	// A link the test adds through its handle shows up in WaitLink.
	if err := app.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "tgx0"}, PeerName: "tgx1"}); err != nil {
		t.Fatalf("add veth in app: %v", err)
	}
	lab.App.WaitLink(t, "tgx1", false, 5*time.Second)

	// Start, Log, Wait, Exited, Stop.
	p := lab.Wan.Start(t, "sh", "-c", "echo started; exec sleep 60")
	if p.Exited() {
		t.Fatal("sleep exited at once")
	}
	if exited, _ := p.Wait(100 * time.Millisecond); exited {
		t.Fatal("Wait without a signal: sleep exited")
	}
	if err := p.Stop(2 * time.Second); !isSignal(err, syscall.SIGTERM) {
		t.Errorf("Stop: %v, want signal: terminated", err)
	}
	if !p.Exited() {
		t.Error("Exited() false after Stop")
	}
	if err2 := p.Stop(time.Second); err2 == nil || err2.Error() != "signal: terminated" {
		t.Errorf("second Stop: %v", err2)
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Errorf("Signal after exit: %v, want os.ErrProcessDone", err)
	}
	if got := p.Log(); got != "started\n" {
		t.Errorf("Log() = %q, want %q", got, "started\n")
	}

	// A process that ignores SIGTERM is killed after the timeout, with its
	// child.
	p = lab.Wan.Start(t, "sh", "-c", `trap "" TERM; sleep 60 & echo $!; wait`)
	child := waitLogPid(t, p)
	start = time.Now()
	if err := p.Stop(300 * time.Millisecond); !isSignal(err, syscall.SIGKILL) {
		t.Errorf("Stop of a TERM-ignoring process: %v, want signal: killed", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond || d > 5*time.Second {
		t.Errorf("Stop took %v, want about 300ms", d)
	}
	waitGone(t, child)

	// A process exiting 0 by itself.
	p = lab.Wan.Start(t, "true")
	if exited, err := p.Wait(5 * time.Second); !exited || err != nil {
		t.Errorf("Wait(true) = %v, %v; want true, nil", exited, err)
	}
	if err := p.Stop(time.Second); err != nil {
		t.Errorf("Stop after exit 0: %v", err)
	}

	// The started process runs inside wan: it sees wan's lo addresses.
	p = lab.Wan.Start(t, "sh", "-c", "cat /proc/net/if_inet6; exec sleep 60")
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(p.Log(), "fd000233000100000000000000000009") {
		if time.Now().After(deadline) {
			t.Fatalf("started process does not see wan's addresses; log:\n%s", p.Log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func littleEndian() bool {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], 1)
	return b[0] == 1
}

func isSignal(err error, sig syscall.Signal) bool {
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) {
		return false
	}
	ws, ok := exitErr.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// waitLogPid waits for the first line of p's log, a pid.
func waitLogPid(t *testing.T, p *Proc) int {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if line, _, ok := strings.Cut(p.Log(), "\n"); ok {
			pid, err := strconv.Atoi(line)
			if err != nil {
				t.Fatalf("log line %q: %v", line, err)
			}
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatalf("no pid in log after 5s: %q", p.Log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// waitGone waits until pid no longer names a live process. A zombie counts
// as gone only once reaped; a pid reused by another program counts as gone.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := syscall.Kill(pid, 0)
		if errors.Is(err, syscall.ESRCH) {
			return
		}
		state := procState(pid)
		if state == "Z" || state == "" {
			return // dead: a zombie of some parent, or gone meanwhile
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still alive (state %s, cmdline %q)", pid, state, procCmdline(pid))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func procState(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2 : i+3]
	}
	return ""
}

func procCmdline(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return strings.ReplaceAll(string(b), "\x00", " ")
}

func TestCleanup(t *testing.T) {
	t.Parallel()
	var names []string
	var pid int
	var conn net.Conn
	ok := t.Run("lab", func(t *testing.T) {
		lab := New(t)
		names = []string{lab.App.Name, lab.Wan.Name}
		for _, n := range names {
			if !strings.HasPrefix(n, "tgl"+strconv.Itoa(os.Getpid())+"-") {
				t.Errorf("namespace name %q not tgl<pid>-…", n)
			}
		}
		if !netnsListed(t, names[0]) || !netnsListed(t, names[1]) {
			t.Fatalf("ip netns list lacks %v", names)
		}
		p := lab.Wan.Start(t, "sleep", "60")
		pid = p.Cmd.Process.Pid
		// ip netns exec execs the program: the pid becomes sleep's.
		for deadline := time.Now().Add(5 * time.Second); procCmdline(pid) != "sleep 60 "; {
			if time.Now().After(deadline) {
				t.Fatalf("pid %d runs %q, want sleep 60", pid, procCmdline(pid))
			}
			time.Sleep(5 * time.Millisecond)
		}
		addr := lab.Wan.TCPEcho(t, netip.AddrPortFrom(Remote4(5), 7).String())
		var err error
		conn, err = lab.App.Dial("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		lab.App.Netlink(t)
	})
	if pid == 0 {
		if ok {
			t.Skip("lab sub-test skipped")
		}
		t.Fatal("lab sub-test failed before starting its process")
	}
	for _, n := range names {
		if netnsListed(t, n) {
			t.Errorf("namespace %s still listed after cleanup", n)
		}
		if _, err := os.Stat("/run/netns/" + n); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("/run/netns/%s: %v, want not exist", n, err)
		}
	}
	if pid != 0 {
		waitGone(t, pid)
	}
	// The echo server's side of the connection was closed by cleanup: the
	// client sees EOF or a reset, not a hang.
	if conn != nil {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := conn.Read(make([]byte, 1))
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("read from a connection to a removed lab: %v, want EOF or reset", err)
		}
		conn.Close()
	}
}

// TestCleanupAfterPanic builds a lab with a TB whose cleanups run when the
// function building it panics, as testing runs them when a test panics, and
// checks everything is removed.
func TestCleanupAfterPanic(t *testing.T) {
	t.Parallel()
	var names []string
	var pid int
	func() {
		defer func() {
			// nil: New skipped or failed t (runtime.Goexit); let it go on.
			if r := recover(); r != nil && r != "test panic" {
				t.Fatalf("recover() = %v", r)
			}
		}()
		ft := &cleanupTB{TB: t}
		defer ft.runCleanups()
		lab := New(ft)
		names = []string{lab.App.Name, lab.Wan.Name}
		pid = lab.Wan.Start(ft, "sleep", "60").Cmd.Process.Pid
		panic("test panic")
	}()
	for _, n := range names {
		if netnsListed(t, n) {
			t.Errorf("namespace %s still listed after cleanup", n)
		}
	}
	waitGone(t, pid)
}

// cleanupTB collects cleanups to run them at a point the test chooses.
type cleanupTB struct {
	testing.TB
	cleanups []func()
}

func (c *cleanupTB) Cleanup(f func()) { c.cleanups = append(c.cleanups, f) }

func (c *cleanupTB) TempDir() string { return c.TB.TempDir() }

func (c *cleanupTB) runCleanups() {
	for i := len(c.cleanups) - 1; i >= 0; i-- {
		c.cleanups[i]()
	}
}

func netnsListed(t *testing.T, name string) bool {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == name {
			return true
		}
	}
	return false
}

// rootSnapshot dumps what a lab must never change in the test's own
// namespace.
func rootSnapshot(t *testing.T) map[string]string {
	t.Helper()
	expires := regexp.MustCompile(`expires \S+`)
	snap := map[string]string{}
	for name, args := range map[string][]string{
		"links":   {"-o", "link", "show"},
		"rules4":  {"-4", "rule", "show"},
		"rules6":  {"-6", "rule", "show"},
		"routes4": {"-4", "route", "show", "table", "all"},
		"routes6": {"-6", "route", "show", "table", "all"},
		"addrs":   {"-o", "addr", "show"},
	} {
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip %v: %v: %s", args, err, out)
		}
		s := string(out)
		if name == "links" {
			// Names only: counters and states move on their own.
			var names []string
			for _, line := range strings.Split(s, "\n") {
				if f := strings.Fields(line); len(f) > 1 {
					names = append(names, f[1])
				}
			}
			s = strings.Join(names, " ")
		}
		if name == "addrs" {
			var lines []string
			for _, line := range strings.Split(s, "\n") {
				if f := strings.Fields(line); len(f) > 3 {
					lines = append(lines, strings.Join(f[1:4], " "))
				}
			}
			s = strings.Join(lines, "\n")
		}
		snap[name] = expires.ReplaceAllString(s, "expires _")
	}
	return snap
}

func TestRootNamespaceUntouched(t *testing.T) {
	// Not parallel: other tests in this package build labs at the same
	// time and must not blur the comparison (they don't touch the root
	// namespace either, but a failure here should point at one lab).
	before := rootSnapshot(t)
	t.Run("lab", func(t *testing.T) {
		lab := New(t)
		lab.Wan.TCPEcho(t, netip.AddrPortFrom(Remote4(1), 7).String())
		echoTCP(t, lab, netip.AddrPortFrom(Remote4(1), 7).String(), []byte("hello"))
		during := rootSnapshot(t)
		compareSnapshots(t, "while a lab exists", before, during)
	})
	compareSnapshots(t, "after a lab was removed", before, rootSnapshot(t))
}

func compareSnapshots(t *testing.T, when string, before, after map[string]string) {
	t.Helper()
	for k, b := range before {
		if a := after[k]; a != b {
			t.Errorf("root namespace %s changed %s:\nbefore:\n%s\nafter:\n%s", k, when, b, a)
		}
	}
}

// TestDoRestoresThreads checks that after many concurrent Do calls no OS
// thread running ordinary goroutines is left inside a lab namespace.
func TestDoRestoresThreads(t *testing.T) {
	// Not parallel: a thread inside another test's Do is legitimately in
	// a lab namespace.
	orig, err := netns.GetFromPid(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	lab := New(t)
	addr := lab.Wan.TCPEcho(t, netip.AddrPortFrom(Remote4(6), 7).String()).String()

	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for range 200 {
		wg.Go(func() {
			c, err := lab.App.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			c.Close()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("dial %s from app: %v", addr, err)
	}

	// Every thread of the process is in the original namespace, apart
	// from those currently inside a Do (none now).
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		tid, _ := strconv.Atoi(task.Name())
		h, err := netns.GetFromThread(os.Getpid(), tid)
		if err != nil {
			continue // thread ended meanwhile
		}
		if !h.Equal(orig) {
			t.Errorf("thread %d is in namespace %v, want %v", tid, h, orig)
		}
		h.Close()
	}
}
