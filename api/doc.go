// Package api serves tungate's HTTP API: Prometheus metrics at /metrics, a
// health check at /healthz and Go's profiler at /debug/pprof/, behind an
// optional bearer token. It serves a
// registry it is given and knows nothing of what fills it.
package api
