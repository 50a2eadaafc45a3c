// Package httpconnect is the HTTP CONNECT outbound: each TCP flow is one
// HTTP/1.1 CONNECT through a proxy, with Basic proxy authentication when a
// username is configured. A destination whose name is known is handed to
// the proxy as that name, so the proxy resolves it. The proxy is reached
// through a base outbound.Dialer (in tungate a direct outbound carrying the
// fwmark), so the package opens no socket of its own. It carries TCP only:
// UDP sessions are refused. It does not resolve the proxy's own address,
// speak TLS to the proxy, or do any authentication scheme but Basic.
package httpconnect
