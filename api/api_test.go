package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tungate/tungate/internal/leakcheck"
)

// fakeBackend is a gateway with one flow whose bytes grow.
type fakeBackend struct {
	mu      sync.Mutex
	up      uint64
	closed  []string
	patched []ConfigPatch
	mode    string
}

func (b *fakeBackend) Version() string { return "tungate test" }
func (b *fakeBackend) Connections() Snapshot {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.up += 1000
	return Snapshot{UploadTotal: b.up, Connections: []Connection{{
		ID: "7", Upload: b.up, Start: time.Unix(1, 0), Chains: []string{"direct"}, Rule: "final",
		Metadata: Metadata{Network: "tcp", Type: "Tun", SourceIP: "172.19.0.1", SourcePort: "40000", DestinationIP: "10.233.1.1", DestinationPort: "443"},
	}}}
}
func (b *fakeBackend) CloseConnection(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = append(b.closed, id)
	return id == "7"
}
func (b *fakeBackend) CloseAllConnections() int { return 1 }
func (b *fakeBackend) Totals() (uint64, uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.up += 2048
	return b.up, 0
}
func (b *fakeBackend) Proxies() map[string]Proxy {
	return map[string]Proxy{"GLOBAL": {Name: "GLOBAL", Type: "Selector", All: []string{"direct"}, Now: "direct"}, "direct": {Name: "direct", Type: "Direct"}}
}
func (b *fakeBackend) Select(group, name string) error {
	if group != "GLOBAL" {
		return errors.New("not a selector")
	}
	return nil
}
func (b *fakeBackend) Delay(context.Context, string, string) (time.Duration, error) {
	return 0, ErrNotFound
}
func (b *fakeBackend) Rules() []Rule        { return []Rule{{Type: "final", Proxy: "direct"}} }
func (b *fakeBackend) Configs() Configs     { return Configs{Mode: b.mode, LogLevel: "info"} }
func (b *fakeBackend) Reload() error        { return errors.New("rules[0].outbound: unknown outbound \"x\"") }
func (b *fakeBackend) FlushDNSCache() error { return nil }
func (b *fakeBackend) FlushFakeIP() error   { return errors.New("dns.mode is not fake-ip") }
func (b *fakeBackend) Patch(p ConfigPatch) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.patched = append(b.patched, p)
	if p.Mode != nil {
		b.mode = *p.Mode
	}
	return nil
}
func (b *fakeBackend) QueryDNS(context.Context, string, string) (any, error) {
	return map[string]int{"Status": 0}, nil
}
func (b *fakeBackend) NAT() []NATEntry { return nil }
func (b *fakeBackend) Explain(string, string, string) (any, error) {
	return map[string]string{"outbound": "direct"}, nil
}

const secret = "s3cret"

func newTestServer(t *testing.T) (*httptest.Server, *fakeBackend, *slog.Logger) {
	t.Helper()
	leakcheck.Check(t)
	b := &fakeBackend{mode: "rule"}
	hub := NewLogHub(slog.DiscardHandler)
	s, err := New(Config{Listen: "127.0.0.1:0", Secret: secret, Logs: hub}, prometheus.NewRegistry(), b, nil)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.srv.Handler)
	t.Cleanup(func() {
		s.Close() // ends the streams
		ts.Close()
	})
	return ts, b, slog.New(hub)
}

func call(t *testing.T, ts *httptest.Server, method, path, body string, auth bool) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(method, ts.URL+path, strings.NewReader(body))
	if auth {
		req.Header.Set("Authorization", "Bearer "+secret)
	}
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func TestVersionAndAuth(t *testing.T) {
	ts, _, _ := newTestServer(t)
	if resp, _ := call(t, ts, "GET", "/version", "", false); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /version without the bearer: %d, want 401", resp.StatusCode)
	}
	if resp, _ := call(t, ts, "GET", "/version?token="+secret, "", false); resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET /version with ?token= and no WebSocket: %d, want 401 (the token goes in the URL only where headers cannot)", resp.StatusCode)
	}
	resp, body := call(t, ts, "GET", "/version", "", true)
	var v struct {
		Version string `json:"version"`
		Meta    bool   `json:"meta"`
	}
	if resp.StatusCode != 200 || json.Unmarshal([]byte(body), &v) != nil || v.Version != "tungate test" {
		t.Errorf("GET /version: %d %s", resp.StatusCode, body)
	}
}

