// Package loopguard recognises routing loops: flows that tungate's own
// outbound sockets sent back into the TUN (a mark that no rule excludes,
// or an outbound bound to the TUN), by asking the kernel which local
// socket sent a flow and what fwmark it carries (Linux sock_diag), so
// that the caller can refuse the flow at once and log how to fix it
// (Detector).
//
// It does not install the rules that keep tungate's traffic out of the
// TUN (sysroute), mark sockets (outbound) or refuse flows itself (the
// caller does). On other OSes its Detector never reports a loop yet.
package loopguard
