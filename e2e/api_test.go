//go:build linux

package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/tungate/tungate/internal/netlab"
)

// The control API as the Clash dashboards (metacubexd, zashboard, yacd)
// call it, against the real binary with live flows.

const apiSecret = "e2e-secret"

// clashConn is a /connections entry as the dashboards' types read it:
// ports are strings.
type clashConn struct {
	ID       string `json:"id"`
	Metadata struct {
		Network         string `json:"network"`
		SourceIP        string `json:"sourceIP"`
		SourcePort      string `json:"sourcePort"`
		DestinationIP   string `json:"destinationIP"`
		DestinationPort string `json:"destinationPort"`
		InboundName     string `json:"inboundName"`
	} `json:"metadata"`
	Upload   uint64    `json:"upload"`
	Download uint64    `json:"download"`
	Start    time.Time `json:"start"`
	Chains   []string  `json:"chains"`
	Rule     string    `json:"rule"`
}

type clashSnapshot struct {
	DownloadTotal uint64      `json:"downloadTotal"`
	UploadTotal   uint64      `json:"uploadTotal"`
	Connections   []clashConn `json:"connections"`
}

// apiCall makes an API request from inside the app namespace, with the
// bearer when auth is set, and returns the status and body.
func (g *gateway) apiCall(method, path, body string, auth bool) (int, string) {
	g.t.Helper()
	req, err := http.NewRequest(method, "http://"+apiAddr+path, strings.NewReader(body))
	if err != nil {
		g.t.Fatal(err)
	}
	if auth {
		req.Header.Set("Authorization", "Bearer "+apiSecret)
	}
	resp, err := g.http.Do(req)
	if err != nil {
		g.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// websocketTo opens a WebSocket to the API from inside the app namespace,
// authenticated as a browser must be: ?token=.
func (g *gateway) websocketTo(ctx context.Context, path string) *websocket.Conn {
	g.t.Helper()
	client := *g.lab.App.HTTPClient()
	client.Timeout = 0 // the WebSocket outlives any request timeout
	sep := "?"
	if strings.Contains(path, "?") {
		sep = "&"
	}
	c, _, err := websocket.Dial(ctx, "ws://"+apiAddr+path+sep+"token="+apiSecret, &websocket.DialOptions{HTTPClient: &client})
	if err != nil {
		g.t.Fatalf("WebSocket %s: %v", path, err)
	}
	c.SetReadLimit(64 << 20) // a browser's limit, not the library's 32 KiB: 1,000 flows are ~400 KiB a frame
	g.t.Cleanup(func() { c.CloseNow() })
	return c
}

func readJSON[T any](t *testing.T, ctx context.Context, c *websocket.Conn, what string) T {
	t.Helper()
	var v T
	_, msg, err := c.Read(ctx)
	if err != nil {
		t.Fatalf("%s: read: %v", what, err)
	}
	if err := json.Unmarshal(msg, &v); err != nil {
		t.Fatalf("%s: %q: %v", what, msg, err)
	}
	return v
}

func apiConfig() map[string]any {
	cfg := baseConfig()
	cfg["api"] = map[string]any{"listen": apiAddr, "secret": apiSecret}
	cfg["outbounds"] = []any{
		map[string]any{"name": "direct", "type": "direct", "fwmark": fwmark},
		map[string]any{"name": "block", "type": "reject"},
	}
	cfg["rules"] = []any{map[string]any{"ip_cidr": []string{netlab.Remote4(2).String() + "/32"}, "outbound": "block"}}
	return cfg
}

func TestAPIDashboardContract(t *testing.T) {
	lab := netlab.New(t)
	lab.Wan.TCPEcho(t, remote4(1, 7))
	lab.Wan.TCPEcho(t, remote4(2, 7))
	lab.Wan.TCPEcho(t, remote4(3, 7))
	cfg := apiConfig()
	g := startGateway(t, lab, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// Liveness and auth, as every dashboard checks first.
	if code, _ := g.apiCall("GET", "/version", "", false); code != http.StatusUnauthorized {
		t.Errorf("GET /version without the bearer: %d, want 401", code)
	}
	if code, body := g.apiCall("GET", "/version", "", true); code != http.StatusOK || !strings.Contains(body, `"version":"tungate`) {
		t.Errorf("GET /version: %d %s", code, body)
	}

	// A live flow that keeps moving bytes.
	app := dialApp(t, lab, remote4(1, 7))
	defer app.Close()
	stopPump := make(chan struct{})
	pumped := make(chan struct{})
	go func() {
		defer close(pumped)
		buf := make([]byte, 16<<10)
		for {
			select {
			case <-stopPump:
				return
			default:
			}
			if _, err := app.Write(buf); err != nil {
				return
			}
			if _, err := io.ReadFull(app, buf); err != nil {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	// /traffic over a WebSocket: {"up","down"} frames, a moving rate
	// within 1.5 s.
	tc := g.websocketTo(ctx, "/traffic")
	type traffic struct{ Up, Down *uint64 }
	start := time.Now()
	for first := true; ; first = false {
		tr := readJSON[traffic](t, ctx, tc, "/traffic frame")
		if tr.Up == nil || tr.Down == nil {
			t.Fatalf("/traffic frame lacks up or down")
		}
		if !first && *tr.Up > 0 && *tr.Down > 0 {
			break
		}
		if time.Since(start) > 1500*time.Millisecond {
			t.Fatalf("no moving /traffic frame within 1.5 s")
		}
	}
	tc.Close(websocket.StatusNormalClosure, "")

	// /traffic without Upgrade: newline-delimited JSON, as it comes.
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+apiAddr+"/traffic", nil)
	req.Header.Set("Authorization", "Bearer "+apiSecret)
	stream := *g.http
	stream.Timeout = 0
	resp, err := stream.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	rd := bufio.NewReader(resp.Body)
	for i := range 2 {
		line, err := rd.ReadString('\n')
		var tr traffic
		if err != nil || json.Unmarshal([]byte(line), &tr) != nil || tr.Up == nil {
			t.Fatalf("NDJSON /traffic line %d: %q, %v", i, line, err)
		}
	}
	resp.Body.Close()

	// /connections frames: the live flow with string ports, a stable id
	// and counters that grow.
	cc := g.websocketTo(ctx, "/connections?interval=300")
	var id string
	var lastUp uint64
	for range 3 {
		s := readJSON[clashSnapshot](t, ctx, cc, "/connections frame")
		var flow *clashConn
		for i := range s.Connections {
			if s.Connections[i].Metadata.DestinationIP+":"+s.Connections[i].Metadata.DestinationPort == remote4(1, 7) {
				flow = &s.Connections[i]
			}
		}
		if flow == nil {
			t.Fatalf("/connections has no flow to %s: %+v", remote4(1, 7), s.Connections)
		}
		if id != "" && flow.ID != id {
			t.Errorf("the flow's id changed from %s to %s", id, flow.ID)
		}
		if flow.Upload <= lastUp {
			t.Errorf("upload %d after %d: cumulative counters must grow during a transfer", flow.Upload, lastUp)
		}
		if flow.Metadata.Network != "tcp" || flow.Rule != "final" || len(flow.Chains) != 1 || flow.Chains[0] != "direct" || flow.Metadata.InboundName != "tun" {
			t.Errorf("flow metadata: %+v", flow)
		}
		id, lastUp = flow.ID, flow.Upload
	}
	cc.Close(websocket.StatusNormalClosure, "")

	// /proxies has GLOBAL; /memory and /logs stream.
	if code, body := g.apiCall("GET", "/proxies", "", true); code != 200 || !strings.Contains(body, `"GLOBAL"`) || !strings.Contains(body, `"Reject"`) {
		t.Errorf("GET /proxies: %d %s", code, body)
	}
	mc := g.websocketTo(ctx, "/memory")
	if m := readJSON[struct{ Inuse uint64 }](t, ctx, mc, "/memory frame"); m.Inuse == 0 {
		t.Error("/memory: inuse 0")
	}
	lc := g.websocketTo(ctx, "/logs?level=debug")
	logged, stopFlows := context.WithCancel(ctx)
	go func() { // new flows log at debug level, until the stream shows one
		for logged.Err() == nil {
			if c, err := lab.App.DialTimeout("tcp", remote4(3, 7), 2*time.Second); err == nil {
				c.Close()
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	if l := readJSON[struct{ Type, Payload string }](t, ctx, lc, "/logs frame"); l.Type == "" || l.Payload == "" {
		t.Errorf("/logs frame: %+v", l)
	}
	stopFlows()

	// DELETE /connections/{id}: the app's socket fails with a reset within
	// 100 ms.
	close(stopPump)
	<-pumped
	readErr := make(chan error, 1)
	go func() {
		app.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := app.Read(make([]byte, 1))
		readErr <- err
	}()
	time.Sleep(50 * time.Millisecond) // the read is waiting
	deleted := time.Now()
	if code, body := g.apiCall("DELETE", "/connections/"+id, "", true); code != http.StatusNoContent {
		t.Fatalf("DELETE /connections/%s: %d %s", id, code, body)
	}
	err = <-readErr
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the app's read after DELETE: %v, want ECONNRESET", err)
	}
	if d := time.Since(deleted); d > 100*time.Millisecond {
		t.Errorf("the reset took %v after DELETE, want < 100 ms", d)
	}

	// GET /nat: a UDP mapping with its upstream socket and the remotes
	// that answered; GET /explain: the routing step for a destination.
	lab.Wan.UDPEcho(t, remote4(1, 9))
	uc := listenApp(t, lab, "udp4")
	if _, err := uc.WriteToUDPAddrPort([]byte("ping"), netip.MustParseAddrPort(remote4(1, 9))); err != nil {
		t.Fatal(err)
	}
	if got, _, err := readFrom(uc, 3*time.Second); err != nil || string(got) != "ping" {
		t.Fatalf("UDP echo: %q, %v", got, err)
	}
	code, body := g.apiCall("GET", "/nat", "", true)
	var nat struct {
		Mappings []struct {
			Source, Outbound, FirstDestination, UpstreamLocal string
			Remotes                                           int
			Upload, Download                                  uint64
		}
	}
	if code != 200 || json.Unmarshal([]byte(body), &nat) != nil || len(nat.Mappings) != 1 {
		t.Fatalf("GET /nat: %d %s", code, body)
	}
	appPort := uc.LocalAddr().(*net.UDPAddr).Port
	if m := nat.Mappings[0]; !strings.HasSuffix(m.Source, ":"+strconv.Itoa(appPort)) || m.Outbound != "direct" || m.FirstDestination != remote4(1, 9) ||
		m.UpstreamLocal == "" || m.Remotes != 1 || m.Upload != 4 || m.Download != 4 {
		t.Errorf("GET /nat mapping: %+v", m)
	}
	if code, body := g.apiCall("GET", "/explain?dst="+remote4(2, 7)+"&network=tcp", "", true); code != 200 || !strings.Contains(body, `"Outbound":"block"`) {
		t.Errorf("GET /explain for remote 2: %d %s, want outbound block", code, body)
	}

	// PATCH /configs {"mode":"direct"}: new flows go direct, past the rule
	// that blocks remote 2; back to rule mode, they are refused again.
	refused := func(what string) {
		t.Helper()
		if c, err := lab.App.DialTimeout("tcp", remote4(2, 7), 3*time.Second); err == nil {
			c.Close()
			t.Errorf("%s: the flow to remote 2 connected, want it refused", what)
		} else if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("%s: %v, want ECONNREFUSED", what, err)
		}
	}
	refused("rule mode")
	if code, body := g.apiCall("PATCH", "/configs", `{"mode":"direct"}`, true); code != http.StatusNoContent {
		t.Fatalf("PATCH /configs: %d %s", code, body)
	}
	echo(t, lab, remote4(2, 7))
	if _, body := g.apiCall("GET", "/configs", "", true); !strings.Contains(body, `"mode":"direct"`) {
		t.Errorf("GET /configs after PATCH: %s", body)
	}
	g.apiCall("PATCH", "/configs", `{"mode":"rule"}`, true)
	refused("rule mode again")

	// PUT /configs reloads the file: a new rule blocks remote 3.
	echo(t, lab, remote4(3, 7))
	cfg["rules"] = append(cfg["rules"].([]any), map[string]any{"ip_cidr": []string{netlab.Remote4(3).String() + "/32"}, "outbound": "block"})
	g.replaceConfig(writeYAML(t, cfg))
	if code, body := g.apiCall("PUT", "/configs", `{"path":"","payload":""}`, true); code != http.StatusNoContent {
		t.Fatalf("PUT /configs: %d %s", code, body)
	}
	if c, err := lab.App.DialTimeout("tcp", remote4(3, 7), 3*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			c.Close()
		}
		t.Errorf("after PUT /configs: the flow to remote 3: %v, want ECONNREFUSED", err)
	}
	g.stop()
}

// procCPU is a process's user+system CPU time so far.
func procCPU(t *testing.T, pid int) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command's closing parenthesis: utime and stime are
	// the 12th and 13th of them.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	const clockTicks = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / clockTicks
}

// TestAPIConnectionsStreamCost: with 1,000 open flows, one /connections
// WebSocket at 1 s costs what it costs (logged: a figure, not an
// assertion), every frame carries every flow, and closing the client
// leaves no goroutine behind.
func TestAPIConnectionsStreamCost(t *testing.T) {
	const flows = 1000
	lab := netlab.New(t)
	cfg := apiConfig()
	// No token: the harness scrapes /metrics without one. The profiler
	// gives a goroutine dump if one is left behind.
	cfg["api"] = map[string]any{"listen": apiAddr, "pprof": true}
	g := startGateway(t, lab, cfg)
	lab.Wan.TCPEcho(t, remote4(1, 7))
	echo(t, lab, remote4(1, 7)) // warm up pools and timers
	g.waitMetric("tungate_tcp_flows_active", 5*time.Second, "0", func(v float64) bool { return v == 0 })
	goroutines := g.metric("go_goroutines")

	open := make([]net.Conn, 0, flows)
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := range flows {
		c, err := lab.App.DialTimeout("tcp", remote4(1, 7), 10*time.Second)
		if err != nil {
			t.Fatalf("dial #%d: %v", i, err)
		}
		open = append(open, c)
	}
	g.waitMetric("tungate_tracked_flows", 5*time.Second, "every flow tracked", func(v float64) bool { return v == flows })

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pid := g.proc.Cmd.Process.Pid
	idleStart := procCPU(t, pid)
	time.Sleep(5 * time.Second)
	idle := procCPU(t, pid) - idleStart

	ws := g.websocketTo(ctx, "/connections")
	readJSON[clashSnapshot](t, ctx, ws, "first frame")
	cpuStart, start := procCPU(t, pid), time.Now()
	const frames = 5
	for i := range frames {
		if s := readJSON[clashSnapshot](t, ctx, ws, "frame"); len(s.Connections) != flows {
			t.Fatalf("frame %d carries %d flows, want %d", i, len(s.Connections), flows)
		}
	}
	elapsed := time.Since(start)
	used := procCPU(t, pid) - cpuStart
	t.Logf("1,000 flows, one /connections WebSocket at 1 s: tungate used %v CPU in %v (%.1f %% of a core; %.1f %% idle without it)",
		used, elapsed.Round(time.Millisecond), 100*used.Seconds()/elapsed.Seconds(), 100*idle.Seconds()/5)
	ws.Close(websocket.StatusNormalClosure, "")

	for _, c := range open {
		c.Close()
	}
	open = nil
	g.waitMetric("tungate_tcp_flows_active", 10*time.Second, "0", func(v float64) bool { return v == 0 })
	deadline := time.Now().Add(20 * time.Second)
	for g.metric("go_goroutines") > goroutines {
		if time.Now().After(deadline) {
			_, dump := g.apiCall("GET", "/debug/pprof/goroutine?debug=1", "", false)
			t.Fatalf("go_goroutines = %v 20 s after the client closed, want the baseline %v; goroutines:\n%s", g.metric("go_goroutines"), goroutines, dump)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestAPIDNS: /dns/query answers as the proxy does (a fake-ip address),
// /explain learns that address's name, POST /cache/fakeip/flush forgets
// it, POST /cache/dns/flush empties the cache.
func TestAPIDNS(t *testing.T) {
	lab := netlab.New(t)
	cfg := apiConfig()
	cfg["dns"] = dnsConfig("fake-ip", "udp://"+netip.AddrPortFrom(netlab.WanAddr4, 53).String())["dns"]
	g := startGateway(t, lab, cfg)

	code, body := g.apiCall("GET", "/dns/query?name=www.example.org&type=A", "", true)
	var ans struct {
		Status int
		Answer []struct{ Data string }
	}
	if code != 200 || json.Unmarshal([]byte(body), &ans) != nil || ans.Status != 0 || len(ans.Answer) != 1 {
		t.Fatalf("GET /dns/query: %d %s", code, body)
	}
	fake, err := netip.ParseAddr(strings.TrimSpace(ans.Answer[0].Data))
	if err != nil || !netip.MustParsePrefix("198.18.0.0/15").Contains(fake) {
		t.Fatalf("GET /dns/query answered %q, want an address of the fake-ip range", ans.Answer[0].Data)
	}
	explain := func() string {
		_, body := g.apiCall("GET", "/explain?dst="+netip.AddrPortFrom(fake, 443).String(), "", true)
		return body
	}
	if body := explain(); !strings.Contains(body, `"Domain":"www.example.org"`) || !strings.Contains(body, `"DomainSource":"fake-ip"`) {
		t.Errorf("GET /explain for the fake address: %s, want its name from fake-ip", body)
	}
	if code, body := g.apiCall("POST", "/cache/fakeip/flush", "", true); code != http.StatusNoContent {
		t.Fatalf("POST /cache/fakeip/flush: %d %s", code, body)
	}
	if body := explain(); strings.Contains(body, "www.example.org") {
		t.Errorf("GET /explain after the flush: %s, want the name forgotten", body)
	}
	if code, body := g.apiCall("POST", "/cache/dns/flush", "", true); code != http.StatusNoContent {
		t.Errorf("POST /cache/dns/flush: %d %s", code, body)
	}
	g.stop()
}
