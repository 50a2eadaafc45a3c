package gateway

import (
	"fmt"
	"strings"

	"github.com/tungate/tungate/configs"
)

// screen is what the first screen says beyond the configuration: what
// Start found or opened.
type screen struct {
	tun       string   // the TUN's name as opened
	upstreams []string // the DNS upstreams in use (the system's when dns.upstreams is empty)
	api       string   // the API's address as listened on; "" = off
}

// firstScreen returns the lines logged at the end of Start, in plain
// words: what is routed into the TUN, where flows go, who answers DNS,
// where the API is, and how to stop and clean up.
func firstScreen(cfg *configs.Config, s screen) []string {
	var lines []string
	r := cfg.Route
	if r.Auto {
		who := "all traffic"
		var sel []string
		if len(r.IncludeUIDs) > 0 {
			sel = append(sel, plural("uid", len(r.IncludeUIDs))+" "+joinStrings(r.IncludeUIDs))
		}
		if len(r.IncludeCgroups) > 0 {
			sel = append(sel, plural("cgroup", len(r.IncludeCgroups))+" "+strings.Join(r.IncludeCgroups, ", "))
		}
		if len(sel) > 0 {
			who = "only the traffic of " + strings.Join(sel, " and of ")
		}
		except := []string{"the LAN"}
		if len(r.ExcludeAddresses) > 0 {
			except = append(except, joinStrings(r.ExcludeAddresses))
		}
		if len(r.ExcludeUIDs) > 0 {
			except = append(except, "the traffic of "+plural("uid", len(r.ExcludeUIDs))+" "+joinStrings(r.ExcludeUIDs))
		}
		if len(r.ExcludeCgroups) > 0 {
			except = append(except, "the traffic of "+plural("cgroup", len(r.ExcludeCgroups))+" "+strings.Join(r.ExcludeCgroups, ", "))
		}
		lines = append(lines, fmt.Sprintf("routing: %s except %s goes through %s (route.auto)", who, strings.Join(except, ", "), s.tun))
		if r.Strict {
			lines = append(lines, fmt.Sprintf("routing: strict: DNS to any resolver goes through %s, and an address family %s has no address of is blocked (route.strict)", s.tun, s.tun))
		}
	} else {
		lines = append(lines, fmt.Sprintf("routing: nothing is routed into %s by tungate (route.auto: false); route traffic into it yourself", s.tun))
	}

	final := cfg.FinalOutbound()
	flows := fmt.Sprintf("flows: no rules; every flow goes out through %s", outboundWords(cfg, final))
	if n := len(cfg.Rules); n > 0 {
		pick := "rules pick"
		if n == 1 {
			pick = "rule picks"
		}
		flows = fmt.Sprintf("flows: %d %s the outbound; a flow that matches none goes out through %s", n, pick, outboundWords(cfg, final))
	}
	if cfg.Log.Flows {
		flows += "; each flow's end is logged (log.flows)"
	}
	lines = append(lines, flows)

	d := cfg.DNS
	switch {
	case !d.Enabled:
		lines = append(lines, "DNS: not answered by tungate (dns.enabled: false); port-53 traffic is routed like any other")
	case len(d.Hijack) == 0 && !d.Listen.IsValid():
		lines = append(lines, "DNS: no query reaches tungate's DNS proxy (dns.hijack and dns.listen are empty)")
	default:
		var at []string // as newHijack matches: dns.listen, then dns.hijack
		if d.Listen.IsValid() {
			at = append(at, "at "+d.Listen.String())
		}
		for _, h := range d.Hijack {
			if port, ok := strings.CutPrefix(h, "any:"); ok {
				at = append(at, "on port "+port+" of any address routed into "+s.tun)
			} else {
				at = append(at, "at "+h)
			}
		}
		keys := "dns.hijack"
		if d.Listen.IsValid() {
			keys = "dns.listen, dns.hijack"
		}
		line := fmt.Sprintf("DNS: answered by tungate %s (%s), mode %s, upstreams %s through outbound %s",
			strings.Join(at, " and "), keys, d.Mode, strings.Join(s.upstreams, ", "), cfg.DNSOutbound())
		if r.SetSystemDNS {
			line += fmt.Sprintf("; the system resolver points at %s until tungate stops (route.set_system_dns)", d.Listen)
		}
		lines = append(lines, line)
	}

	if s.api != "" {
		line := "API: http://" + s.api
		if cfg.API.Secret != "" {
			line += " (bearer token: api.secret)"
		}
		if cfg.API.PProf {
			line += "; Go's profiler at /debug/pprof/"
		}
		lines = append(lines, line)
	} else {
		lines = append(lines, "API: off (api.listen)")
	}

	stop := "stop: Ctrl-C or SIGTERM"
	if r.Auto || r.SetSystemDNS {
		stop += "; after a crash: tungate cleanup (with the same --config, if one was given)"
	}
	return append(lines, stop)
}

// outboundWords names an outbound with its type: "proxy (socks5)".
func outboundWords(cfg *configs.Config, name string) string {
	for _, o := range cfg.Outbounds {
		if o.Name == name {
			if o.Type == name {
				return name
			}
			return name + " (" + o.Type + ")"
		}
	}
	return name
}

func plural(word string, n int) string {
	if n == 1 {
		return word
	}
	return word + "s"
}

func joinStrings[T fmt.Stringer](xs []T) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = x.String()
	}
	return strings.Join(s, ", ")
}
