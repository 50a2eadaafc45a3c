package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/api"
	"github.com/tungate/tungate/configs"
)

// cannedConnections is a /connections answer as the Clash API gives it
// (string ports, cumulative counters).
const cannedConnections = `{
  "downloadTotal": 314572800,
  "uploadTotal": 10485760,
  "memory": 52428800,
  "connections": [
    {"id": "1", "metadata": {"network": "tcp", "type": "Tun", "sourceIP": "172.19.0.1", "sourcePort": "40000",
      "destinationIP": "10.233.1.1", "destinationPort": "443", "host": "example.org", "dnsMode": "fake-ip",
      "inboundName": "tun", "uid": 1000, "process": "", "processPath": ""},
     "upload": 1024, "download": 3145728, "start": "2026-12-03T14:00:00Z", "chains": ["direct"],
     "rule": "rules[0]", "rulePayload": "domain_suffix example.org"},
    {"id": "2", "metadata": {"network": "udp", "type": "Tun", "sourceIP": "fdfe:dcba:9876::1", "sourcePort": "5353",
      "destinationIP": "fd00:233:1::1", "destinationPort": "53", "host": "", "dnsMode": "normal",
      "inboundName": "tun", "process": "", "processPath": ""},
     "upload": 300, "download": 500, "start": "2026-12-03T14:00:01Z", "chains": ["socks", "GLOBAL"],
     "rule": "final", "rulePayload": ""},
    {"id": "3", "metadata": {"network": "tcp", "type": "Tun", "sourceIP": "172.19.0.1", "sourcePort": "40002",
      "destinationIP": "10.233.1.2", "destinationPort": "80", "host": "", "dnsMode": "normal",
      "inboundName": "tun", "process": "", "processPath": ""},
     "upload": 10485760, "download": 0, "start": "2026-12-03T14:00:02Z", "chains": ["direct"],
     "rule": "final", "rulePayload": ""}
  ]
}`

const cannedProxies = `{"proxies": {
  "GLOBAL": {"name": "GLOBAL", "type": "Selector", "all": ["direct", "socks", "block"], "now": "direct", "history": [], "udp": true},
  "direct": {"name": "direct", "type": "Direct", "history": [], "udp": true},
  "socks": {"name": "socks", "type": "Socks5", "history": [], "udp": true},
  "block": {"name": "block", "type": "Reject", "history": [], "udp": true}
}}`

// wantOnce is `status --once` over the canned answers: connections by
// bytes, host names with their address, IPv6 in brackets, the chain from
// the group to the outbound that dialled.
const wantOnce = `total up 10.0 MiB down 300.0 MiB  connections 3

outbounds
  block   Reject
  direct  Direct
  socks   Socks5
  GLOBAL  Selector, now direct

connections, busiest first (by bytes)
  NET  DESTINATION                   RULE                                  OUTBOUND        UP        DOWN
  tcp  10.233.1.2:80                 final                                 direct          10.0 MiB  0 B
  tcp  example.org:443 (10.233.1.1)  rules[0] (domain_suffix example.org)  direct          1.0 KiB   3.0 MiB
  udp  [fd00:233:1::1]:53            final                                 GLOBAL → socks  300 B     500 B
`

// fakeAPI serves canned /connections and /proxies answers behind secret
// ("" = none) and counts the requests it refused.
type fakeAPI struct {
	secret      string
	proxies     string
	mu          sync.Mutex
	connections func() string
	refused     int
}

func (f *fakeAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if f.secret != "" && r.Header.Get("Authorization") != "Bearer "+f.secret {
		f.mu.Lock()
		f.refused++
		f.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"message":"unauthorized"}`))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	switch r.URL.Path {
	case "/connections":
		f.mu.Lock()
		body := f.connections()
		f.mu.Unlock()
		w.Write([]byte(body))
	case "/proxies":
		w.Write([]byte(f.proxies))
	default:
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"message":"not found"}`))
	}
}