func TestConnectionsSnapshotAndDelete(t *testing.T) {
	ts, b, _ := newTestServer(t)
	_, body := call(t, ts, "GET", "/connections", "", true)
	var raw map[string]any
	if err := json.Unmarshal([]byte(body), &raw); err != nil {
		t.Fatal(err)
	}
	conns := raw["connections"].([]any)
	md := conns[0].(map[string]any)["metadata"].(map[string]any)
	if _, isString := md["destinationPort"].(string); !isString || conns[0].(map[string]any)["id"] != "7" {
		t.Errorf("a connection's ports and id must be strings: %s", body)
	}
	for _, key := range []string{"downloadTotal", "uploadTotal", "memory"} {
		if _, ok := raw[key]; !ok {
			t.Errorf("snapshot lacks %q: %s", key, body)
		}
	}
	if resp, _ := call(t, ts, "DELETE", "/connections/7", "", true); resp.StatusCode != http.StatusNoContent {
		t.Errorf("DELETE /connections/7: %d", resp.StatusCode)
	}
	if resp, _ := call(t, ts, "DELETE", "/connections/8", "", true); resp.StatusCode != http.StatusNotFound {
		t.Errorf("DELETE of a flow that is not live: %d, want 404", resp.StatusCode)
	}
	if len(b.closed) != 2 {
		t.Errorf("backend saw closes %v", b.closed)
	}
}

// The streams, as dashboards open them: a WebSocket with ?token=, and
// NDJSON without Upgrade.
func TestStreams(t *testing.T) {
	ts, _, log := newTestServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	wsURL := "ws" + strings.TrimPrefix(ts.URL, "http")

	if _, _, err := websocket.Dial(ctx, wsURL+"/traffic", nil); err == nil {
		t.Error("a WebSocket without the token was accepted")
	}
	if _, _, err := websocket.Dial(ctx, wsURL+"/traffic?token=wrong", nil); err == nil {
		t.Error("a WebSocket with a wrong token was accepted")
	}
	c, _, err := websocket.Dial(ctx, wsURL+"/traffic?token="+secret, nil)
	if err != nil {
		t.Fatalf("WebSocket /traffic: %v", err)
	}
	for i := range 2 {
		start := time.Now()
		_, msg, err := c.Read(ctx)
		var tr struct{ Up, Down *uint64 }
		if err != nil || json.Unmarshal(msg, &tr) != nil || tr.Up == nil || tr.Down == nil {
			t.Fatalf("traffic frame %d: %q, %v", i, msg, err)
		}
		if i == 1 && (*tr.Up == 0 || time.Since(start) > 1500*time.Millisecond) {
			t.Errorf("second traffic frame %s after %v, want a rate within 1.5 s", msg, time.Since(start))
		}
	}
	c.Close(websocket.StatusNormalClosure, "")

	c, _, err = websocket.Dial(ctx, wsURL+"/connections?interval=200&token="+secret, nil)
	if err != nil {
		t.Fatal(err)
	}
	var last uint64
	for range 3 {
		_, msg, err := c.Read(ctx)
		var s Snapshot
		if err != nil || json.Unmarshal(msg, &s) != nil || len(s.Connections) != 1 {
			t.Fatalf("connections frame: %q, %v", msg, err)
		}
		if s.Connections[0].Upload <= last {
			t.Errorf("upload %d after %d: cumulative counters must grow", s.Connections[0].Upload, last)
		}
		last = s.Connections[0].Upload
	}
	c.Close(websocket.StatusNormalClosure, "")

	// NDJSON: one object per line, flushed as it comes.
	req, _ := http.NewRequestWithContext(ctx, "GET", ts.URL+"/memory", nil)
	req.Header.Set("Authorization", "Bearer "+secret)
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	var mem struct{ Inuse *uint64 }
	if err != nil || json.Unmarshal([]byte(line), &mem) != nil || mem.Inuse == nil || *mem.Inuse == 0 {
		t.Errorf("/memory NDJSON line: %q, %v", line, err)
	}
	resp.Body.Close()

	// /logs: lines at the asked level and above, as they are logged.
	c, _, err = websocket.Dial(ctx, wsURL+"/logs?level=info&token="+secret, nil)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for ctx.Err() == nil {
			log.Debug("not this one")
			log.Info("flow ended", "dst", "10.233.1.1:443")
			time.Sleep(20 * time.Millisecond)
		}
	}()
	_, msg, err := c.Read(ctx)
	var ll LogLine
	if err != nil || json.Unmarshal(msg, &ll) != nil || ll.Type != "info" || !strings.Contains(ll.Payload, `msg="flow ended" dst=10.233.1.1:443`) {
		t.Errorf("log frame: %q, %v", msg, err)
	}
	c.Close(websocket.StatusNormalClosure, "")
	cancel()
}

