package api

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Config says where the API listens and who may use it.
type Config struct {
	// Listen is host:port; the port may be 0 to pick a free one.
	Listen string
	// Secret, when set, is required as "Authorization: Bearer <secret>",
	// or as ?token=<secret> on a WebSocket upgrade (browsers cannot set
	// headers there).
	Secret string
	// CORS are the origins a browser page may call the API from.
	CORS []string
	// UI, when set, is a folder served at /ui/ without the token.
	UI string
	// Logs, when set, feeds /logs.
	Logs *LogHub
	// PProf serves Go's profiler at /debug/pprof/; off, those paths are
	// 404 like any other unknown path.
	PProf bool
}

// Server is the HTTP API. Lifecycle: New → Start → Close.
type Server struct {
	cfg     Config
	log     *slog.Logger
	backend Backend
	srv     *http.Server
	ln      net.Listener

	// originPatterns are cfg.CORS as patterns for WebSocket upgrades.
	originPatterns []string
	done           chan struct{} // closed by Close: streams end
	closeOnce      sync.Once
}

// New builds the API: /metrics over gatherer, /healthz, Go's profiler
// when cfg.PProf is set, and the Clash API over backend.
func New(cfg Config, gatherer prometheus.Gatherer, backend Backend, log *slog.Logger) (*Server, error) {
	if cfg.Listen == "" {
		return nil, errors.New("api: no listen address")
	}
	if backend == nil {
		return nil, errors.New("api: no backend")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: log, backend: backend, done: make(chan struct{})}
	s.originPatterns = wsOriginPatterns(cfg.CORS)
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	// Go's profiler, only when asked for (it shows the command line and
	// can stall the process for a profile), behind the same token: how a
	// slow flow is diagnosed on a user's machine.
	if cfg.PProf {
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	s.clashRoutes(mux)
	// The dashboard's static files need no token; a CORS preflight
	// carries none, so it is answered before the token check.
	root := http.NewServeMux()
	if cfg.UI != "" {
		root.Handle("GET /ui/", uiHandler(cfg.UI))
	}
	root.Handle("/", s.auth(mux))
	s.srv = &http.Server{
		Handler:           corsHandler(cfg.CORS, root),
		ReadHeaderTimeout: 5 * time.Second,
	}
	return s, nil
}

func (s *Server) auth(next http.Handler) http.Handler {
	if s.cfg.Secret == "" {
		return next
	}
	bearer := []byte("Bearer " + s.cfg.Secret)
	token := []byte(s.cfg.Secret)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ok := subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), bearer) == 1
		// A browser cannot set headers on a WebSocket: there, and only
		// there, the token may come in the URL.
		if !ok && strings.EqualFold(r.Header.Get("Upgrade"), "websocket") && r.URL.Query().Has("token") {
			ok = subtle.ConstantTimeCompare([]byte(r.URL.Query().Get("token")), token) == 1
		}
		if !ok {
			w.Header().Set("WWW-Authenticate", "Bearer")
			writeError(w, http.StatusUnauthorized, "unauthorized")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// clashRoutes registers the Clash API that dashboards call.
func (s *Server) clashRoutes(mux *http.ServeMux) {
	b := s.backend
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"hello": "tungate"})
	})
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"version": b.Version(), "meta": true})
	})
	mux.HandleFunc("GET /traffic", s.traffic)
	mux.HandleFunc("GET /memory", func(w http.ResponseWriter, r *http.Request) {
		s.tick(w, r, time.Second, func() any { return map[string]uint64{"inuse": memoryInUse(), "oslimit": 0} })
	})
	mux.HandleFunc("GET /logs", s.logs)
	mux.HandleFunc("GET /connections", s.connections)
	mux.HandleFunc("DELETE /connections", func(w http.ResponseWriter, _ *http.Request) {
		b.CloseAllConnections()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("DELETE /connections/{id}", func(w http.ResponseWriter, r *http.Request) {
		if !b.CloseConnection(r.PathValue("id")) {
			writeError(w, http.StatusNotFound, "no such connection")
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /proxies", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"proxies": b.Proxies()})
	})
	mux.HandleFunc("GET /proxies/{name}", func(w http.ResponseWriter, r *http.Request) {
		p, ok := b.Proxies()[r.PathValue("name")]
		if !ok {
			writeError(w, http.StatusNotFound, "no such proxy")
			return
		}
		writeJSON(w, http.StatusOK, p)
	})
	mux.HandleFunc("PUT /proxies/{name}", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			Name string `json:"name"`
		}
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&body); err != nil {
			writeError(w, http.StatusBadRequest, "body: "+err.Error())
			return
		}
		if err := b.Select(r.PathValue("name"), body.Name); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("GET /proxies/{name}/delay", s.delay)
	mux.HandleFunc("GET /rules", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"rules": b.Rules()})
	})
	mux.HandleFunc("GET /configs", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, b.Configs())
	})
	mux.HandleFunc("PATCH /configs", func(w http.ResponseWriter, r *http.Request) {
		var p ConfigPatch
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&p); err != nil {
			writeError(w, http.StatusBadRequest, "body: "+err.Error())
			return
		}
		if err := b.Patch(p); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("PUT /configs", func(w http.ResponseWriter, _ *http.Request) {
		if err := b.Reload(); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	for path, flush := range map[string]func() error{"POST /cache/dns/flush": b.FlushDNSCache, "POST /cache/fakeip/flush": b.FlushFakeIP} {
		mux.HandleFunc(path, func(w http.ResponseWriter, _ *http.Request) {
			if err := flush(); err != nil {
				writeError(w, http.StatusBadRequest, err.Error())
				return
			}
			w.WriteHeader(http.StatusNoContent)
		})
	}
	mux.HandleFunc("GET /dns/query", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		ans, err := b.QueryDNS(ctx, q.Get("name"), q.Get("type"))
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		writeJSON(w, http.StatusOK, ans)
	})
	for _, p := range []string{"GET /providers/proxies", "GET /providers/rules"} {
		mux.HandleFunc(p, func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, http.StatusOK, map[string]any{"providers": map[string]any{}})
		})
	}
	mux.HandleFunc("GET /nat", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"mappings": b.NAT()})
	})
	mux.HandleFunc("GET /explain", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		e, err := b.Explain(q.Get("dst"), q.Get("network"), q.Get("domain"))
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		writeJSON(w, http.StatusOK, e)
	})
}

