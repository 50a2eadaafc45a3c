// Package doctor is the diagnosis that `tungate doctor` prints: Inspect
// reads, without changing anything, what of the host's state matters to
// tungate (the TUN, links and addresses, every ip rule, tungate's table
// and the main table's default routes, the sysctls that matter, the
// nftables tables, the resolver file, the journals), and Diagnose checks
// it against a configuration (Config), returning each check as a Finding:
// ok, or a problem with its fix in words.
//
// It reads the routing through sysroute and the resolver through sysdns
// and changes nothing: it does not install or remove routes (sysroute),
// set the resolver (sysdns) or detect loops in running traffic
// (loopguard). Printing is cmd/tungate's. Inspect is Linux-only for now.
package doctor
