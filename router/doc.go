// Package router decides which outbound carries a flow: rules match on what
// is known of the flow (network, addresses, ports, domain), the first match
// wins, and a final outbound takes the rest. It returns outbound names and
// knows nothing of how they dial.
package router
