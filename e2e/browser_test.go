//go:build linux

package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/tungate/tungate/internal/netlab"
	"github.com/tungate/tungate/internal/testlog"
)

const (
	// browserSecret is api.secret in the browser test; the pages read it
	// from their own URL (?token=), as a dashboard does.
	browserSecret = "e2e-browser-s3cret"
	// browserWait bounds each wait for the page to show what the test
	// looks for.
	browserWait = 10 * time.Second
	// browserStart bounds chromium's start (a cold start on a busy 2-core
	// machine takes seconds).
	browserStart = 30 * time.Second
)

// dashboardPage is the api.ui index.html: it opens the /connections
// stream with the token from its own URL and lists every connection of
// each snapshot as an <li> whose data-dst is "destinationIP:destinationPort".
const dashboardPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>tungate e2e dashboard</title></head>
<body>
<p id="state">loading</p>
<ul id="conns"></ul>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const state = document.getElementById("state");
const list = document.getElementById("conns");
let frames = 0;
const ws = new WebSocket("ws://API_ADDR/connections?interval=200&token=" + encodeURIComponent(token));
ws.onopen = () => { state.textContent = "open"; };
ws.onerror = () => { state.textContent = "websocket error"; };
ws.onclose = (e) => { state.textContent = "closed " + e.code + " " + e.reason + " after " + frames + " frames"; };
ws.onmessage = (e) => {
  let snap;
  try { snap = JSON.parse(e.data); } catch (err) { state.textContent = "bad frame: " + err; return; }
  state.textContent = "frames: " + (++frames);
  list.replaceChildren(...(snap.connections || []).map((c) => {
    const m = c.metadata || {};
    const li = document.createElement("li");
    li.dataset.dst = m.destinationIP + ":" + m.destinationPort;
    li.dataset.network = String(m.network);
    li.dataset.portType = typeof m.destinationPort;
    li.textContent = m.network + " " + li.dataset.dst + " id " + c.id + " up " + c.upload + " down " + c.download;
    return li;
  }));
};
</script>
</body></html>
`

// versionPage is served from another origin than the API's: it calls
// GET /version with the bearer token, which makes the browser send a CORS
// preflight first, and shows the answer's version (data-state "ok") or
// the error (data-state "error").
const versionPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>tungate e2e other origin</title></head>
<body>
<p id="version" data-state="pending"></p>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token") || "";
const out = document.getElementById("version");
fetch("http://API_ADDR/version", {headers: {Authorization: "Bearer " + token}})
  .then((r) => r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status)))
  .then((v) => { out.textContent = String(v.version); out.dataset.state = "ok"; })
  .catch((e) => { out.textContent = String(e); out.dataset.state = "error"; });
</script>
</body></html>
`

