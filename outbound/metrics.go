package outbound

import "github.com/prometheus/client_golang/prometheus"

// ProxyStats are the counters every proxy outbound keeps of its dials.
type ProxyStats struct {
	// Dials counts connections opened to the proxy (CONNECT, UDP
	// ASSOCIATE).
	Dials uint64
	// DialFailures counts dials that failed other than by a refusal:
	// the proxy unreachable or silent, a failure reply, a protocol error.
	DialFailures uint64
	// Refused counts dials refused: by the destination through the proxy,
	// by failed authentication, or by the proxy's port being closed.
	Refused uint64
}

// NewOutboundDesc returns the description of a metric labelled by
// outbound (and labels), named tungate_outbound_NAME.
func NewOutboundDesc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc("tungate_outbound_"+name, help, append([]string{"outbound"}, labels...), nil)
}

var (
	proxyDials    = NewOutboundDesc("proxy_dials_total", "Connections opened to a proxy (CONNECT, UDP ASSOCIATE).")
	proxyFailures = NewOutboundDesc("proxy_dial_failures_total", "Proxy dials that failed other than by a refusal (unreachable, silent, protocol error).")
	proxyRefused  = NewOutboundDesc("proxy_refused_total", "Proxy dials refused (by the destination via the proxy, failed authentication, the proxy's port closed).")
)

// CollectProxyStats sends a proxy outbound's dial counters, labelled with
// its name, in the metric family every proxy kind shares.
func CollectProxyStats(ch chan<- prometheus.Metric, name string, st ProxyStats) {
	ch <- prometheus.MustNewConstMetric(proxyDials, prometheus.CounterValue, float64(st.Dials), name)
	ch <- prometheus.MustNewConstMetric(proxyFailures, prometheus.CounterValue, float64(st.DialFailures), name)
	ch <- prometheus.MustNewConstMetric(proxyRefused, prometheus.CounterValue, float64(st.Refused), name)
}
