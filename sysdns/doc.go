// Package sysdns points the system resolver at tungate's DNS proxy while
// tungate runs (route.set_system_dns) and restores it exactly on exit, or
// at the next start or `tungate cleanup` after a crash: through
// systemd-resolved when it manages the resolver, otherwise by rewriting
// /etc/resolv.conf, with every change journaled before it is made (its own
// journal beside route.journal, JournalPath). It also reads the
// nameservers a resolv.conf names (Nameservers) and whether it is
// systemd-resolved's (PointsAtResolved).
//
// It does not serve DNS (dnsproxy), route the queries into the TUN
// (sysroute, route.strict) or judge the resolver's state (doctor). macOS
// (scutil) is a later step.
package sysdns
