package dnsproxy

import (
	"sync/atomic"
	"time"
)

// Stats is a snapshot of the proxy's counters (all totals since New) and
// gauges.
type Stats struct {
	Queries      uint64 // queries handled (fake, cached or forwarded), including FORMERR/NOTIMP ones
	CacheHits    uint64 // answered from the cache, stale answers included
	StaleHits    uint64 // of CacheHits, answered with an expired entry
	CacheMisses  uint64 // had to wait for an upstream answer
	Deduplicated uint64 // of CacheMisses, joined a query already in flight
	FormErr      uint64 // malformed queries answered with FORMERR
	Dropped      uint64 // datagrams dropped: shorter than a header, responses, or over the in-flight limit
	// UpstreamErrors counts failed upstream attempts (timeouts, transport
	// and TLS errors, unreadable answers), the sum of Upstreams[i].Errors.
	UpstreamErrors uint64

	CacheEntries   int // answers cached now
	FakeIPMappings int // fake-ip mappings now

	Upstreams []UpstreamStats // in configuration order
}

// UpstreamStats are the counters of one upstream.
type UpstreamStats struct {
	Upstream string // as configured
	Queries  uint64 // attempts
	Errors   uint64 // failed attempts
	// LatencySum and LatencyCount cover successful attempts only.
	LatencySum   time.Duration
	LatencyCount uint64
}

// counters are the proxy-wide atomic counters.
type counters struct {
	queries, cacheHits, staleHits, cacheMisses atomic.Uint64
	deduplicated, formErr, dropped             atomic.Uint64
}

// Stats returns a snapshot of the counters.
func (p *Proxy) Stats() Stats {
	s := Stats{
		Queries:      p.stats.queries.Load(),
		CacheHits:    p.stats.cacheHits.Load(),
		StaleHits:    p.stats.staleHits.Load(),
		CacheMisses:  p.stats.cacheMisses.Load(),
		Deduplicated: p.stats.deduplicated.Load(),
		FormErr:      p.stats.formErr.Load(),
		Dropped:      p.stats.dropped.Load(),
		CacheEntries: p.cache.len(),
		Upstreams:    make([]UpstreamStats, len(p.upstreams)),
	}
	if p.fake != nil {
		s.FakeIPMappings = p.fake.len()
	}
	for i, u := range p.upstreams {
		us := UpstreamStats{
			Upstream:     u.name,
			Queries:      u.queries.Load(),
			Errors:       u.errors.Load(),
			LatencySum:   time.Duration(u.latencyNs.Load()),
			LatencyCount: u.latencyN.Load(),
		}
		s.UpstreamErrors += us.Errors
		s.Upstreams[i] = us
	}
	return s
}
