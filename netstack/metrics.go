package netstack

import "github.com/prometheus/client_golang/prometheus"

// stackMetric is one of the netstack's counters.
type stackMetric struct {
	desc *prometheus.Desc
	val  func(Stats) uint64
}

// collector exports the netstack's counters from one Stats snapshot a
// scrape (Stats copies gVisor's whole statistics tree).
type collector struct {
	stack   *Stack
	metrics []stackMetric
}

// Collector returns the stack's counters as Prometheus metrics.
func (s *Stack) Collector() prometheus.Collector {
	c := &collector{stack: s}
	m := func(name, help string, val func(Stats) uint64) {
		c.metrics = append(c.metrics, stackMetric{prometheus.NewDesc("tungate_"+name, help, nil, nil), val})
	}
	m("packets_in_total", "IP packets read from the TUN.", func(s Stats) uint64 { return s.PacketsIn })
	m("packets_out_total", "IP packets written to the TUN.", func(s Stats) uint64 { return s.PacketsOut })
	m("packets_malformed_total", "Packets dropped as malformed.", func(s Stats) uint64 { return s.Malformed })
	m("tcp_syn_dropped_in_flight_total", "SYNs dropped because stack.tcp.max_in_flight dials were under way.", func(s Stats) uint64 { return s.SYNsDroppedInFlight })
	m("tun_read_errors_total", "Failed TUN reads.", func(s Stats) uint64 { return s.TUNReadErrors })
	m("tun_write_errors_total", "Failed TUN writes.", func(s Stats) uint64 { return s.TUNWriteErrors })
	m("udp_refused_total", "UDP datagrams refused (ICMP port unreachable to the app).", func(s Stats) uint64 { return s.UDPRefused })
	m("udp_reply_too_big_total", "UDP replies too big to send to the app.", func(s Stats) uint64 { return s.UDPReplyTooBig })
	return c
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, m := range c.metrics {
		ch <- m.desc
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	st := c.stack.Stats()
	for _, m := range c.metrics {
		ch <- prometheus.MustNewConstMetric(m.desc, prometheus.CounterValue, float64(m.val(st)))
	}
}
