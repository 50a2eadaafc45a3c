// Package api serves tungate's HTTP API: Prometheus metrics at /metrics, a
// health check at /healthz, Go's profiler at /debug/pprof/ (api.pprof), and the Clash
// API that dashboards (metacubexd, zashboard, yacd) and `tungate status`
// call — versions, live connections and their closing, traffic, memory
// and log streams (WebSocket or newline-delimited JSON), proxies, rules,
// modes, reload, DNS — plus tungate's own /nat and /explain; behind a
// bearer token (?token= on WebSocket upgrades), with CORS for the origins
// api.cors lists and a dashboard's files from api.ui at /ui/.
//
// It serves a registry it is given and a Backend (the gateway); it holds
// no data-plane state of its own beyond the /logs streams (LogHub).
package api