func startFakeAPI(t *testing.T, f *fakeAPI) string {
	t.Helper()
	if f.proxies == "" {
		f.proxies = cannedProxies
	}
	if f.connections == nil {
		f.connections = func() string { return cannedConnections }
	}
	srv := httptest.NewServer(f)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// runStatusCmd runs `tungate status args…` with a config whose API is at
// listen with secret, and returns its output.
func runStatusCmd(t *testing.T, listen, secret string, args ...string) (string, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tungate.yaml")
	cfg := "api:\n  listen: " + listen + "\n  secret: " + secret + "\n"
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return runRoot(t, append(append([]string{"status"}, args...), "--config", path)...)
}

func runRoot(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	root := newRootCmd()
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&out)
	err := root.Execute()
	return out.String(), err
}

func TestStatusOnce(t *testing.T) {
	f := &fakeAPI{secret: "s3cret"}
	addr := startFakeAPI(t, f)
	out, err := runStatusCmd(t, addr, "s3cret", "--once")
	if err != nil {
		t.Fatalf("status --once: %v\n%s", err, out)
	}
	if out != wantOnce {
		t.Errorf("status --once printed\n%s\nwant\n%s", out, wantOnce)
	}
	if f.refused != 0 {
		t.Errorf("the API refused %d requests: the bearer token was not sent", f.refused)
	}
}

func TestStatusJSON(t *testing.T) {
	addr := startFakeAPI(t, &fakeAPI{secret: "s3cret"})
	out, err := runStatusCmd(t, addr, "s3cret", "--json")
	if err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if !strings.HasPrefix(out, "{\n  \"downloadTotal\": 314572800,\n") {
		t.Errorf("status --json is not the snapshot, indented:\n%s", out)
	}
	// The snapshot type the api package serves, string ports and all.
	var snap api.Snapshot
	dec := json.NewDecoder(strings.NewReader(out))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&snap); err != nil {
		t.Fatalf("status --json does not decode into api.Snapshot: %v\n%s", err, out)
	}
	if len(snap.Connections) != 3 || snap.Connections[1].Metadata.DestinationPort != "53" || snap.Memory != 52428800 {
		t.Errorf("status --json lost fields: %+v", snap)
	}
}

