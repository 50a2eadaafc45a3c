package forwarder

import "github.com/prometheus/client_golang/prometheus"

// metric is one of a relay's counters, read at each scrape.
type metric[S any] struct {
	desc *prometheus.Desc
	kind prometheus.ValueType
	val  func(*S) float64
}

// collector exports a relay's counters.
type collector[S any] struct {
	stats   *S
	metrics []metric[S]
}

func (c *collector[S]) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

func (c *collector[S]) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c.metrics {
		ch <- prometheus.MustNewConstMetric(m.desc, m.kind, m.val(c.stats))
	}
}

func (c *collector[S]) add(kind prometheus.ValueType, name, help string, val func(*S) float64) {
	c.metrics = append(c.metrics, metric[S]{prometheus.NewDesc("tungate_"+name, help, nil, nil), kind, val})
}

// Collector returns the TCP relay's counters as Prometheus metrics.
func (t *TCP) Collector() prometheus.Collector {
	c := &collector[TCPStats]{stats: &t.stats}
	counter, gauge := prometheus.CounterValue, prometheus.GaugeValue
	c.add(counter, "tcp_flows_total", "TCP flows relayed.", func(s *TCPStats) float64 { return float64(s.Accepted.Load()) })
	c.add(counter, "tcp_dial_failed_total", "TCP upstream dials that failed (timeout, unreachable).", func(s *TCPStats) float64 { return float64(s.DialFailed.Load()) })
	c.add(counter, "tcp_refused_total", "TCP flows refused by the upstream or a reject outbound.", func(s *TCPStats) float64 { return float64(s.Refused.Load()) })
	c.add(counter, "tcp_idle_closed_total", "TCP flows closed by stack.tcp.idle_timeout.", func(s *TCPStats) float64 { return float64(s.IdleClosed.Load()) })
	c.add(gauge, "tcp_flows_active", "TCP flows open now.", func(s *TCPStats) float64 { return float64(s.Active.Load()) })
	c.add(counter, "tcp_bytes_up_total", "Bytes relayed from apps to upstreams.", func(s *TCPStats) float64 { return float64(s.BytesUp.Load()) })
	c.add(counter, "tcp_bytes_down_total", "Bytes relayed from upstreams to apps.", func(s *TCPStats) float64 { return float64(s.BytesDown.Load()) })
	return c
}

// Collector returns the UDP NAT table's counters as Prometheus metrics.
func (t *UDPTable) Collector() prometheus.Collector {
	c := &collector[UDPStats]{stats: &t.stats}
	counter, gauge := prometheus.CounterValue, prometheus.GaugeValue
	c.add(counter, "udp_sessions_total", "UDP mappings opened.", func(s *UDPStats) float64 { return float64(s.Opened.Load()) })
	c.add(counter, "udp_sessions_expired_total", "UDP mappings removed after their idle timeout.", func(s *UDPStats) float64 { return float64(s.Expired.Load()) })
	c.add(counter, "udp_sessions_failed_total", "UDP mappings whose upstream session failed to open.", func(s *UDPStats) float64 { return float64(s.Failed.Load()) })
	c.add(counter, "udp_sessions_refused_total", "UDP mappings refused over stack.udp.max_sessions.", func(s *UDPStats) float64 { return float64(s.RefusedOverCap.Load()) })
	c.add(counter, "udp_refused_by_outbound_total", "UDP datagrams refused because their outbound carries no UDP (reject, http).", func(s *UDPStats) float64 { return float64(s.RefusedByOutbound.Load()) })
	c.add(gauge, "udp_sessions_active", "UDP mappings live now.", func(s *UDPStats) float64 { return float64(s.Active.Load()) })
	c.add(counter, "udp_packets_up_total", "UDP datagrams sent upstream.", func(s *UDPStats) float64 { return float64(s.PacketsUp.Load()) })
	c.add(counter, "udp_packets_down_total", "UDP datagrams delivered to apps.", func(s *UDPStats) float64 { return float64(s.PacketsDown.Load()) })
	c.add(counter, "udp_dropped_total", "UDP datagrams dropped (session not ready, send failed, symmetric mismatch).", func(s *UDPStats) float64 { return float64(s.Dropped.Load()) })
	return c
}
