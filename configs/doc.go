// Package configs owns tungate's configuration: the Go types for every key of
// the public contract (CONFIG.md), the embedded default file, and Load, which
// layers a YAML file, TUNGATE_* environment variables and command-line flags
// over per-key defaults, decodes the result and validates it. Every problem is
// reported with its dotted key ("rules[0].ip_cidr[1]") so that `tungate check`
// can print them all at once, and a misspelt key is an error rather than a
// silently ignored line.
//
// The package only describes and checks the configuration; it does not act on
// it. Reading the system resolvers when dns.upstreams is empty, detecting the
// default interface when an outbound's interface is "", and checking that the
// OS supports a feature belong to the packages that use those keys.
package configs
