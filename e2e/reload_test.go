//go:build linux

package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/netlab"
)

// Live reload tests: `tungate run --config FILE` re-reads FILE on SIGHUP.
// A valid file swaps rules, outbounds and DNS policy, resetting only the
// flows whose outbound went away or changed; a file with errors is refused
// whole, one "reload refused" line an error; the process never exits on
// SIGHUP.

// reloadWait bounds how long a reload may take to show in the log.
const reloadWait = 5 * time.Second

// logFields renders the fields of a line of tungate's log (log.format:
// text) as slog's text handler writes them: level=LEVEL, msg=MSG and each
// attr as key=value, the value quoted when it has to be.
func logFields(level slog.Level, msg string, attrs ...slog.Attr) []string {
	// render writes one record, keeping of the built-in fields only keep.
	render := func(keep, msg string, attrs ...slog.Attr) string {
		var b strings.Builder
		h := slog.NewTextHandler(&b, &slog.HandlerOptions{ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key != keep && (a.Key == slog.TimeKey || a.Key == slog.LevelKey || a.Key == slog.MessageKey) {
				return slog.Attr{}
			}
			return a
		}})
		r := slog.NewRecord(time.Time{}, level, msg, 0)
		r.AddAttrs(attrs...)
		if err := h.Handle(context.Background(), r); err != nil {
			panic(err)
		}
		return strings.TrimSuffix(b.String(), "\n")
	}
	fields := []string{render(slog.LevelKey, ""), render(slog.MessageKey, msg)}
	for _, a := range attrs {
		fields = append(fields, render("", "", a))
	}
	return fields
}

// logLines returns the lines of log written at level with message msg and
// every one of attrs, each compared as whole fields.
func logLines(log string, level slog.Level, msg string, attrs ...slog.Attr) []string {
	fields := logFields(level, msg, attrs...)
	var found []string
	for line := range strings.Lines(log) {
		line = strings.TrimSuffix(line, "\n")
		padded := " " + line + " "
		if !slices.ContainsFunc(fields, func(f string) bool { return !strings.Contains(padded, " "+f+" ") }) {
			found = append(found, line)
		}
	}
	return found
}

