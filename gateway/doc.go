// Package gateway is tungate's data plane as a library: it wires the TUN,
// the netstack, the relays and their connection tracker, the DNS proxy and
// the outbounds, and owns what joins them — the dispatch of hijacked DNS
// to the DNS proxy and of everything else to the relays, the one routing
// step every flow takes (and that doctor --explain takes through Explain),
// the set of outbounds built from the registry of kinds, live reload, the
// order of start and shutdown, and the host state it changes (routes,
// rules, the system resolver) and undoes.
//
// It does not parse flags, read files or handle signals (cmd/tungate
// does), and it holds no packet, rule, DNS or socket logic of its own:
// those are the packages it wires.
package gateway
