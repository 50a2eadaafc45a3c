// Package dnsproxy answers the DNS queries that tungate hijacks (UDP
// datagrams through HandleUDP, DNS-over-TCP connections through ServeTCP). It
// owns the answer cache (TTL-respecting, negative caching per RFC 2308,
// in-flight de-duplication, bounded LRU, serve-stale), the fake-ip pool with
// its reverse lookup, pinning and on-disk store, the address→name memory of
// real mode, and the upstream clients: plain UDP and TCP, DNS-over-TLS
// (RFC 7858) and DNS-over-HTTPS (RFC 8484), each connection made through an
// injected outbound.Dialer. It does not decide which packets are DNS (the
// netstack and cmd wiring do), does not pick the outbound that carries
// upstream traffic (it is handed one), does not match rules on the names it
// learns (router does, asking Domain), and never touches the system
// resolver configuration (sysdns does).
package dnsproxy
