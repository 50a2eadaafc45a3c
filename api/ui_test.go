package api

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// uiFolder writes a dashboard-like folder with dot files in it, beside a
// file outside it, and returns the folder.
func uiFolder(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "ui")
	files := map[string]string{
		"ui/index.html":        "<!doctype html><title>dash</title>",
		"ui/assets/app.js":     "console.log(1)",
		"ui/assets/.map":       "hidden",
		"ui/list/a.txt":        "a",
		"ui/list/.secret":      "hidden",
		"ui/.env":              "SECRET=1",
		"ui/.git/config":       "[core]",
		"ui/.well-known/x":     "hidden",
		"outside.txt":          "OUTSIDE-FILE",
		"ui/list/sub/b.txt":    "b",
		"ui/list/.hiddendir/c": "c",
	}
	for name, body := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// uiMux mounts uiHandler the way api.New does: at "GET /ui/", beside an
// API that wants a token.
func uiMux(dir string) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET "+uiPrefix, uiHandler(dir))
	mux.Handle("/", &tokenGate{})
	return mux
}

func TestUI(t *testing.T) {
	h := uiMux(uiFolder(t))
	tests := []struct {
		path       string
		status     int
		body       string // a substring of the body ("" = not checked)
		location   string // for redirects
		notInBody  []string
		contentTyp string
	}{
		{path: "/ui/", status: 200, body: "<title>dash</title>", contentTyp: "text/html"},
		{path: "/ui/?token=s3cret", status: 200, body: "<title>dash</title>"},
		{path: "/ui", status: 307, location: "/ui/"},
		{path: "/ui/index.html", status: 301, location: "./"},
		{path: "/ui/assets/app.js", status: 200, body: "console.log(1)", contentTyp: "javascript"},
		{path: "/ui/list/", status: 200, body: `href="a.txt"`, notInBody: []string{".secret", ".hiddendir"}},
		{path: "/ui/list", status: 301, location: "list/"},
		{path: "/ui/list/sub/b.txt", status: 200, body: "b"},
		{path: "/ui/assets/", status: 200, body: "app.js", notInBody: []string{".map"}},
		{path: "/ui/.env", status: 404},
		{path: "/ui/.git/config", status: 404},
		{path: "/ui/.git/", status: 404},
		{path: "/ui/.well-known/x", status: 404},
		{path: "/ui/assets/.map", status: 404},
		{path: "/ui/list/.hiddendir/c", status: 404},
		{path: "/ui/missing.js", status: 404},
		// Outside the folder: the mux cleans the path, the file server
		// stays in the folder.
		{path: "/ui/../outside.txt", status: 307, location: "/outside.txt"},
		{path: "/ui/%2e%2e/outside.txt", status: 404},
		// The rest of the API still wants its token.
		{path: "/version", status: 401},
	}
	for _, tc := range tests {
		req := httptest.NewRequest("GET", "http://127.0.0.1:9090"+tc.path, nil)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		res := rec.Result()
		body, _ := io.ReadAll(res.Body)
		if res.StatusCode != tc.status {
			t.Errorf("GET %s: status %d, want %d; body %q", tc.path, res.StatusCode, tc.status, body)
			continue
		}
		if !strings.Contains(string(body), tc.body) {
			t.Errorf("GET %s: body %q, want it to contain %q", tc.path, body, tc.body)
		}
		if strings.Contains(string(body), "OUTSIDE-FILE") || strings.Contains(string(body), "SECRET") {
			t.Errorf("GET %s: body %q shows a file that must stay hidden", tc.path, body)
		}
		for _, s := range tc.notInBody {
			if strings.Contains(string(body), s) {
				t.Errorf("GET %s: body %q lists %q", tc.path, body, s)
			}
		}
		if tc.location != "" && res.Header.Get("Location") != tc.location {
			t.Errorf("GET %s: Location %q, want %q", tc.path, res.Header.Get("Location"), tc.location)
		}
		if tc.contentTyp != "" && !strings.Contains(res.Header.Get("Content-Type"), tc.contentTyp) {
			t.Errorf("GET %s: Content-Type %q, want %s", tc.path, res.Header.Get("Content-Type"), tc.contentTyp)
		}
	}
}

// TestUIHead: HEAD is served like GET (the "GET /ui/" pattern covers
// it), without a body.
func TestUIHead(t *testing.T) {
	h := uiMux(uiFolder(t))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("HEAD", "/ui/assets/app.js", nil))
	if rec.Code != 200 || rec.Body.Len() != 0 {
		t.Errorf("HEAD /ui/assets/app.js: status %d, %d body bytes; want 200 and none", rec.Code, rec.Body.Len())
	}
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("POST", "/ui/assets/app.js", nil))
	if rec.Code == 200 {
		t.Errorf("POST /ui/assets/app.js: status 200, want it refused")
	}
}
