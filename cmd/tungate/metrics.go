package main

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/tungate/tungate/netstack"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/outbound/httpconnect"
	"github.com/tungate/tungate/outbound/socks5"
)

// registerMetrics exposes the gateway's counters, plus the Go runtime's
// (go_goroutines among them: how tests see that flows leave nothing behind).
func registerMetrics(reg *prometheus.Registry, g *gateway) {
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	counter := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: "tungate", Name: name, Help: help}, f))
	}
	gauge := func(name, help string, f func() float64) {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tungate", Name: name, Help: help}, f))
	}
	reg.MustRegister(newStackCollector(g.stack))

	tcp := g.tcp.Stats()
	counter("tcp_flows_total", "TCP flows relayed.", func() float64 { return float64(tcp.Accepted.Load()) })
	counter("tcp_dial_failed_total", "TCP upstream dials that failed (timeout, unreachable).", func() float64 { return float64(tcp.DialFailed.Load()) })
	counter("tcp_refused_total", "TCP flows refused by the upstream or a reject outbound.", func() float64 { return float64(tcp.Refused.Load()) })
	counter("tcp_idle_closed_total", "TCP flows closed by stack.tcp.idle_timeout.", func() float64 { return float64(tcp.IdleClosed.Load()) })
	gauge("tcp_flows_active", "TCP flows open now.", func() float64 { return float64(tcp.Active.Load()) })
	counter("tcp_bytes_up_total", "Bytes relayed from apps to upstreams.", func() float64 { return float64(tcp.BytesUp.Load()) })
	counter("tcp_bytes_down_total", "Bytes relayed from upstreams to apps.", func() float64 { return float64(tcp.BytesDown.Load()) })

	if g.dns != nil {
		reg.MustRegister(newDNSCollector(g))
	}
	reg.MustRegister(newProxyCollector(g.dialers))

	udp := g.udp.Stats()
	counter("udp_sessions_total", "UDP mappings opened.", func() float64 { return float64(udp.Opened.Load()) })
	counter("udp_sessions_expired_total", "UDP mappings removed after their idle timeout.", func() float64 { return float64(udp.Expired.Load()) })
	counter("udp_sessions_failed_total", "UDP mappings whose upstream session failed to open.", func() float64 { return float64(udp.Failed.Load()) })
	counter("udp_sessions_refused_total", "UDP mappings refused over stack.udp.max_sessions.", func() float64 { return float64(udp.RefusedOverCap.Load()) })
	counter("udp_refused_by_outbound_total", "UDP datagrams refused because their outbound carries no UDP (reject, http).", func() float64 { return float64(udp.RefusedByOutbound.Load()) })
	gauge("udp_sessions_active", "UDP mappings live now.", func() float64 { return float64(udp.Active.Load()) })
	counter("udp_packets_up_total", "UDP datagrams sent upstream.", func() float64 { return float64(udp.PacketsUp.Load()) })
	counter("udp_packets_down_total", "UDP datagrams delivered to apps.", func() float64 { return float64(udp.PacketsDown.Load()) })
	counter("udp_dropped_total", "UDP datagrams dropped (session not ready, send failed, symmetric mismatch).", func() float64 { return float64(udp.Dropped.Load()) })
}

// stackMetric is one of the netstack's counters.
type stackMetric struct {
	desc *prometheus.Desc
	val  func(netstack.Stats) uint64
}

// stackCollector exports the netstack's counters from one Stats snapshot
// a scrape (Stats copies gVisor's whole statistics tree).
type stackCollector struct {
	stack   *netstack.Stack
	metrics []stackMetric
}