// traffic streams {"up","down"}: bytes per second, every second.
func (s *Server) traffic(w http.ResponseWriter, r *http.Request) {
	lastUp, lastDown := s.backend.Totals()
	last := time.Now()
	first := true
	s.tick(w, r, time.Second, func() any {
		up, down := s.backend.Totals()
		now := time.Now()
		secs := now.Sub(last).Seconds()
		rate := map[string]uint64{"up": 0, "down": 0}
		if !first && secs > 0 {
			rate["up"] = uint64(float64(up-lastUp) / secs)
			rate["down"] = uint64(float64(down-lastDown) / secs)
		}
		first = false
		lastUp, lastDown, last = up, down, now
		return rate
	})
}

// connections answers one snapshot, or, with ?interval= or a WebSocket
// upgrade, a stream of them (interval in milliseconds, default 1000).
func (s *Server) connections(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	ws := r.Header.Get("Upgrade") != ""
	if !ws && !q.Has("interval") {
		writeJSON(w, http.StatusOK, s.backend.Connections())
		return
	}
	interval := time.Second
	if v := q.Get("interval"); v != "" {
		ms, err := strconv.Atoi(v)
		if err != nil || ms < 100 {
			writeError(w, http.StatusBadRequest, "interval: milliseconds, at least 100")
			return
		}
		interval = time.Duration(ms) * time.Millisecond
	}
	s.tick(w, r, interval, func() any { return s.backend.Connections() })
}

// logs streams log lines at ?level= and above.
func (s *Server) logs(w http.ResponseWriter, r *http.Request) {
	level, ok := ParseLevel(r.URL.Query().Get("level"))
	if !ok {
		writeError(w, http.StatusBadRequest, "level: debug, info, warning, error or silent")
		return
	}
	if s.cfg.Logs == nil {
		writeError(w, http.StatusNotFound, "no log stream")
		return
	}
	ctx, out, ok := s.openStream(w, r)
	if !ok {
		return
	}
	defer out.close()
	sub := s.cfg.Logs.subscribe(level)
	defer s.cfg.Logs.unsubscribe(sub)
	for {
		select {
		case <-ctx.Done():
			return
		case line := <-sub.lines:
			if err := out.send(ctx, line); err != nil {
				return
			}
		}
	}
}

// delay measures ?url= through the proxy, bounded by ?timeout= ms.
func (s *Server) delay(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	timeout := 5 * time.Second
	if v := q.Get("timeout"); v != "" {
		ms, err := strconv.Atoi(v)
		if err != nil || ms <= 0 {
			writeError(w, http.StatusBadRequest, "timeout: milliseconds")
			return
		}
		timeout = time.Duration(ms) * time.Millisecond
	}
	target := q.Get("url")
	if u, err := url.Parse(target); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		writeError(w, http.StatusBadRequest, "url: an http:// or https:// URL")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	d, err := s.backend.Delay(ctx, r.PathValue("name"), target)
	switch {
	case errors.Is(err, ErrNotFound):
		writeError(w, http.StatusNotFound, err.Error())
	case ctx.Err() != nil:
		writeError(w, http.StatusGatewayTimeout, "timeout")
	case err != nil:
		writeError(w, http.StatusServiceUnavailable, err.Error())
	default:
		writeJSON(w, http.StatusOK, map[string]int64{"delay": max(d.Milliseconds(), 1)})
	}
}

// ErrNotFound is a Backend's answer for a name it does not know.
var ErrNotFound = errors.New("not found")

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"message": msg})
}

// memoryInUse is the Go heap and stacks in use, in bytes.
func memoryInUse() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}, {Name: "/memory/classes/heap/stacks:bytes"}}
	metrics.Read(s)
	var n uint64
	for _, x := range s {
		if x.Value.Kind() == metrics.KindUint64 {
			n += x.Value.Uint64()
		}
	}
	return n
}

// Start listens and serves in the background.
func (s *Server) Start() error {
	ln, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("api: listen %s: %w", s.cfg.Listen, err)
	}
	s.ln = ln
	s.log.Info("api listening", "addr", ln.Addr().String())
	go func() {
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("api serve", "err", err)
		}
	}()
	return nil
}

// Addr is the address the API listens on, once started.
func (s *Server) Addr() net.Addr {
	if s.ln == nil {
		return nil
	}
	return s.ln.Addr()
}

// Close ends the streams and stops the server, giving open requests a
// second.
func (s *Server) Close() error {
	s.closeOnce.Do(func() { close(s.done) })
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	return s.srv.Shutdown(ctx)
}
