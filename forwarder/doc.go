// Package forwarder relays terminated flows to their upstreams: TCP as a
// byte-exact relay with half-close, RST propagation and idle timeout, UDP
// through a NAT table with endpoint-independent mapping, idle expiry and a
// session cap. It picks an outbound through a Route function and dials it;
// it knows nothing of gVisor or TUN devices — the app side of a flow is
// handed in behind small interfaces.
package forwarder
