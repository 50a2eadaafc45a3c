// Package socks5 is the SOCKS5 outbound: TCP flows go through the proxy's
// CONNECT and UDP sessions through UDP ASSOCIATE (RFC 1928), with
// username/password authentication (RFC 1929) when a username is
// configured. A destination whose name is known is handed to the proxy as
// that name, so the proxy resolves it. The proxy is reached through a base
// outbound.Dialer (in tungate a direct outbound carrying the fwmark), so the
// package opens no socket of its own and knows nothing of TUN devices,
// netstacks or rules. It does not resolve the proxy's own address, and does
// not do SOCKS4, BIND, GSSAPI or UDP fragmentation (fragments are dropped
// and counted).
package socks5
