// Package outbound holds the dialers that carry a flow to its upstream:
// direct (out of the physical interface, marked so it never re-enters the
// TUN) and reject. Every outbound implements Dialer: a TCP dial and a UDP
// packet session. The package knows nothing of TUN devices, netstacks or
// rules; it is handed a Target and returns a connection or an error.
package outbound
