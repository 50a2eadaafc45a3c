package socks5

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tungate/tungate/outbound"
)

var (
	udpAssociations = outbound.NewOutboundDesc("socks5_udp_associations_total", "SOCKS5 UDP associations opened.")
	udpDropped      = outbound.NewOutboundDesc("socks5_udp_dropped_total", "Datagrams from a SOCKS5 relay dropped.", "reason")
)

// Collect implements outbound.MetricsCollector.
func (d *Dialer) Collect(ch chan<- prometheus.Metric) {
	st := d.Stats()
	name := d.cfg.Name
	outbound.CollectProxyStats(ch, name, outbound.ProxyStats{Dials: st.Dials, DialFailures: st.DialFailures, Refused: st.Refused})
	counter := func(desc *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, float64(v), append([]string{name}, labels...)...)
	}
	counter(udpAssociations, st.UDPAssociations)
	counter(udpDropped, st.UDPDroppedFragment, "fragment")
	counter(udpDropped, st.UDPDroppedName, "name")
	counter(udpDropped, st.UDPDroppedMalformed, "malformed")
}
