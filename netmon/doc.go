// Package netmon follows the host's default route and its interface.
//
// A Monitor reads the main routing table and the links of the network
// namespace it was started in, follows their changes (Linux: rtnetlink
// link, route and address notifications), and answers three questions:
// which interface the main table's default route leaves by, for IPv4 and
// for IPv6 (Default); which interface the main table would send a given
// destination out of (InterfaceFor); and, as a Change to subscribers,
// which interfaces stopped being able to carry traffic at all.
//
// Only the main table counts: tungate's own table (route.table) and every
// other policy-routing table are never read, and routes through the
// interfaces the Monitor is told to ignore (tungate's TUN) are treated as
// absent, so that a default route into the TUN is never reported as the
// way out.
//
// # When an interface is gone
//
// A Change lists an interface (per address family) as Gone when it carried
// that family before and cannot any more:
//
//   - "deleted": the link no longer exists (a VPN torn down, a USB modem
//     unplugged, a veth removed);
//   - "down": the link was set administratively down (the kernel flushes
//     its IPv4 routes; nothing leaves by it);
//   - "unrouted": the link exists and is up but the main table has no
//     unicast route of that family through it any more, link-local ones
//     (169.254.0.0/16, fe80::/10) aside — the network manager deconfigured
//     it (lease lost, connection deactivated).
//
// Deliberately not Gone: losing carrier alone (routes stay; a cable
// re-plugged or a Wi-Fi roam that comes back keeps its flows, and a network
// manager that gives up deconfigures the interface, which is "unrouted"),
// and no longer being the default while keeping routes (multi-homed hosts
// keep a lower-priority default on each uplink, and policy routing may
// still carry a flow bound to it; a flow that really lost its path ends by
// TCP's own timeouts). A renamed link is the same link: it is never Gone
// for the rename, but flows are reported under its old name only.
//
// netmon does not bind sockets or end flows: it reports, and the outbound
// that owns the sockets acts (see outbound.DirectConfig.InterfaceFor and
// Direct.AbortInterface; cmd/tungate wires them). On other systems than
// Linux Start fails with ErrNotSupported.
package netmon