func TestConfigsAndProxies(t *testing.T) {
	ts, b, _ := newTestServer(t)
	if resp, body := call(t, ts, "PATCH", "/configs", `{"mode":"direct"}`, true); resp.StatusCode != http.StatusNoContent {
		t.Errorf("PATCH /configs: %d %s", resp.StatusCode, body)
	}
	if _, body := call(t, ts, "GET", "/configs", "", true); !strings.Contains(body, `"mode":"direct"`) {
		t.Errorf("GET /configs after PATCH: %s", body)
	}
	if resp, body := call(t, ts, "PUT", "/configs", `{}`, true); resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "rules[0].outbound") {
		t.Errorf("PUT /configs with a broken file: %d %s, want 400 naming the key", resp.StatusCode, body)
	}
	if _, body := call(t, ts, "GET", "/proxies", "", true); !strings.Contains(body, `"GLOBAL"`) {
		t.Errorf("GET /proxies has no GLOBAL: %s", body)
	}
	if resp, _ := call(t, ts, "PUT", "/proxies/GLOBAL", `{"name":"direct"}`, true); resp.StatusCode != http.StatusNoContent {
		t.Errorf("PUT /proxies/GLOBAL: %d", resp.StatusCode)
	}
	if resp, _ := call(t, ts, "GET", "/proxies/direct/delay?url=http://10.233.1.1/&timeout=100", "", true); resp.StatusCode != http.StatusNotFound {
		t.Errorf("delay of an unknown proxy: %d, want 404", resp.StatusCode)
	}
	if resp, _ := call(t, ts, "GET", "/proxies/direct/delay?url=ftp://x", "", true); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("delay with a bad url: %d, want 400", resp.StatusCode)
	}
	if len(b.patched) != 1 {
		t.Errorf("patches %v", b.patched)
	}
}

func TestPProfOnlyWhenEnabled(t *testing.T) {
	leakcheck.Check(t)
	for _, enabled := range []bool{false, true} {
		s, err := New(Config{Listen: "127.0.0.1:0", Secret: secret, PProf: enabled}, prometheus.NewRegistry(), &fakeBackend{mode: "rule"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ts := httptest.NewServer(s.srv.Handler)
		want := http.StatusNotFound
		if enabled {
			want = http.StatusOK
		}
		for _, path := range []string{"/debug/pprof/", "/debug/pprof/cmdline"} {
			if resp, _ := call(t, ts, "GET", path, "", true); resp.StatusCode != want {
				t.Errorf("pprof %v: GET %s = %d, want %d", enabled, path, resp.StatusCode, want)
			}
		}
		if enabled {
			// Still behind the token.
			if resp, _ := call(t, ts, "GET", "/debug/pprof/", "", false); resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("pprof on: GET /debug/pprof/ without the bearer = %d, want 401", resp.StatusCode)
			}
		}
		s.Close()
		ts.Close()
	}
}
