package api

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
)

// tokenGate stands for the API's token check: 401 without the bearer
// token, 200 "ok" with it. It counts the requests that reached it.
type tokenGate struct{ reached int }

func (g *tokenGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.reached++
	if r.Header.Get("Authorization") != "Bearer s3cret" {
		w.Header().Set("WWW-Authenticate", "Bearer")
		http.Error(w, "unauthorized", http.StatusUnauthorized)
		return
	}
	w.Write([]byte("ok"))
}

// corsHeaders are the response headers CORS defines; none of them may be
// set for an origin that is not allowed.
var corsHeaders = []string{
	"Access-Control-Allow-Origin",
	"Access-Control-Allow-Methods",
	"Access-Control-Allow-Headers",
	"Access-Control-Allow-Private-Network",
	"Access-Control-Max-Age",
}

func TestCORS(t *testing.T) {
	const (
		page   = "http://127.0.0.1:8080"
		other  = "http://127.0.0.1:8081"
		bearer = "Bearer s3cret"
	)
	type want struct {
		status      int
		allowOrigin string // "" = no CORS headers at all
		reached     bool   // the request got past corsHandler
		privateNet  bool   // Access-Control-Allow-Private-Network: true
	}
	tests := []struct {
		name    string
		origins []string
		method  string
		header  map[string]string
		want    want
	}{
		{"allowed origin with the token", []string{page}, "GET",
			map[string]string{"Origin": page, "Authorization": bearer},
			want{status: 200, allowOrigin: page, reached: true}},
		{"allowed origin without the token: the API still refuses", []string{page}, "GET",
			map[string]string{"Origin": page},
			want{status: 401, allowOrigin: page, reached: true}},
		{"origin listed in other case", []string{"HTTP://127.0.0.1:8080"}, "GET",
			map[string]string{"Origin": page, "Authorization": bearer},
			want{status: 200, allowOrigin: page, reached: true}},
		{"any origin", []string{"*"}, "DELETE",
			map[string]string{"Origin": other, "Authorization": bearer},
			want{status: 200, allowOrigin: other, reached: true}},
		{"origin not listed", []string{page}, "GET",
			map[string]string{"Origin": other, "Authorization": bearer},
			want{status: 200, reached: true}},
		{"no origin (not a browser)", []string{page}, "GET",
			map[string]string{"Authorization": bearer},
			want{status: 200, reached: true}},
		{"no origins configured", nil, "GET",
			map[string]string{"Origin": page, "Authorization": bearer},
			want{status: 200, reached: true}},
		{"preflight, allowed origin, no token", []string{other, page}, "OPTIONS",
			map[string]string{"Origin": page, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"},
			want{status: 204, allowOrigin: page}},
		{"preflight for private network access", []string{page}, "OPTIONS",
			map[string]string{"Origin": page, "Access-Control-Request-Method": "GET", "Access-Control-Request-Private-Network": "true"},
			want{status: 204, allowOrigin: page, privateNet: true}},
		{"preflight, any origin", []string{"*"}, "OPTIONS",
			map[string]string{"Origin": other, "Access-Control-Request-Method": "PATCH"},
			want{status: 204, allowOrigin: other}},
		{"preflight, origin not listed: the token check answers", []string{page}, "OPTIONS",
			map[string]string{"Origin": other, "Access-Control-Request-Method": "GET", "Access-Control-Request-Private-Network": "true"},
			want{status: 401, reached: true}},
		{"preflight, no origins configured", nil, "OPTIONS",
			map[string]string{"Origin": page, "Access-Control-Request-Method": "GET"},
			want{status: 401, reached: true}},
		{"OPTIONS that is not a preflight", []string{page}, "OPTIONS",
			map[string]string{"Origin": page},
			want{status: 401, allowOrigin: page, reached: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			gate := &tokenGate{}
			h := corsHandler(tc.origins, gate)
			req := httptest.NewRequest(tc.method, "http://127.0.0.1:9090/version", nil)
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			res := rec.Result()
			call := fmt.Sprintf("%s /version, Origin %q", tc.method, tc.header["Origin"])

			if res.StatusCode != tc.want.status {
				t.Errorf("%s: status %d, want %d", call, res.StatusCode, tc.want.status)
			}
			if got := gate.reached > 0; got != tc.want.reached {
				t.Errorf("%s: reached the token check = %v, want %v", call, got, tc.want.reached)
			}
			if tc.want.allowOrigin == "" {
				for _, k := range corsHeaders {
					if v, ok := res.Header[k]; ok {
						t.Errorf("%s: %s: %q, want no CORS headers", call, k, v)
					}
				}
				return
			}
			wantHeaders := map[string]string{
				"Access-Control-Allow-Origin":  tc.want.allowOrigin,
				"Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
				"Access-Control-Allow-Headers": "Authorization, Content-Type",
			}
			for k, v := range wantHeaders {
				if got := res.Header.Get(k); got != v {
					t.Errorf("%s: %s: %q, want %q", call, k, got, v)
				}
			}
			if !slices.Contains(res.Header.Values("Vary"), "Origin") {
				t.Errorf("%s: Vary: %q, want Origin among them", call, res.Header.Values("Vary"))
			}
			gotPN := res.Header.Get("Access-Control-Allow-Private-Network")
			if (gotPN == "true") != tc.want.privateNet || (gotPN != "" && gotPN != "true") {
				t.Errorf("%s: Access-Control-Allow-Private-Network: %q, want it set to true: %v", call, gotPN, tc.want.privateNet)
			}
		})
	}
}

// TestCORSNoOriginsIsIdentity: without api.cors the handler is next
// itself, so nothing changes for anyone.
func TestCORSNoOriginsIsIdentity(t *testing.T) {
	next := http.NotFoundHandler()
	for _, origins := range [][]string{nil, {}} {
		if got := corsHandler(origins, next); got == nil {
			t.Fatalf("corsHandler(%q, next) = nil", origins)
		}
		rec := httptest.NewRecorder()
		req := httptest.NewRequest("GET", "/version", nil)
		req.Header.Set("Origin", "http://127.0.0.1:8080")
		corsHandler(origins, next).ServeHTTP(rec, req)
		if v := rec.Header().Values("Vary"); len(v) != 0 {
			t.Errorf("corsHandler(%q): Vary %q, want none", origins, v)
		}
	}
}

// TestWSOriginPatterns checks the patterns as github.com/coder/websocket
// matches them: a pattern with "://" against the Origin's scheme://host,
// "*" against its host, case-insensitively, with path.Match.
func TestWSOriginPatterns(t *testing.T) {
	origins := []string{"http://127.0.0.1:8080", "http://[::1]:3000", "https://Dash.example"}
	patterns := wsOriginPatterns(origins)
	if len(patterns) != len(origins) {
		t.Fatalf("wsOriginPatterns(%q) = %q, want one pattern per origin", origins, patterns)
	}
	match := func(pattern, origin string) bool {
		target := origin
		if !strings.Contains(pattern, "://") {
			target = origin[strings.Index(origin, "://")+3:]
		}
		ok, err := path.Match(strings.ToLower(pattern), strings.ToLower(target))
		if err != nil {
			t.Fatalf("pattern %q: %v", pattern, err)
		}
		return ok
	}
	tests := []struct {
		origin string
		want   bool
	}{
		{"http://127.0.0.1:8080", true},
		{"http://[::1]:3000", true},
		{"https://dash.example", true},
		{"http://127.0.0.1:8081", false},
		{"https://127.0.0.1:8080", false},
		{"http://dash.example", false},
		{"http://:", false},
	}
	for _, tc := range tests {
		got := slices.ContainsFunc(patterns, func(p string) bool { return match(p, tc.origin) })
		if got != tc.want {
			t.Errorf("Origin %q against wsOriginPatterns(%q) = %q: matched %v, want %v", tc.origin, origins, patterns, got, tc.want)
		}
	}
	if p := wsOriginPatterns([]string{"*"}); !slices.Equal(p, []string{"*"}) || !match(p[0], "http://anything.example:1234") {
		t.Errorf(`wsOriginPatterns(["*"]) = %q, want ["*"] matching any origin`, p)
	}
}

// TestWebSocketOrigins: a page at an origin in api.cors may open the
// streams from a browser (which sends its Origin on the upgrade); one at
// another origin, or at the same host with another scheme, may not. An
// IPv6 origin in the list must not break the others.
func TestWebSocketOrigins(t *testing.T) {
	cors := []string{"http://[::1]:3000", "http://127.0.0.1:8080"}
	s, err := New(Config{Listen: "127.0.0.1:0", Secret: secret, CORS: cors}, prometheus.NewRegistry(), &fakeBackend{mode: "rule"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.srv.Handler)
	t.Cleanup(func() {
		s.Close()
		ts.Close()
	})
	wsURL := "ws" + strings.TrimPrefix(ts.URL, "http") + "/traffic?token=" + secret
	tests := []struct {
		origin string
		ok     bool
	}{
		{"http://127.0.0.1:8080", true},
		{"http://[::1]:3000", true},
		{"http://127.0.0.1:8081", false},
		{"https://127.0.0.1:8080", false},
	}
	for _, tc := range tests {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, resp, err := websocket.Dial(ctx, wsURL, &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {tc.origin}}})
		cancel()
		if err == nil {
			c.Close(websocket.StatusNormalClosure, "")
		}
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		if (err == nil) != tc.ok {
			t.Errorf("WebSocket /traffic from Origin %s with api.cors %q: status %d, %v; want accepted: %v", tc.origin, cors, status, err, tc.ok)
		}
	}
}