// TestBrowser drives the API the way a dashboard does, from a real
// browser: headless chromium inside the app namespace loads a page of
// ours from api.ui and, from another origin listed in api.cors, calls the
// API with the token.
func TestBrowser(t *testing.T) {
	chromium := netlab.RequireBinary(t, "chromium")
	lab := netlab.New(t)

	// The pages at other origins, served inside the app namespace: one
	// listed in api.cors, one not.
	allowed := servePage(t, lab.App, versionPage)
	refused := servePage(t, lab.App, versionPage)

	ui := t.TempDir()
	if err := os.WriteFile(filepath.Join(ui, "index.html"), []byte(strings.ReplaceAll(dashboardPage, "API_ADDR", apiAddr)), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := baseConfig()
	cfg["api"] = map[string]any{
		"listen": apiAddr,
		"secret": browserSecret,
		"ui":     ui,
		"cors":   []string{allowed},
	}
	g := startGateway(t, lab, cfg)

	// A live TCP flow through the TUN, open for the whole test.
	dst := remote4(1, 7070)
	lab.Wan.TCPEcho(t, dst)
	flow := dialApp(t, lab, dst)
	t.Cleanup(func() { flow.Close() })
	flow.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(flow, "hello\n"); err != nil {
		t.Fatalf("flow to %s: write: %v", dst, err)
	}
	if got, err := io.ReadAll(io.LimitReader(flow, 6)); err != nil || string(got) != "hello\n" {
		t.Fatalf("flow to %s: echo %q, %v; want %q", dst, got, err, "hello\n")
	}
	flow.SetDeadline(time.Time{})

	b := startChromium(t, lab.App, chromium)

	t.Run("dashboard shows the live flow", func(t *testing.T) {
		tab := b.tab(t)
		url := fmt.Sprintf("http://%s/ui/?token=%s", apiAddr, browserSecret)
		b.do(t, tab, "navigate to "+url, browserWait, chromedp.Navigate(url))
		want := strconv.Quote(dst)
		found := fmt.Sprintf(`[...document.querySelectorAll("#conns li")].some((li) => li.dataset.dst === %s)`, want)
		b.poll(t, tab, "the dashboard lists a connection to "+dst, found)
		var li struct{ Network, PortType, Text string }
		b.eval(t, tab, fmt.Sprintf(`(() => {
			const li = [...document.querySelectorAll("#conns li")].find((li) => li.dataset.dst === %s);
			return {network: li.dataset.network, portType: li.dataset.portType, text: li.textContent};
		})()`, want), &li)
		if li.Network != "tcp" || li.PortType != "string" {
			t.Errorf("the dashboard's entry for %s: %q, metadata.network %q, destinationPort a %s; want tcp and a string", dst, li.Text, li.Network, li.PortType)
		}
	})

	t.Run("page at an allowed origin calls the API", func(t *testing.T) {
		want := apiVersion(t, g)
		tab := b.tab(t)
		url := allowed + "/?token=" + browserSecret
		b.do(t, tab, "navigate to "+url, browserWait, chromedp.Navigate(url))
		b.poll(t, tab, "the page at "+allowed+" has an answer from /version", `document.getElementById("version").dataset.state !== "pending"`)
		var got struct{ State, Text string }
		b.eval(t, tab, `({state: document.getElementById("version").dataset.state, text: document.getElementById("version").textContent})`, &got)
		if got.State != "ok" || got.Text != want {
			t.Errorf("the page at %s (in api.cors) shows %s %q, want the version %q", allowed, got.State, got.Text, want)
		}
	})

	t.Run("page at another origin is refused", func(t *testing.T) {
		tab := b.tab(t)
		url := refused + "/?token=" + browserSecret
		b.do(t, tab, "navigate to "+url, browserWait, chromedp.Navigate(url))
		b.poll(t, tab, "the page at "+refused+" has an answer from /version", `document.getElementById("version").dataset.state !== "pending"`)
		var got struct{ State, Text string }
		b.eval(t, tab, `({state: document.getElementById("version").dataset.state, text: document.getElementById("version").textContent})`, &got)
		if got.State != "error" {
			t.Errorf("the page at %s (not in api.cors) shows %s %q, want the browser to refuse it the answer", refused, got.State, got.Text)
		}
	})
}

// apiVersion returns the version GET /version answers, asked with the
// token from inside the app namespace.
func apiVersion(t *testing.T, g *gateway) string {
	t.Helper()
	req, err := http.NewRequest("GET", "http://"+apiAddr+"/version", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+browserSecret)
	resp, err := g.http.Do(req)
	if err != nil {
		t.Fatalf("GET /version: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	var v struct {
		Version string `json:"version"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &v) != nil || v.Version == "" {
		t.Fatalf("GET /version: %s %q, want 200 and a JSON object with a version", resp.Status, body)
	}
	return v.Version
}

// servePage serves page (with API_ADDR replaced) at / on a free port of
// the namespace's loopback, until the test ends, and returns its origin.
func servePage(t *testing.T, ns *netlab.NS, page string) string {
	t.Helper()
	ln, err := ns.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("page server: %v", err)
	}
	body := []byte(strings.ReplaceAll(page, "API_ADDR", apiAddr))
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/" {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			w.Write(body)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return "http://" + ln.Addr().String()
}

// chromiumBrowser is a headless chromium running inside a namespace,
// driven over its DevTools pipe.
type chromiumBrowser struct {
	ctx context.Context // the chromedp context that owns the browser
	out *testlog.Buffer // what chromium printed
}

// startChromium starts headless chromium inside ns (`ip netns exec`, so
// 127.0.0.1 is the namespace's loopback and its traffic takes the
// namespace's routes, into the TUN), driven by chromedp over
// --remote-debugging-pipe: no debugging port, nothing to reach across
// namespaces. Cleanup kills chromium's process group by its pid, then any
// chromium process still using the test's profile directory, and removes
// that directory.
func startChromium(t *testing.T, ns *netlab.NS, chromium string) *chromiumBrowser {
	t.Helper()
	ipPath, err := exec.LookPath("ip")
	if err != nil {
		t.Fatalf("ip: %v", err)
	}
	profile, err := os.MkdirTemp("", "tungate-e2e-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	out := &testlog.Buffer{}
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromium),
		chromedp.UserDataDir(profile),
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("headless", "new"),
		chromedp.NoSandbox, // root, and no user namespaces for the sandbox here
		chromedp.DisableGPU,
		chromedp.Flag("disable-dev-shm-usage", true),
		// Nothing but the test's own pages: no background requests, and
		// no name is ever resolved (the pages use addresses only).
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-domain-reliability", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("no-pings", true),
		chromedp.Flag("host-resolver-rules", "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"),
		chromedp.CombinedOutput(out),
		chromedp.ModifyCmdFunc(func(cmd *exec.Cmd) {
			// ip execs chromium, which keeps the pid, the pipe's fds 3
			// and 4, and the process group of its own made here.
			cmd.Args = append([]string{ipPath, "netns", "exec", ns.Name, cmd.Path}, cmd.Args[1:]...)
			cmd.Path = ipPath
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		}),
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancel := chromedp.NewContext(allocCtx)
	b := &chromiumBrowser{ctx: ctx, out: out}

	pid := 0
	t.Cleanup(func() {
		if pid > 0 {
			// The group leader is chromium itself; its helpers
			// (zygote, renderers, network service) are in its group.
			if err := syscall.Kill(-pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				t.Errorf("kill chromium's process group %d: %v", pid, err)
			}
		}
		cancel()
		cancelAlloc() // waits for the browser process to be reaped
		if n := killProfileUsers(profile); n > 0 {
			t.Logf("killed %d chromium processes left outside its process group", n)
		}
		if err := removeAllRetry(profile, 5*time.Second); err != nil {
			t.Errorf("remove chromium's profile: %v", err)
		}
		if t.Failed() {
			t.Logf("chromium (pid %d) printed:\n%s", pid, tail(withoutDBus(out.String()), 4096))
		}
	})

	// The first Run starts the browser and ties it to the context it is
	// given, so it gets no timeout of its own: a timer cancels it instead.
	timer := time.AfterFunc(browserStart, cancel)
	err = chromedp.Do(ctx)
	if !timer.Stop() {
		err = fmt.Errorf("not started within %v (%v)", browserStart, err)
	}
	if err != nil {
		t.Fatalf("chromium in netns %s: %v\n%s", ns.Name, err, tail(withoutDBus(out.String()), 4096))
	}
	pid = chromedp.FromContext(ctx).Browser.Process().Pid
	t.Logf("chromium running in netns %s, pid %d", ns.Name, pid)
	return b
}

// tab opens a new tab, closed when the (sub)test ends.
func (b *chromiumBrowser) tab(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := chromedp.NewContext(b.ctx)
	t.Cleanup(cancel)
	// Like the browser, a tab lives as long as the context of its first
	// Run: that one gets a timer, not a timeout.
	timer := time.AfterFunc(browserWait, cancel)
	err := chromedp.Do(ctx)
	if !timer.Stop() {
		err = fmt.Errorf("not open within %v (%v)", browserWait, err)
	}
	if err != nil {
		t.Fatalf("open a tab: %v", err)
	}
	return ctx
}

// do runs steps in tab within timeout.
func (b *chromiumBrowser) do(t *testing.T, tab context.Context, what string, timeout time.Duration, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tab, timeout)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatalf("%s: %v%s", what, err, b.page(tab))
	}
}

// poll waits up to browserWait for the JavaScript expression cond to be
// true in tab's page.
func (b *chromiumBrowser) poll(t *testing.T, tab context.Context, what, cond string) {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(tab, browserWait+time.Second)
	defer cancel()
	_, err := chromedp.Run(ctx, chromedp.Poll[bool](cond,
		chromedp.WithPollingInterval(50*time.Millisecond),
		chromedp.WithPollingTimeout(browserWait)))
	if err != nil {
		t.Fatalf("waiting %v for %s: %v%s", browserWait, what, err, b.page(tab))
	}
	t.Logf("%s after %v", what, time.Since(start).Round(time.Millisecond))
}

// eval evaluates expr in tab's page into v.
func (b *chromiumBrowser) eval(t *testing.T, tab context.Context, expr string, v any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(tab, 5*time.Second)
	defer cancel()
	raw, err := chromedp.Run(ctx, chromedp.Evaluate[json.RawMessage](expr))
	if err == nil {
		err = json.Unmarshal(raw, v)
	}
	if err != nil {
		t.Fatalf("evaluate %s: %v%s", expr, err, b.page(tab))
	}
}

// page describes tab's page for a failure message: its URL and text.
func (b *chromiumBrowser) page(tab context.Context) string {
	ctx, cancel := context.WithTimeout(tab, 2*time.Second)
	defer cancel()
	text, err := chromedp.Run(ctx, chromedp.Evaluate[string](`location.href + "\n" + document.body.innerText`))
	if err != nil {
		return fmt.Sprintf("\n(the page could not be read: %v)", err)
	}
	return "\nthe page shows: " + text
}

// killProfileUsers SIGKILLs every process whose command line names
// profile as its --user-data-dir (chromium passes it to all its helpers)
// and returns how many it found. Looked up by pid in /proc; the directory
// is unique to this test, so nothing else matches.
func killProfileUsers(profile string) int {
	want := []byte("--user-data-dir=" + profile)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for arg := range bytes.SplitSeq(cmdline, []byte{0}) {
			if bytes.Equal(arg, want) {
				syscall.Kill(pid, syscall.SIGKILL)
				n++
				break
			}
		}
	}
	return n
}

// removeAllRetry removes dir, retrying for up to limit: a helper process
// that was just killed may still have had a file open in it.
func removeAllRetry(dir string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		err := os.RemoveAll(dir)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// withoutDBus drops chromium's complaints about the missing D-Bus (there
// is none in a test namespace), which would hide everything else.
func withoutDBus(s string) string {
	var b strings.Builder
	for line := range strings.Lines(s) {
		if !strings.Contains(line, ":ERROR:dbus/") && !strings.Contains(line, "Failed to connect to the bus") {
			b.WriteString(line)
		}
	}
	return b.String()
}

// tail returns the last n bytes of s.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}
