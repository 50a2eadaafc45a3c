package httpconnect

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tungate/tungate/outbound"
)

// Collect implements outbound.MetricsCollector.
func (d *Dialer) Collect(ch chan<- prometheus.Metric) {
	st := d.Stats()
	outbound.CollectProxyStats(ch, d.cfg.Name, outbound.ProxyStats{Dials: st.Dials, DialFailures: st.DialFailures, Refused: st.Refused})
}