// TestStatusDecodesAPITypes holds status's client types to the api
// package's: what the server marshals, status reads.
func TestStatusDecodesAPITypes(t *testing.T) {
	uid := int64(1000)
	raw, err := json.Marshal(api.Snapshot{
		DownloadTotal: 7, UploadTotal: 5,
		Connections: []api.Connection{{
			ID: "42",
			Metadata: api.Metadata{Network: "tcp", DestinationIP: "10.233.1.1", DestinationPort: "5001",
				Host: "bulk.test", UID: &uid},
			Upload: 3, Download: 4, Chains: []string{"direct"}, Rule: "rules[2]", RulePayload: "port 5001",
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	var s clashSnapshot
	if err := json.Unmarshal(raw, &s); err != nil {
		t.Fatalf("decoding api.Snapshot: %v", err)
	}
	c := s.Connections[0]
	if s.DownloadTotal != 7 || s.UploadTotal != 5 || c.ID != "42" || c.Metadata.Network != "tcp" ||
		connDestination(&c) != "bulk.test:5001 (10.233.1.1)" || c.Upload != 3 || c.Download != 4 ||
		connChain(&c) != "direct" || connRule(&c) != "rules[2] (port 5001)" {
		t.Errorf("api.Snapshot %s decoded as %+v", raw, s)
	}
	raw, err = json.Marshal(map[string]any{"proxies": map[string]api.Proxy{
		"GLOBAL": {Name: "GLOBAL", Type: "Selector", All: []string{"direct"}, Now: "direct", History: []api.Delay{}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	var p struct {
		Proxies map[string]clashProxy `json:"proxies"`
	}
	if err := json.Unmarshal(raw, &p); err != nil {
		t.Fatal(err)
	}
	if g := p.Proxies["GLOBAL"]; g != (clashProxy{Name: "GLOBAL", Type: "Selector", Now: "direct"}) {
		t.Errorf("api.Proxy %s decoded as %+v", raw, g)
	}
}

// TestStatusRates renders a frame from two snapshots 2 s apart: rates are
// the counters' differences over 2 s, and the busiest connection is the
// fastest now, not the one that moved the most bytes.
func TestStatusRates(t *testing.T) {
	conn := func(id string, up, down uint64) clashConnection {
		c := clashConnection{ID: id, Upload: up, Download: down, Chains: []string{"direct"}, Rule: "final"}
		c.Metadata.Network = "tcp"
		c.Metadata.DestinationIP = "10.233.1." + id
		c.Metadata.DestinationPort = "5001"
		return c
	}
	t0 := time.Date(2026, 12, 3, 14, 0, 0, 0, time.UTC)
	prev := statusSample{at: t0, snap: clashSnapshot{
		UploadTotal: 1 << 20, DownloadTotal: 100 << 20,
		Connections: []clashConnection{conn("1", 0, 1<<20), conn("3", 0, 90<<20), conn("5", 0, 5<<20)},
	}}
	cur := statusSample{at: t0.Add(2 * time.Second), snap: clashSnapshot{
		UploadTotal: 1<<20 + 2048, DownloadTotal: 170 << 20,
		// 1: +4 MiB down; 3: idle, the most bytes; 4: new, 1 MiB down and
		// 1 KiB up; 5 is gone.
		Connections: []clashConnection{conn("1", 0, 5<<20), conn("3", 0, 90<<20), conn("4", 1024, 1<<20)},
	}}
	var out bytes.Buffer
	renderStatus(&out, &prev, cur, nil)
	want := `up 1.0 KiB/s down 35.0 MiB/s  total up 1.0 MiB down 170.0 MiB  connections 3

outbounds

connections, busiest first (by rate)
  NET  DESTINATION      RULE   OUTBOUND  UP/S   DOWN/S     UP       DOWN
  tcp  10.233.1.1:5001  final  direct    0 B    2.0 MiB    0 B      5.0 MiB
  tcp  10.233.1.4:5001  final  direct    512 B  512.0 KiB  1.0 KiB  1.0 MiB
  tcp  10.233.1.3:5001  final  direct    0 B    0 B        0 B      90.0 MiB
`
	if out.String() != want {
		t.Errorf("frame from two snapshots:\n%s\nwant\n%s", out.String(), want)
	}
}

// TestStatusTop lists the 20 busiest of 25 connections and says so.
func TestStatusTop(t *testing.T) {
	var s clashSnapshot
	for i := range 25 {
		c := clashConnection{ID: string(rune('a' + i)), Download: uint64(i+1) * 1000, Rule: "final", Chains: []string{"direct"}}
		c.Metadata.Network, c.Metadata.DestinationIP, c.Metadata.DestinationPort = "tcp", "10.233.1.1", "1"
		s.Connections = append(s.Connections, c)
	}
	var out bytes.Buffer
	renderStatus(&out, nil, statusSample{snap: s}, nil)
	text := out.String()
	if !strings.Contains(text, "connections: the 20 busiest of 25, by bytes\n") {
		t.Errorf("frame does not say it lists 20 of 25:\n%s", text)
	}
	if n := strings.Count(text, "10.233.1.1:1"); n != 20 {
		t.Errorf("frame lists %d connections, want 20:\n%s", n, text)
	}
	// The busiest first (25,000 B = 24.4 KiB), the 20th is 6,000 B; the
	// five smallest are left out.
	first := strings.Index(text, "24.4 KiB")
	last := strings.Index(text, "5.9 KiB")
	if first < 0 || last < first || strings.Contains(text, "4.9 KiB") {
		t.Errorf("not the 20 busiest in order:\n%s", text)
	}
}

func TestIECBytes(t *testing.T) {
	for _, tc := range []struct {
		n    float64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{1<<20 - 1, "1.0 MiB"},
		{1.2 * (1 << 20), "1.2 MiB"},
		{35 << 20, "35.0 MiB"},
		{300 << 20, "300.0 MiB"},
		{5 << 30, "5.0 GiB"},
		{3 << 40, "3.0 TiB"},
	} {
		if got := iecBytes(tc.n); got != tc.want {
			t.Errorf("iecBytes(%v) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

func TestStatusConnDestination(t *testing.T) {
	for _, tc := range []struct{ ip, port, host, want string }{
		{"10.233.1.1", "443", "", "10.233.1.1:443"},
		{"10.233.1.1", "443", "example.org", "example.org:443 (10.233.1.1)"},
		{"198.18.0.5", "80", "fake.test", "fake.test:80 (198.18.0.5)"},
		{"fd00:233:1::1", "53", "", "[fd00:233:1::1]:53"},
		{"10.233.1.1", "443", "10.233.1.1", "10.233.1.1:443"},
	} {
		var c clashConnection
		c.Metadata.DestinationIP, c.Metadata.DestinationPort, c.Metadata.Host = tc.ip, tc.port, tc.host
		if got := connDestination(&c); got != tc.want {
			t.Errorf("connDestination(%s, %s, %q) = %q, want %q", tc.ip, tc.port, tc.host, got, tc.want)
		}
	}
}

func TestStatusErrors(t *testing.T) {
	t.Run("API off", func(t *testing.T) {
		out, err := runRoot(t, "status", "--once")
		if err == nil || err.Error() != "the control API is off: set api.listen in the config" {
			t.Errorf("status on the embedded default: %v\n%s", err, out)
		}
	})
	t.Run("wrong secret", func(t *testing.T) {
		addr := startFakeAPI(t, &fakeAPI{secret: "s3cret"})
		for _, secret := range []string{"wrong", ""} {
			_, err := runStatusCmd(t, addr, secret, "--once")
			if !errors.Is(err, errSecretRefused) || err.Error() != "the API refused the secret (api.secret)" {
				t.Errorf("secret %q refused: %v; want %q", secret, err, errSecretRefused)
			}
		}
	})
	t.Run("closed port", func(t *testing.T) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		_, err = runStatusCmd(t, addr, "", "--json")
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("status against a closed port: %v; want ECONNREFUSED", err)
		}
		msg := err.Error()
		if !strings.HasPrefix(msg, "cannot reach tungate's API at "+addr+": dial tcp ") ||
			!strings.HasSuffix(msg, "connection refused (is tungate running with api.listen set?)") || strings.Contains(msg, "\n") {
			t.Errorf("status against a closed port: %q", msg)
		}
	})
	t.Run("not a snapshot", func(t *testing.T) {
		addr := startFakeAPI(t, &fakeAPI{connections: func() string { return `{"connections": 3}` }})
		_, err := runStatusCmd(t, addr, "", "--once")
		if err == nil || !strings.Contains(err.Error(), "GET /connections: unexpected answer") {
			t.Errorf("status on a malformed answer: %v", err)
		}
		_, err = runStatusCmd(t, addr, "", "--json")
		if err == nil || !strings.Contains(err.Error(), "GET /connections: unexpected answer") {
			t.Errorf("status --json on a malformed answer: %v", err)
		}
	})
	t.Run("numeric ports", func(t *testing.T) {
		// Clash's ports are strings; a number means the answer is not the
		// Clash API.
		addr := startFakeAPI(t, &fakeAPI{connections: func() string {
			return `{"connections": [{"id": "1", "metadata": {"destinationPort": 443}}]}`
		}})
		if _, err := runStatusCmd(t, addr, "", "--once"); err == nil {
			t.Error("status accepted a numeric port")
		}
	})
	t.Run("server error", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.WriteHeader(http.StatusInternalServerError)
			w.Write([]byte(`{"message":"tracker gone"}`))
		}))
		defer srv.Close()
		addr := strings.TrimPrefix(srv.URL, "http://")
		_, err := runStatusCmd(t, addr, "", "--once")
		want := "tungate's API at " + addr + ": GET /connections: 500 Internal Server Error: tracker gone"
		if err == nil || err.Error() != want {
			t.Errorf("status on a 500: %v; want %q", err, want)
		}
	})
}

func TestAPIDialAddr(t *testing.T) {
	for _, tc := range []struct{ listen, want string }{
		{"127.0.0.1:9090", "127.0.0.1:9090"},
		{":9090", "127.0.0.1:9090"},
		{"0.0.0.0:9090", "127.0.0.1:9090"},
		{"[::]:9090", "[::1]:9090"},
		{"[fd00::1]:9090", "[fd00::1]:9090"},
		{"localhost:9090", "localhost:9090"},
		{"127.0.0.1:0", ""},
	} {
		got, err := apiDialAddr(tc.listen)
		if (err != nil) != (tc.want == "") || got != tc.want {
			t.Errorf("apiDialAddr(%q) = %q, %v; want %q", tc.listen, got, err, tc.want)
		}
	}
}

// frameWriter collects the frames of watchStatus and cancels it after n.
type frameWriter struct {
	frames []string
	n      int
	cancel context.CancelFunc
}

func (w *frameWriter) Write(p []byte) (int, error) {
	w.frames = append(w.frames, string(p))
	if len(w.frames) == w.n {
		w.cancel()
	}
	return len(p), nil
}

// TestStatusWatch runs the live view against an API whose counters grow
// with every request: frames follow each other a blank line apart (or
// each clears the terminal), the first without rates and the next ones with
// them, and the view ends quietly when cancelled (Ctrl-C).
func TestStatusWatch(t *testing.T) {
	for _, tty := range []bool{false, true} {
		var mu sync.Mutex
		down := 0
		addr := startFakeAPI(t, &fakeAPI{connections: func() string {
			mu.Lock()
			defer mu.Unlock()
			down += 1 << 20
			b, _ := json.Marshal(api.Snapshot{DownloadTotal: uint64(down), Connections: []api.Connection{{
				ID: "1", Metadata: api.Metadata{Network: "tcp", DestinationIP: "10.233.1.1", DestinationPort: "5001"},
				Download: uint64(down), Chains: []string{"direct"}, Rule: "final",
			}}})
			return string(b)
		}})
		c, err := newAPIClient(apiConfig(addr))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		w := &frameWriter{n: 3, cancel: cancel}
		err = watchStatus(ctx, w, c, tty, 20*time.Millisecond)
		if ctx.Err() != context.Canceled {
			t.Fatalf("tty=%v: the view did not get to 3 frames: %v", tty, ctx.Err())
		}
		cancel()
		if err != nil {
			t.Errorf("tty=%v: watchStatus after Ctrl-C: %v, want nil", tty, err)
		}
		if len(w.frames) != 3 {
			t.Fatalf("tty=%v: %d frames, want 3", tty, len(w.frames))
		}
		for i, f := range w.frames {
			var prefix string
			switch {
			case tty:
				prefix = clearScreen
			case i > 0:
				prefix = "\n"
			}
			rest, ok := strings.CutPrefix(f, prefix)
			if !ok || (!tty && strings.Contains(f, "\x1b")) {
				t.Errorf("tty=%v: frame %d does not start with %q alone:\n%q", tty, i, prefix, f)
			}
			// The first frame has no rates; the next ones do, and the one
			// connection moves (1 MiB a frame, so not 0 B/s).
			if live := strings.HasPrefix(rest, "up 0 B/s down "); live != (i > 0) || (i > 0 && strings.Contains(rest, "down 0 B/s")) {
				t.Errorf("tty=%v: frame %d header:\n%s", tty, i, rest)
			}
			if i > 0 && !strings.Contains(rest, "by rate") {
				t.Errorf("tty=%v: frame %d does not rank by rate:\n%s", tty, i, rest)
			}
		}
	}
}

// TestStatusWatchAPIGone ends the live view with the error when tungate
// stops answering.
func TestStatusWatchAPIGone(t *testing.T) {
	srv := httptest.NewServer(&fakeAPI{proxies: cannedProxies, connections: func() string { return cannedConnections }})
	c, err := newAPIClient(apiConfig(strings.TrimPrefix(srv.URL, "http://")))
	if err != nil {
		t.Fatal(err)
	}
	w := &frameWriter{n: 1, cancel: srv.Close}
	err = watchStatus(context.Background(), w, c, false, 10*time.Millisecond)
	if !errors.Is(err, syscall.ECONNREFUSED) || len(w.frames) != 1 {
		t.Errorf("watchStatus after the API went: %v after %d frames; want ECONNREFUSED after 1", err, len(w.frames))
	}
}

func apiConfig(listen string) configs.API { return configs.API{Listen: listen} }
