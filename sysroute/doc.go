// Package sysroute is tungate's integration with the host's routing: on
// Linux it installs a routing table with default routes into the TUN and a
// band of ip rules that sends traffic there (auto-route), selects apps by
// uid and by cgroup (marking their packets in an nftables table of its
// own, see cgroup.go), blocks the leaks that route.strict names, and
// removes exactly what it added on exit. Every change is recorded in a journal before it is made, so
// that what a killed tungate left behind is removed at the next start or by
// `tungate cleanup`; everything it creates is tagged (rule and route
// protocol ProtoTungate, its own priority band and table, the nftables
// table's name "tungateTABLE") so that cleaning up never touches anyone
// else's state.
//
// It also reads the kernel's routing without changing it: the rules and a
// table's routes as `ip rule` and `ip route` show them (DumpRules,
// ListRoutes) and how a packet would be routed (RouteLookup), for
// `tungate doctor`.
//
// It does not open the TUN (package tun), choose outbounds (router) or
// relay anything (forwarder); it does not touch the system resolver
// (sysdns), recognise routing loops (loopguard) or judge the host's state
// (doctor). Following the default interface and macOS routes are later
// steps.
//
// # Routes and rules
//
// For each address family that the TUN carries (or that Strict blocks),
// tungate's table (route.table) gets one route: "default dev TUN", or
// "unreachable default" for a family the TUN lacks under route.strict. A
// family the TUN lacks without strict gets nothing and keeps the host's
// routing. Each family gets this band of rules, from route.priority up, one
// priority each ("END" is the band's last rule):
//
//	fwmark M goto END           one per mark: tungate's own sockets skip the
//	                            band, so relayed traffic never loops into the
//	                            TUN (a goto, not "lookup main": a lookup that
//	                            finds no route would fall through to the TUN)
//	uidrange U goto END         route.exclude_uids: these apps keep the host's
//	                            routing
//	fwmark 0x2e9 goto END       route.exclude_cgroups: so do these cgroups'
//	                            (CgroupExcludeMark, set by tungate's nftables
//	                            table)
//	uidrange U goto SEL         route.include_uids: these apps are selected…
//	fwmark 0x2e8 goto SEL       route.include_cgroups: …and these cgroups'
//	                            (CgroupIncludeMark)…
//	goto END                    …and everything else keeps the host's routing
//	SEL: ipproto udp dport 53 lookup TABLE
//	     ipproto tcp dport 53 lookup TABLE
//	                            route.strict: DNS to any resolver, even one on
//	                            the LAN or in exclude_addresses, goes into the
//	                            TUN (so these come before the two exceptions
//	                            below)
//	lookup main suppress_prefixlength 0
//	                            local and LAN traffic keeps working: any main
//	                            table route more specific than a default
//	                            (connected subnets, link-local, static routes,
//	                            other VPNs) wins; only the default route is
//	                            overridden. (Local addresses never get here:
//	                            the local table's rule at 0 comes first.)
//	to CIDR goto END            route.exclude_addresses of this family
//	lookup TABLE                everything else: into the TUN (or, for a
//	                            family the TUN lacks under strict, unreachable)
//	END: nop                    end of the band; lookups continue with the
//	                            rules after it (main at 32766) as if tungate's
//	                            rules were not there
//
// Every "skip" is a goto to END rather than "lookup main", so that skipped
// traffic meets whatever rules the host has after the band exactly as it
// would without tungate. A typical configuration (a dual-stack TUN, mark
// 0x2e7, table 2022, priority 9000) gives, for IPv4 and for IPv6:
//
//	9000: from all fwmark 0x2e7 goto 9003 proto 231
//	9001: from all lookup main suppress_prefixlength 0 proto 231
//	9002: from all lookup 2022 proto 231
//	9003: from all nop proto 231
//
// Install refuses to start when someone else's rule sits in the band or
// someone else's route in the table.
package sysroute