func newStackCollector(stack *netstack.Stack) *stackCollector {
	c := &stackCollector{stack: stack}
	m := func(name, help string, val func(netstack.Stats) uint64) {
		c.metrics = append(c.metrics, stackMetric{prometheus.NewDesc("tungate_"+name, help, nil, nil), val})
	}
	m("packets_in_total", "IP packets read from the TUN.", func(s netstack.Stats) uint64 { return s.PacketsIn })
	m("packets_out_total", "IP packets written to the TUN.", func(s netstack.Stats) uint64 { return s.PacketsOut })
	m("packets_malformed_total", "Packets dropped as malformed.", func(s netstack.Stats) uint64 { return s.Malformed })
	m("tcp_syn_dropped_in_flight_total", "SYNs dropped because stack.tcp.max_in_flight dials were under way.", func(s netstack.Stats) uint64 { return s.SYNsDroppedInFlight })
	m("tun_read_errors_total", "Failed TUN reads.", func(s netstack.Stats) uint64 { return s.TUNReadErrors })
	m("tun_write_errors_total", "Failed TUN writes.", func(s netstack.Stats) uint64 { return s.TUNWriteErrors })
	m("udp_refused_total", "UDP datagrams refused (ICMP port unreachable to the app).", func(s netstack.Stats) uint64 { return s.UDPRefused })
	m("udp_reply_too_big_total", "UDP replies too big to send to the app.", func(s netstack.Stats) uint64 { return s.UDPReplyTooBig })
	return c
}

func (c *stackCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

func (c *stackCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stack.Stats()
	for _, m := range c.metrics {
		ch <- prometheus.MustNewConstMetric(m.desc, prometheus.CounterValue, float64(m.val(st)))
	}
}

// dnsCollector exports the DNS proxy's counters, per upstream where they
// are kept per upstream.
type dnsCollector struct {
	g                                            *gateway
	queries, hits, stale, misses, dedup, formerr *prometheus.Desc
	dropped, upErrs, entries, fakeMappings       *prometheus.Desc
	upQueries, upErrors, upLatency               *prometheus.Desc
}

func newDNSCollector(g *gateway) *dnsCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("tungate_dns_"+name, help, labels, nil)
	}
	return &dnsCollector{
		g:            g,
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

func (c *dnsCollector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

func (c *dnsCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.g.dns.Stats()
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

// proxyCollector exports the proxy outbounds' own counters, labelled by
// outbound: what the forwarder's counters cannot tell apart (a refusal by
// the proxy from one by the destination, UDP relay drops).
type proxyCollector struct {
	dialers                                   map[string]outbound.Dialer
	dials, failures, refused, assoc, udpDrops *prometheus.Desc
}

func newProxyCollector(dialers map[string]outbound.Dialer) *proxyCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("tungate_outbound_"+name, help, append([]string{"outbound"}, labels...), nil)
	}
	return &proxyCollector{
		dialers:  dialers,
		dials:    d("proxy_dials_total", "Connections opened to a proxy (CONNECT, UDP ASSOCIATE)."),
		failures: d("proxy_dial_failures_total", "Proxy dials that failed other than by a refusal (unreachable, silent, protocol error)."),
		refused:  d("proxy_refused_total", "Proxy dials refused (by the destination via the proxy, failed authentication, the proxy's port closed)."),
		assoc:    d("socks5_udp_associations_total", "SOCKS5 UDP associations opened."),
		udpDrops: d("socks5_udp_dropped_total", "Datagrams from a SOCKS5 relay dropped.", "reason"),
	}
}

func (c *proxyCollector) Describe(ch chan<- *prometheus.Desc) {
	prometheus.DescribeByCollect(c, ch)
}

func (c *proxyCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	for name, d := range c.dialers {
		switch d := d.(type) {
		case *socks5.Dialer:
			st := d.Stats()
			counter(c.dials, st.Dials, name)
			counter(c.failures, st.DialFailures, name)
			counter(c.refused, st.Refused, name)
			counter(c.assoc, st.UDPAssociations, name)
			counter(c.udpDrops, st.UDPDroppedFragment, name, "fragment")
			counter(c.udpDrops, st.UDPDroppedName, name, "name")
			counter(c.udpDrops, st.UDPDroppedMalformed, name, "malformed")
		case *httpconnect.Dialer:
			st := d.Stats()
			counter(c.dials, st.Dials, name)
			counter(c.failures, st.DialFailures, name)
			counter(c.refused, st.Refused, name)
		}
	}
}
