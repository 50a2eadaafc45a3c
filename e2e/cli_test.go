//go:build linux

package e2e

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, yaml string
		ok         bool
		want       []string // each must appear in the output
	}{
		{"valid", "log: {level: debug}\n", true, []string{"ok"}},
		{"misspelt key", "dns:\n  mod: fake-ip\n", false, []string{"dns.mod", "unknown key", `did you mean "mode"`}},
		{"bad cidr", "rules:\n  - ip_cidr: [10.0.0.0/33]\n    outbound: direct\n", false, []string{"rules[0].ip_cidr[0]", "10.0.0.0/33"}},
		{"bad duration and unknown outbound together", "stack: {tcp: {dial_timeout: soon}}\nfinal: prxy\n", false, []string{"stack.tcp.dial_timeout", "final", `"prxy"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".yaml")
			os.WriteFile(path, []byte(tc.yaml), 0o600)
			out, err := exec.Command(tungateBin, "check", "--config", path).CombinedOutput()
			if tc.ok != (err == nil) {
				t.Fatalf("tungate check: err=%v, want ok=%v\n%s", err, tc.ok, out)
			}
			for _, w := range tc.want {
				if !strings.Contains(string(out), w) {
					t.Errorf("tungate check output lacks %q:\n%s", w, out)
				}
			}
		})
	}
	out, err := exec.Command(tungateBin, "version").CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "tungate ") {
		t.Errorf("tungate version: %q, %v", out, err)
	}
}

// TestRunDefault starts `tungate run` with no flags at all — the embedded
// default, auto-route included — in a lab namespace, and stops it: the
// namespace's rules and routes are back to what they were.
func TestRunDefault(t *testing.T) {
	lab := netlab.New(t)
	// The default journal, /run/tungate/route.journal, is one file for
	// every namespace of this machine: give this run its own, so that
	// concurrent test runs do not refuse each other.
	t.Setenv("TUNGATE_ROUTE_JOURNAL", filepath.Join(t.TempDir(), "route.journal"))
	settled(t, lab.App, netlab.VethName)
	before := routingState(t, lab.App)
	p := lab.App.Start(t, tungateBin, "run")
	lab.App.WaitLink(t, "tungate0", true, startWait)
	addrs := lab.App.MustRun(t, "ip", "-o", "addr", "show", "dev", "tungate0")
	for _, want := range []string{"172.19.0.1/30", "fdfe:dcba:9876::1/126"} {
		if !strings.Contains(addrs, want) {
			t.Errorf("tungate0 lacks the default address %s:\n%s", want, addrs)
		}
	}
	if link := lab.App.MustRun(t, "ip", "-o", "link", "show", "dev", "tungate0"); !strings.Contains(link, "mtu 9000") {
		t.Errorf("tungate0 MTU is not the default 9000: %s", link)
	}
	waitLog(t, p, "auto-route installed", startWait)
	// The first screen says it in plain words.
	waitLog(t, p, `msg="routing: all traffic except the LAN goes through tungate0 (route.auto)"`, startWait)
	waitLog(t, p, `msg="stop: Ctrl-C or SIGTERM; after a crash: tungate cleanup`, startWait)
	for _, line := range strings.Split(p.Log(), "\n") {
		if strings.Contains(line, `msg="routing:`) || strings.Contains(line, `msg="flows:`) || strings.Contains(line, `msg="DNS:`) ||
			strings.Contains(line, `msg="API:`) || strings.Contains(line, `msg="stop:`) {
			t.Log(line)
		}
	}
	if rules := lab.App.MustRun(t, "ip", "rule"); !strings.Contains(rules, "lookup 2022 proto 231") {
		t.Errorf("no rule into table 2022 while tungate runs:\n%s", rules)
	}
	// SIGHUP (a closed terminal) does not end it: on the embedded default
	// there is nothing to reload, and it says so and keeps routing.
	if err := p.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitLog(t, p, "nothing to reload", 5*time.Second)
	if p.Exited() {
		t.Fatalf("tungate exited on SIGHUP:\n%s", p.Log())
	}
	if rules := lab.App.MustRun(t, "ip", "rule"); !strings.Contains(rules, "lookup 2022 proto 231") {
		t.Errorf("no rule into table 2022 after SIGHUP:\n%s", rules)
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if exited, err := p.Wait(5 * time.Second); !exited || err != nil {
		t.Fatalf("after SIGTERM: exited=%v err=%v\n%s", exited, err, p.Log())
	}
	if out, err := lab.App.Run(t.Context(), "ip", "link", "show", "dev", "tungate0"); err == nil {
		t.Fatalf("tungate0 still exists after exit:\n%s", out)
	}
	waitState(t, lab.App, before, "after SIGTERM")
}

func waitLog(t testing.TB, p *netlab.Proc, substr string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.Log(), substr) {
		if time.Now().After(deadline) {
			t.Fatalf("log never mentioned %q:\n%s", substr, p.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestShutdownWithOpenFlows: SIGTERM with a flow open ends it with a reset
// the app can see (not a clean EOF that would pass for a complete
// transfer), removes the TUN and exits 0 within 5 s.
func TestShutdownWithOpenFlows(t *testing.T) {
	lab := netlab.New(t)
	g := startGateway(t, lab, baseConfig())
	lab.Wan.TCPEcho(t, remote4(1, 7))
	c := dialApp(t, lab, remote4(1, 7))
	defer c.Close()
	c.Write([]byte("hold"))
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(make([]byte, 4)); err != nil {
		t.Fatal(err)
	}
	g.stop()
	_, err := c.Read(make([]byte, 4))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("open flow after shutdown: %v; want ECONNRESET", err)
	}
	if out, err := lab.App.Run(t.Context(), "ip", "link", "show", "dev", tunName); err == nil {
		t.Fatalf("%s still exists after exit:\n%s", tunName, out)
	}
}

// TestCheckEmbeddedDefault: `tungate check` without --config checks the
// embedded default, with the environment's overrides.
func TestCheckEmbeddedDefault(t *testing.T) {
	out, err := exec.Command(tungateBin, "check").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "embedded default configuration") || !strings.Contains(string(out), ": ok") {
		t.Errorf("tungate check: err=%v\n%s", err, out)
	}
	cmd := exec.Command(tungateBin, "check")
	cmd.Env = append(os.Environ(), "TUNGATE_STACK_TCP_DIAL_TIMEOUT=soon")
	out, err = cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(string(out), "stack.tcp.dial_timeout") {
		t.Errorf("tungate check with TUNGATE_STACK_TCP_DIAL_TIMEOUT=soon: err=%v, want exit 1 naming stack.tcp.dial_timeout\n%s", err, out)
	}
}
