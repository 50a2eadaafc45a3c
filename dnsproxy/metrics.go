package dnsproxy

import "github.com/prometheus/client_golang/prometheus"

// collector exports the proxy's counters, per upstream where they are
// kept per upstream.
type collector struct {
	p                                            *Proxy
	queries, hits, stale, misses, dedup, formerr *prometheus.Desc
	dropped, upErrs, entries, fakeMappings       *prometheus.Desc
	upQueries, upErrors, upLatency               *prometheus.Desc
}

// Collector returns the proxy's counters as Prometheus metrics.
func (p *Proxy) Collector() prometheus.Collector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("tungate_dns_"+name, help, labels, nil)
	}
	return &collector{
		p:            p,
		queries:      d("queries_total", "DNS queries answered by the proxy."),
		hits:         d("cache_hits_total", "Queries answered from the cache (stale included)."),
		stale:        d("cache_stale_hits_total", "Queries answered with an expired entry while it refreshed."),
		misses:       d("cache_misses_total", "Queries that waited for an upstream."),
		dedup:        d("deduplicated_total", "Cache misses that joined an identical query in flight."),
		formerr:      d("formerr_total", "Malformed queries answered with FORMERR."),
		dropped:      d("dropped_total", "Query datagrams dropped (runts, responses, over the in-flight limit)."),
		upErrs:       d("upstream_errors_total", "Failed upstream attempts, all upstreams."),
		entries:      d("cache_entries", "Answers cached now."),
		fakeMappings: d("fakeip_mappings", "Fake-ip mappings held now."),
		upQueries:    d("upstream_queries_total", "Attempts at an upstream.", "upstream"),
		upErrors:     d("upstream_attempt_errors_total", "Failed attempts at an upstream.", "upstream"),
		upLatency:    d("upstream_latency_seconds", "Upstream answer latency.", "upstream"),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	st := c.p.Stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(c.queries, st.Queries)
	counter(c.hits, st.CacheHits)
	counter(c.stale, st.StaleHits)
	counter(c.misses, st.CacheMisses)
	counter(c.dedup, st.Deduplicated)
	counter(c.formerr, st.FormErr)
	counter(c.dropped, st.Dropped)
	counter(c.upErrs, st.UpstreamErrors)
	ch <- prometheus.MustNewConstMetric(c.entries, prometheus.GaugeValue, float64(st.CacheEntries))
	ch <- prometheus.MustNewConstMetric(c.fakeMappings, prometheus.GaugeValue, float64(st.FakeIPMappings))
	for _, u := range st.Upstreams {
		counter(c.upQueries, u.Queries, u.Upstream)
		counter(c.upErrors, u.Errors, u.Upstream)
		ch <- prometheus.MustNewConstSummary(c.upLatency, u.LatencyCount, u.LatencySum.Seconds(), nil, u.Upstream)
	}
}
