// Package netstack terminates the TCP and UDP flows that arrive on a TUN
// device in a gVisor network stack. It owns the link endpoint between the
// device and gVisor, the stack and its tuning, and the TCP and UDP
// forwarders that turn new flows into calls on a Handler. It knows nothing of
// rules, outbounds or upstreams: what happens to a flow is the Handler's
// business.
package netstack
