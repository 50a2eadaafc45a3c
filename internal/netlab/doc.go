//go:build linux

// Package netlab builds the network lab that tungate's end-to-end tests run
// in: two fresh network namespaces, "app" and "wan", joined by a veth pair,
// with "remote" hosts on wan's loopback (see /work/shared/TESTING.md).
//
// netlab owns the lab's lifetime: it creates the namespaces with names
// unique to the run, assigns every address (all inside 10.233.0.0/16 and
// fd00:233::/32), starts processes and small echo servers inside them, and
// removes all of it in t.Cleanup, on failure and panic too. Nothing is ever
// created in, linked to or changed in the namespace the test runs in.
//
// netlab does not own the peer daemons' configuration (danted, dnsmasq, …):
// tests write those and start them with NS.Start. It does not install routes
// beyond the lab's own: a test adds a default route or policy rules it needs
// through NS.Netlink.
package netlab