// waitLogLine waits until tungate's log has a line logLines finds and
// returns it. It fails at once if tungate exits first.
func (g *gateway) waitLogLine(timeout time.Duration, level slog.Level, msg string, attrs ...slog.Attr) string {
	g.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if lines := logLines(g.proc.Log(), level, msg, attrs...); len(lines) > 0 {
			return lines[0]
		}
		g.running("waiting for a log line msg=" + msg)
		if time.Now().After(deadline) {
			g.t.Fatalf("after %v no %v line with msg %q and %v in the log:\n%s", timeout, level, msg, attrs, g.proc.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// running fails the test if tungate has exited.
func (g *gateway) running(what string) {
	g.t.Helper()
	if !g.proc.Exited() {
		return
	}
	_, err := g.proc.Wait(time.Second)
	g.t.Fatalf("%s: tungate exited (%v)", what, err) // netlab prints its log
}

// replaceConfig puts the file at path in place of tungate's config file,
// in one rename as an editor or a configuration manager does.
func (g *gateway) replaceConfig(path string) {
	g.t.Helper()
	if err := os.Rename(path, g.config); err != nil {
		g.t.Fatal(err)
	}
}

// reload replaces tungate's config file with the file at path, in one
// rename as an editor or a configuration manager does, and sends SIGHUP.
// It returns how much tungate had logged before: the mark from which
// reloaded reads.
func (g *gateway) reload(path string) (mark int) {
	g.t.Helper()
	g.replaceConfig(path)
	mark = len(g.proc.Log())
	if err := g.proc.Signal(unix.SIGHUP); err != nil {
		g.t.Fatalf("SIGHUP: %v", err)
	}
	return mark
}

// reloaded waits for the "config reloaded" line of the reload that
// logged from mark on, checks that there is one such line and no
// "reload: restart needed" (the tests change no key that needs one), and
// that tungate is still running.
func (g *gateway) reloaded(mark int) {
	g.t.Helper()
	since := func() string { return g.proc.Log()[mark:] }
	deadline := time.Now().Add(reloadWait)
	for len(logLines(since(), slog.LevelInfo, "config reloaded")) == 0 {
		g.running("after SIGHUP")
		if time.Now().After(deadline) {
			g.t.Fatalf("no INFO line with msg \"config reloaded\" %v after SIGHUP; log since:\n%s", reloadWait, since())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := logLines(since(), slog.LevelInfo, "config reloaded"); len(got) != 1 {
		g.t.Errorf("one SIGHUP, %d \"config reloaded\" lines:\n%s", len(got), strings.Join(got, "\n"))
	}
	if got := logLines(since(), slog.LevelWarn, "reload: restart needed"); len(got) > 0 {
		g.t.Errorf("the reload changed no key that needs a restart, yet:\n%s", strings.Join(got, "\n"))
	}
	g.running("after the reload")
}

// wantRefused checks that a new TCP connection to addr is refused
// (ECONNREFUSED) within 1 s.
func wantRefused(t *testing.T, lab *netlab.Lab, addr, what string) {
	t.Helper()
	start := time.Now()
	c, err := lab.App.DialTimeout("tcp", addr, 5*time.Second)
	if err == nil {
		c.Close()
		t.Fatalf("%s: dial %s connected, want ECONNREFUSED", what, addr)
	}
	if d := time.Since(start); !errors.Is(err, syscall.ECONNREFUSED) || d > time.Second {
		t.Fatalf("%s: dial %s: %v after %v, want ECONNREFUSED within 1 s", what, addr, err, d)
	}
}

// flowVia waits for tungate's debug line about the flow f (from the app's
// address) going out by outbound.
func (g *gateway) flowVia(f *flow, outbound string) {
	g.t.Helper()
	g.waitLogLine(3*time.Second, slog.LevelDebug, "tcp flow", slog.String("outbound", outbound), slog.String("src", f.LocalAddr().String()))
}

// cidrRule sends remote host i (IPv4) to outbound.
func cidrRule(i int, outbound string) map[string]any {
	return map[string]any{"ip_cidr": []string{netlab.Remote4(i).String() + "/32"}, "outbound": outbound}
}

func rejectOutbound() map[string]any { return map[string]any{"name": "block", "type": "reject"} }

// TestReloadKeepsFlows: a reload that adds a rule and an outbound leaves a
// 64 MiB download through the untouched direct outbound running, byte
// exact, and new flows follow the new rules at once.
func TestReloadKeepsFlows(t *testing.T) {
	lab := netlab.New(t)
	const seed = 0x4e10
	download := remote4(1, 5001)
	bulkServer(t, lab.Wan, download, seed)
	blocked := remote4(3, 80)
	lab.Wan.TCPEcho(t, blocked)
	cfg := baseConfig()
	g := startGateway(t, lab, cfg)
	echo(t, lab, blocked) // nothing blocks it before the reload

	want, _ := hashOf(stream(seed))
	c := dialApp(t, lab, download)
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	if _, err := c.Write([]byte{'D'}); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	const head = 4 << 20
	if _, err := io.CopyN(h, c, head); err != nil {
		t.Fatalf("the first 4 MiB of the download: %v", err)
	}

	cfg["outbounds"] = []any{directOutbound(), rejectOutbound()}
	cfg["rules"] = []any{cidrRule(3, "block")}
	g.reloaded(g.reload(writeYAML(t, cfg)))
	// The app has read 4 MiB and the buffers on the way hold far less than
	// the other 60: tungate was still relaying the download when it
	// reloaded.
	v := g.metric("tungate_tcp_bytes_down_total")
	if v >= bulkSize {
		t.Fatalf("tungate_tcp_bytes_down_total = %v at the reload: the download was no longer under way, the test proves nothing", v)
	}
	t.Logf("tungate had relayed %.1f MiB of the 64 when it reloaded", v/(1<<20))

	wantRefused(t, lab, blocked, "a new flow matching the rule the reload added")
	d := dialApp(t, lab, download)
	d.SetDeadline(time.Now().Add(30 * time.Second))
	d.Write([]byte{'D'})
	got, exp := make([]byte, 1<<20), make([]byte, 1<<20)
	io.ReadFull(stream(seed), exp)
	if _, err := io.ReadFull(d, got); err != nil || !bytes.Equal(got, exp) {
		t.Fatalf("a new download after the reload: first MiB %v, equal to the stream's: %v", err, bytes.Equal(got, exp))
	}
	d.Close()

	n, err := io.Copy(h, c)
	if sum := [32]byte(h.Sum(nil)); err != nil || head+n != bulkSize || sum != want {
		t.Fatalf("the download across the reload: %d bytes hashing %x (%v), want %d hashing %x", head+n, sum, err, bulkSize, want)
	}
	g.running("after the download")
	g.stop()
}

// TestReloadRemovesOutbound: a reload that removes an outbound resets its
// flows; the flows of the outbound that stays keep going, and a new flow
// to the same server goes by the outbound the new rules pick.
func TestReloadRemovesOutbound(t *testing.T) {
	lab := netlab.New(t)
	addr, other := remote4(1, 7070), remote4(2, 7070)
	sourceServer(t, lab.Wan, addr)
	sourceServer(t, lab.Wan, other)
	cfg := baseConfig()
	cfg["outbounds"] = []any{directOutbound(), map[string]any{"name": "direct2", "type": "direct", "fwmark": fwmark}}
	cfg["rules"] = []any{cidrRule(1, "direct2")}
	g := startGateway(t, lab, cfg)

	f := wantSource(t, lab, addr, netlab.AppAddr4, "before the reload")
	g.flowVia(f, "direct2")
	f.echoes(t, "direct2's flow before the reload")
	kept := wantSource(t, lab, other, netlab.AppAddr4, "before the reload")
	g.flowVia(kept, "direct")

	cfg["outbounds"] = []any{directOutbound()}
	delete(cfg, "rules")
	start := time.Now()
	g.reloaded(g.reload(writeYAML(t, cfg)))
	f.ended(t, start, 3*time.Second, "direct2's flow after direct2 was removed")
	kept.echoes(t, "direct's flow after the reload")

	nf := wantSource(t, lab, addr, netlab.AppAddr4, "after the reload")
	g.flowVia(nf, "direct")
	nf.echoes(t, "a new flow to the server after the reload")
	g.running("after the new flow")
	g.stop()
}

// TestReloadInvalidKeepsRunning: a file with several errors is refused,
// each error logged as `tungate check` prints it; flows and rules stay as
// they were; a valid file afterwards reloads.
func TestReloadInvalidKeepsRunning(t *testing.T) {
	lab := netlab.New(t)
	addr := remote4(1, 7070)
	sourceServer(t, lab.Wan, addr)
	blocked, later := remote4(3, 80), remote4(2, 80)
	lab.Wan.TCPEcho(t, blocked)
	lab.Wan.TCPEcho(t, later)
	cfg := baseConfig()
	cfg["outbounds"] = []any{directOutbound(), rejectOutbound()}
	cfg["rules"] = []any{cidrRule(3, "block")}
	g := startGateway(t, lab, cfg)
	f := wantSource(t, lab, addr, netlab.AppAddr4, "before the reload")
	f.echoes(t, "before the reload")
	wantRefused(t, lab, blocked, "before the reload")

	// Errors of different kinds, next to changes that would show if any
	// part of the file were applied: a rule sending the echo server to
	// block, and none for the blocked one.
	bad := baseConfig()
	bad["log"].(map[string]any)["colour"] = true                                // unknown key
	bad["stack"] = map[string]any{"tcp": map[string]any{"dial_timeout": "abc"}} // bad duration
	bad["outbounds"] = []any{directOutbound(), rejectOutbound()}
	bad["rules"] = []any{
		cidrRule(1, "block"),
		cidrRule(2, "nosuch"), // unknown outbound
		map[string]any{"ip_cidr": []string{"10.233.1.0/33"}, "outbound": "direct"}, // bad CIDR
	}
	badPath := writeYAML(t, bad)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	check := exec.CommandContext(ctx, tungateBin, "check", "--config", badPath)
	check.Stderr = &stderr
	if err := check.Run(); err == nil {
		t.Fatalf("tungate check accepted the bad file:\n%s", stderr.String())
	}
	var wantErrs []string
	for line := range strings.Lines(stderr.String()) {
		if line = strings.TrimSpace(line); line != "" && !slices.Contains(wantErrs, line) {
			wantErrs = append(wantErrs, line)
		}
	}
	if len(wantErrs) < 3 {
		t.Fatalf("tungate check found %d distinct errors in the bad file, want at least 3:\n%s", len(wantErrs), stderr.String())
	}

	g.reload(badPath)
	for _, e := range wantErrs {
		g.waitLogLine(reloadWait, slog.LevelError, "reload refused", slog.String("error", e))
	}
	if got := logLines(g.proc.Log(), slog.LevelError, "reload refused"); len(got) != len(wantErrs) {
		t.Errorf("%d \"reload refused\" lines, want one per error of tungate check (%d):\n%s", len(got), len(wantErrs), strings.Join(got, "\n"))
	}
	if got := logLines(g.proc.Log(), slog.LevelInfo, "config reloaded"); len(got) != 0 {
		t.Fatalf("a file with errors was reloaded:\n%s", strings.Join(got, "\n"))
	}
	g.running("after SIGHUP with a bad file")
	f.echoes(t, "after the refused reload")
	wantSource(t, lab, addr, netlab.AppAddr4, "a new flow after the refused reload").echoes(t, "a new flow after the refused reload")
	wantRefused(t, lab, blocked, "after the refused reload, the old rules")
	echo(t, lab, later)

	// The reload path still works after a refusal.
	cfg["rules"] = []any{cidrRule(3, "block"), cidrRule(2, "block")}
	g.reloaded(g.reload(writeYAML(t, cfg)))
	wantRefused(t, lab, later, "after the valid reload, the rule it added")
	f.echoes(t, "after the valid reload")
	g.running("after the valid reload")
	g.stop()
}
