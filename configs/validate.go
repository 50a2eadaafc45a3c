package configs

import (
	"fmt"
	"github.com/tungate/tungate/outbound"
	"math"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// FieldError is one configuration problem, tied to the key it concerns.
type FieldError struct {
	// Key is the dotted path of the key with list indexes, e.g.
	// "outbounds[1].address", "rules[0].ip_cidr[2]", "stack.tcp.dial_timeout".
	Key string
	Msg string
}

func (e FieldError) Error() string { return e.Key + ": " + e.Msg }

// ValidationError lists every problem of a configuration, in the order the
// keys were checked. Load and Validate return it as *ValidationError.
type ValidationError struct {
	Errors []FieldError
}

// Error returns the problems one per line.
func (e *ValidationError) Error() string {
	lines := make([]string, len(e.Errors))
	for i, fe := range e.Errors {
		lines[i] = fe.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap exposes each FieldError to errors.As and errors.Is.
func (e *ValidationError) Unwrap() []error {
	errs := make([]error, len(e.Errors))
	for i, fe := range e.Errors {
		errs[i] = fe
	}
	return errs
}

// Validate checks the values of c: enums, ranges, cross-references between
// outbounds, rules and dns, and the formats of string values. It returns a
// *ValidationError listing every problem, or nil. Load already calls it; it
// is exported for configurations built or changed in code.
func (c *Config) Validate() error {
	if problems := c.validate(); len(problems) > 0 {
		return &ValidationError{Errors: problems}
	}
	return nil
}

// problemList collects FieldErrors; every check adds to it and none stops the
// others.
type problemList []FieldError

func (p *problemList) add(key, format string, args ...any) {
	*p = append(*p, FieldError{Key: key, Msg: fmt.Sprintf(format, args...)})
}

func (p *problemList) oneOf(key, value string, allowed ...string) {
	for _, a := range allowed {
		if value == a {
			return
		}
	}
	p.add(key, "invalid value %q (want %s)", value, quoteList(allowed))
}

func (p *problemList) nonNegative(key string, d time.Duration) {
	if d < 0 {
		p.add(key, "must not be negative, got %s", d)
	}
}

func (p *problemList) positiveDuration(key string, d time.Duration) {
	if d <= 0 {
		p.add(key, "must be greater than 0, got %s", d)
	}
}

func (p *problemList) positive(key string, n int) {
	if n <= 0 {
		p.add(key, "must be greater than 0, got %d", n)
	}
}

func (p *problemList) nonEmptyEntries(key string, list []string) {
	for i, s := range list {
		if strings.TrimSpace(s) == "" {
			p.add(fmt.Sprintf("%s[%d]", key, i), "must not be empty")
		}
	}
}

func (c *Config) validate() problemList {
	var p problemList
	c.validateLog(&p)
	c.validateTun(&p)
	c.validateStack(&p)
	names := c.validateOutbounds(&p)
	c.validateRules(&p, names)
	if c.Final != "" && !names[c.Final] {
		p.add("final", "unknown outbound %q", c.Final)
	}
	c.validateDNS(&p, names)
	c.validateRoute(&p)
	c.validateAPI(&p)
	return p
}

func (c *Config) validateLog(p *problemList) {
	p.oneOf("log.level", c.Log.Level, "debug", "info", "warn", "error")
	p.oneOf("log.format", c.Log.Format, "text", "json")
}

func (c *Config) validateTun(p *problemList) {
	t := c.Tun
	if t.Name == "" && t.FD == 0 {
		p.add("tun.name", "must not be empty unless tun.fd is set")
	}
	if len(t.Name) > MaxInterfaceName {
		p.add("tun.name", "%q is %d bytes, interface names have at most %d", t.Name, len(t.Name), MaxInterfaceName)
	}
	if len(t.Address) == 0 {
		p.add("tun.address", "needs at least one address")
	}
	hasIPv6 := false
	for i, a := range t.Address {
		if !a.IsValid() {
			p.add(fmt.Sprintf("tun.address[%d]", i), "invalid CIDR")
			continue
		}
		hasIPv6 = hasIPv6 || a.Addr().Is6()
	}
	switch {
	case t.MTU < 576 || t.MTU > 65535:
		p.add("tun.mtu", "%d is outside 576-65535", t.MTU)
	case hasIPv6 && t.MTU < 1280:
		p.add("tun.mtu", "%d is below 1280, the IPv6 minimum, and tun.address has an IPv6 address", t.MTU)
	}
	p.oneOf("tun.offload", t.Offload, "auto", "off")
	if t.FD < 0 {
		p.add("tun.fd", "must not be negative, got %d", t.FD)
	}
}

func (c *Config) validateStack(p *problemList) {
	tcp, udp := c.Stack.TCP, c.Stack.UDP
	p.positive("stack.tcp.max_in_flight", tcp.MaxInFlight)
	p.positiveDuration("stack.tcp.dial_timeout", tcp.DialTimeout)
	p.nonNegative("stack.tcp.keepalive", tcp.Keepalive)
	p.nonNegative("stack.tcp.idle_timeout", tcp.IdleTimeout)
	p.positiveDuration("stack.udp.idle_timeout", udp.IdleTimeout)
	p.positiveDuration("stack.udp.dns_idle_timeout", udp.DNSIdleTimeout)
	p.positive("stack.udp.max_sessions", udp.MaxSessions)
	p.oneOf("stack.udp.nat", udp.NAT, "full-cone", "symmetric")
}

// validateOutbounds returns the set of outbound names for the
// cross-reference checks.
func (c *Config) validateOutbounds(p *problemList) map[string]bool {
	names := make(map[string]bool, len(c.Outbounds))
	if len(c.Outbounds) == 0 {
		p.add("outbounds", "needs at least one outbound")
	}
	for i, o := range c.Outbounds {
		key := fmt.Sprintf("outbounds[%d]", i)
		switch {
		case o.Name == "":
			p.add(key+".name", "must not be empty")
		case names[o.Name]:
			p.add(key+".name", "duplicate outbound name %q", o.Name)
		default:
			names[o.Name] = true
		}
		switch {
		case o.Type == "":
			p.add(key+".type", "must be set (%s)", quoteList(outbound.Types()))
			continue
		case o.Type == "wireguard":
			p.add(key+".type", "wireguard outbounds are not built yet (want %s)", quoteList(outbound.Types()))
			continue
		}
		p.oneOf(key+".type", o.Type, outbound.Types()...)
		if o.Settings == nil {
			continue
		}
		for _, pr := range o.Settings.Validate() {
			p.add(key+"."+pr.Key, "%s", pr.Msg)
		}
	}
	return names
}

func (c *Config) validateRules(p *problemList, outbounds map[string]bool) {
	for i, r := range c.Rules {
		key := fmt.Sprintf("rules[%d]", i)
		if !r.hasCondition() {
			p.add(key, "has no condition, so it would match every flow (use final for that)")
		}
		p.nonEmptyEntries(key+".domain", r.Domain)
		p.nonEmptyEntries(key+".domain_suffix", r.DomainSuffix)
		p.nonEmptyEntries(key+".domain_keyword", r.DomainKeyword)
		for j, expr := range r.DomainRegex {
			if _, err := regexp.Compile(expr); err != nil {
				p.add(fmt.Sprintf("%s.domain_regex[%d]", key, j), "invalid regular expression %q: %v", expr, err)
			}
		}
		validPrefixes(p, key+".ip_cidr", r.IPCIDR)
		validPrefixes(p, key+".source_cidr", r.SourceCIDR)
		for j, pr := range r.Port {
			if pr.From == 0 || pr.From > pr.To {
				p.add(fmt.Sprintf("%s.port[%d]", key, j), "invalid port range %s", pr)
			}
		}
		p.oneOf(key+".network", r.Network, "tcp", "udp", "")
		validUIDs(p, key+".uid", r.UID)
		p.nonEmptyEntries(key+".cgroup", r.Cgroup)
		// The router cannot match them yet: a TUN flow's uid and cgroup
		// are not looked up.
		if len(r.UID) > 0 {
			p.add(key+".uid", "uid conditions are not supported yet (route.include_uids / exclude_uids select apps by uid)")
		}
		if len(r.Cgroup) > 0 {
			p.add(key+".cgroup", "cgroup conditions are not supported yet (route.include_cgroups / exclude_cgroups select apps by cgroup)")
		}
		switch {
		case r.Outbound == "":
			p.add(key+".outbound", "must name an outbound")
		case !outbounds[r.Outbound]:
			p.add(key+".outbound", "unknown outbound %q", r.Outbound)
		}
	}
}

func (r Rule) hasCondition() bool {
	return len(r.Domain) > 0 || len(r.DomainSuffix) > 0 || len(r.DomainKeyword) > 0 ||
		len(r.DomainRegex) > 0 || len(r.IPCIDR) > 0 || len(r.SourceCIDR) > 0 ||
		len(r.Port) > 0 || r.Network != "" || len(r.UID) > 0 || len(r.Cgroup) > 0
}

func validPrefixes(p *problemList, key string, list []netip.Prefix) {
	for i, pr := range list {
		if !pr.IsValid() {
			p.add(fmt.Sprintf("%s[%d]", key, i), "invalid CIDR")
		}
	}
}

func validUIDs(p *problemList, key string, list []UIDRange) {
	for i, r := range list {
		if r.From > r.To {
			p.add(fmt.Sprintf("%s[%d]", key, i), "invalid uid range %s", r)
		}
	}
}

var upstreamSchemes = []string{"udp", "tcp", "tls", "https"}

func (c *Config) validateDNS(p *problemList, outbounds map[string]bool) {
	d := c.DNS
	for i, h := range d.Hijack {
		if err := checkHijack(h); err != nil {
			p.add(fmt.Sprintf("dns.hijack[%d]", i), "%v", err)
		}
	}
	if d.Enabled && !d.Listen.IsValid() {
		p.add("dns.listen", "must be an IP address when dns.enabled is true")
	}
	p.oneOf("dns.mode", d.Mode, DNSModeFakeIP, DNSModeReal)

	f := d.FakeIP
	if !f.Range4.IsValid() || !f.Range4.Addr().Is4() {
		p.add("dns.fake_ip.range4", "must be an IPv4 CIDR, got %q", prefixString(f.Range4))
	}
	if !f.Range6.IsValid() || !f.Range6.Addr().Is6() || f.Range6.Addr().Is4In6() {
		p.add("dns.fake_ip.range6", "must be an IPv6 CIDR, got %q", prefixString(f.Range6))
	}
	p.nonNegative("dns.fake_ip.ttl", f.TTL)
	p.nonEmptyEntries("dns.fake_ip.exclude", f.Exclude)
	if f.Store != "" && c.DNS.Enabled && c.DNS.Mode == DNSModeFakeIP {
		// The store is created at start, its directory is not.
		if fi, err := os.Stat(filepath.Dir(f.Store)); err != nil || !fi.IsDir() {
			p.add("dns.fake_ip.store", "the directory of %q does not exist", f.Store)
		}
	}

	for i, u := range d.Upstreams {
		if err := checkUpstream(u); err != nil {
			p.add(fmt.Sprintf("dns.upstreams[%d]", i), "%v", err)
		}
	}
	if d.Outbound != "" && !outbounds[d.Outbound] {
		p.add("dns.outbound", "unknown outbound %q", d.Outbound)
	}
	p.positive("dns.cache.size", d.Cache.Size)
}

func prefixString(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

// checkHijack accepts "any:53", "IP:port" and "[v6]:port".
func checkHijack(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("invalid hijack address %q (want \"any:53\", \"IP:port\" or \"[v6]:port\")", s)
	}
	if host != "any" {
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("invalid hijack address %q: %q is neither \"any\" nor an IP address", s, host)
		}
	}
	if err := checkPort(port); err != nil {
		return fmt.Errorf("invalid hijack address %q: %v", s, err)
	}
	return nil
}

// checkUpstream accepts udp://, tcp://, tls:// and https:// URLs with a
// host; the port is optional (each scheme has its standard one).
func checkUpstream(s string) error {
	if !strings.Contains(s, "://") {
		return fmt.Errorf("upstream %q needs a scheme: %s", s, schemeList())
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("invalid upstream URL %q: %v", s, err)
	}
	known := false
	for _, scheme := range upstreamSchemes {
		known = known || u.Scheme == scheme
	}
	if !known {
		return fmt.Errorf("upstream %q has unsupported scheme %q (want %s)", s, u.Scheme, schemeList())
	}
	if u.Hostname() == "" {
		return fmt.Errorf("upstream %q has no host", s)
	}
	if port := u.Port(); port != "" {
		if err := checkPort(port); err != nil {
			return fmt.Errorf("upstream %q: %v", s, err)
		}
	}
	return nil
}

func schemeList() string {
	schemes := make([]string, len(upstreamSchemes))
	for i, s := range upstreamSchemes {
		schemes[i] = s + "://"
	}
	return strings.Join(schemes, ", ")
}

func (c *Config) validateRoute(p *problemList) {
	r := c.Route
	// 253-255 are the kernel's default, main and local tables: flushing one
	// of them on exit would break the host's networking.
	switch {
	case r.Table <= 0 || r.Table > math.MaxUint32:
		p.add("route.table", "%d is outside 1-4294967295", r.Table)
	case r.Table >= 253 && r.Table <= 255:
		p.add("route.table", "%d is a reserved kernel table (253 default, 254 main, 255 local)", r.Table)
	}
	// tungate's band must come before the main table's rule at 32766, or
	// the main table's default route would take the traffic first.
	if r.Priority <= 0 || r.Priority >= 32766 {
		p.add("route.priority", "%d is outside 1-32765 (tungate's rules must precede the main table's at 32766)", r.Priority)
	}
	validUIDs(p, "route.include_uids", r.IncludeUIDs)
	validUIDs(p, "route.exclude_uids", r.ExcludeUIDs)
	p.nonEmptyEntries("route.include_cgroups", r.IncludeCgroups)
	p.nonEmptyEntries("route.exclude_cgroups", r.ExcludeCgroups)
	validPrefixes(p, "route.exclude_addresses", r.ExcludeAddresses)
	// Without a journal, state left by a killed tungate could not be found
	// again; a relative path would depend on the working directory.
	if r.Auto && (r.Journal == "" || !filepath.IsAbs(r.Journal)) {
		p.add("route.journal", "must be an absolute file path when route.auto is true, got %q", r.Journal)
	}
}

func (c *Config) validateAPI(p *problemList) {
	a := c.API
	for i, o := range a.CORS {
		if err := checkOrigin(o); err != nil {
			p.add(fmt.Sprintf("api.cors[%d]", i), "%v", err)
		}
	}
	if a.Listen == "" {
		return
	}
	if a.UI != "" {
		// Checked only when the API is on: a folder nobody serves is no
		// error for run either.
		if fi, err := os.Stat(a.UI); err != nil || !fi.IsDir() {
			p.add("api.ui", "%q is not an existing directory", a.UI)
		}
	}
	host, port, err := net.SplitHostPort(a.Listen)
	if err != nil {
		p.add("api.listen", "invalid address %q (want host:port, e.g. 127.0.0.1:9090)", a.Listen)
		return
	}
	if err := checkPort(port); err != nil {
		p.add("api.listen", "invalid address %q: %v", a.Listen, err)
	}
	if a.Secret == "" && !isLoopbackHost(host) {
		p.add("api.secret", "required when api.listen (%q) is not a loopback address", a.Listen)
	}
}

// checkOrigin accepts "*" and a browser origin as the Origin header
// carries it: scheme://host[:port], without a path, query, fragment or
// credentials.
func checkOrigin(s string) error {
	if s == "*" {
		return nil
	}
	const want = `(want "scheme://host[:port]", e.g. "http://127.0.0.1:8080", or "*")`
	if !strings.Contains(s, "://") {
		return fmt.Errorf("origin %q has no scheme %s", s, want)
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("invalid origin %q %s", s, want)
	}
	switch {
	case u.Hostname() == "":
		return fmt.Errorf("origin %q has no host %s", s, want)
	case u.User != nil:
		return fmt.Errorf("origin %q has credentials %s", s, want)
	case u.Path != "" || u.RawQuery != "" || u.Fragment != "" || u.ForceQuery || strings.HasSuffix(s, "#"):
		return fmt.Errorf("origin %q has a path, query or fragment %s", s, want)
	}
	if port := u.Port(); port != "" {
		if err := checkPort(port); err != nil {
			return fmt.Errorf("origin %q: %v", s, err)
		}
		// A browser leaves the scheme's own port out of the Origin
		// header, so this entry would never match.
		if (u.Scheme == "http" && port == "80") || (u.Scheme == "https" && port == "443") {
			return fmt.Errorf("origin %q names the default port of %s, which browsers leave out: write %q", s, u.Scheme, u.Scheme+"://"+u.Hostname())
		}
	} else if strings.HasSuffix(u.Host, ":") {
		return fmt.Errorf("origin %q has an empty port %s", s, want)
	}
	return nil
}

func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.IsLoopback()
}

func checkPort(s string) error {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return fmt.Errorf("invalid port %q (want 1-65535)", s)
	}
	return nil
}

// quoteList formats allowed values as `"a", "b" or "c"`.
func quoteList(values []string) string {
	quoted := make([]string, len(values))
	for i, v := range values {
		quoted[i] = strconv.Quote(v)
	}
	if len(quoted) == 1 {
		return quoted[0]
	}
	return strings.Join(quoted[:len(quoted)-1], ", ") + " or " + quoted[len(quoted)-1]
}
