package configs

import (
	"bytes"
	_ "embed"
	"fmt"
	"net/netip"
	"time"

	"github.com/tungate/tungate/outbound"
	// Every outbound kind is registered before a configuration is decoded.
	_ "github.com/tungate/tungate/outbound/kinds"
)

// Config is the whole tungate configuration. Load and Default return it
// decoded and validated; the keys are those of CONFIG.md.
type Config struct {
	Log       Log        `mapstructure:"log"`
	Tun       Tun        `mapstructure:"tun"`
	Stack     Stack      `mapstructure:"stack"`
	Outbounds []Outbound `mapstructure:"outbounds"`
	Rules     []Rule     `mapstructure:"rules"`
	// Final names the outbound for flows that match no rule; "" means the
	// first outbound (see FinalOutbound).
	Final string `mapstructure:"final"`
	DNS   DNS    `mapstructure:"dns"`
	Route Route  `mapstructure:"route"`
	API   API    `mapstructure:"api"`
}

// Log configures the process logger.
type Log struct {
	Level  string `mapstructure:"level"`  // debug | info | warn | error
	Format string `mapstructure:"format"` // text | json
	// Flows logs one info line per flow end (TCP flow or UDP session):
	// network, source, destination, domain, rule, outbound, bytes each
	// way and duration.
	Flows bool `mapstructure:"flows"`
}

// MaxInterfaceName is the longest network interface name, in bytes
// (Linux IFNAMSIZ less its NUL).
const MaxInterfaceName = 15

// Tun describes the TUN device tungate creates (or adopts, when FD > 0).
type Tun struct {
	Name    string         `mapstructure:"name"`
	MTU     int            `mapstructure:"mtu"`
	Address []netip.Prefix `mapstructure:"address"` // host address and prefix length, e.g. 172.19.0.1/30
	Offload string         `mapstructure:"offload"` // auto | off
	FD      int            `mapstructure:"fd"`      // > 0: an already-open TUN fd
}

// Stack tunes the userspace TCP/IP stack's flow handling.
type Stack struct {
	TCP TCP `mapstructure:"tcp"`
	UDP UDP `mapstructure:"udp"`
}

// TCP tunes TCP flow forwarding.
type TCP struct {
	MaxInFlight int           `mapstructure:"max_in_flight"` // half-open flows waiting for an upstream dial
	DialTimeout time.Duration `mapstructure:"dial_timeout"`
	Keepalive   time.Duration `mapstructure:"keepalive"`
	IdleTimeout time.Duration `mapstructure:"idle_timeout"` // 0: none
}

// UDP tunes UDP session tracking.
type UDP struct {
	IdleTimeout    time.Duration `mapstructure:"idle_timeout"`
	DNSIdleTimeout time.Duration `mapstructure:"dns_idle_timeout"`
	MaxSessions    int           `mapstructure:"max_sessions"`
	NAT            string        `mapstructure:"nat"` // full-cone | symmetric
}

// Outbound is one way out of tungate. Its kind (Type) owns every key
// besides name and type: see outbound.Kind and the kinds' folders under
// outbound/.
type Outbound struct {
	Name string `mapstructure:"name"`
	Type string `mapstructure:"type"` // a registered kind: direct | socks5 | http | reject
	// Settings is the kind's configuration, decoded from the entry's other
	// keys with the kind's defaults for those it lacks; nil when Type
	// names no registered kind (which Validate reports).
	Settings outbound.Config `mapstructure:"-"`
}

// Rule sends the flows it matches to Outbound. A rule matches when every
// condition that is set matches; a list matches when any entry does.
type Rule struct {
	Domain        []string       `mapstructure:"domain"`
	DomainSuffix  []string       `mapstructure:"domain_suffix"`
	DomainKeyword []string       `mapstructure:"domain_keyword"`
	DomainRegex   []string       `mapstructure:"domain_regex"`
	IPCIDR        []netip.Prefix `mapstructure:"ip_cidr"`
	SourceCIDR    []netip.Prefix `mapstructure:"source_cidr"`
	Port          []PortRange    `mapstructure:"port"`    // YAML: 80, "443", "8000-8999"
	Network       string         `mapstructure:"network"` // tcp | udp | "" (both)
	UID           []UIDRange     `mapstructure:"uid"`     // YAML: 1000, "1000-1999"
	Cgroup        []string       `mapstructure:"cgroup"`
	Outbound      string         `mapstructure:"outbound"`
}

// PortRange is an inclusive range of ports; a single port has From == To.
type PortRange struct{ From, To uint16 }

// Contains reports whether port is in the range.
func (r PortRange) Contains(port uint16) bool { return r.From <= port && port <= r.To }

// String returns "443" or "8000-8999", the form the YAML accepts.
func (r PortRange) String() string {
	if r.From == r.To {
		return fmt.Sprint(r.From)
	}
	return fmt.Sprintf("%d-%d", r.From, r.To)
}

// UIDRange is an inclusive range of user ids; a single uid has From == To.
type UIDRange struct{ From, To uint32 }

// Contains reports whether uid is in the range.
func (r UIDRange) Contains(uid uint32) bool { return r.From <= uid && uid <= r.To }

// String returns "1000" or "1000-1999", the form the YAML accepts.
func (r UIDRange) String() string {
	if r.From == r.To {
		return fmt.Sprint(r.From)
	}
	return fmt.Sprintf("%d-%d", r.From, r.To)
}

// DNS modes.
const (
	DNSModeReal   = "real"
	DNSModeFakeIP = "fake-ip"
)

// DNS configures the DNS proxy that answers hijacked queries.
type DNS struct {
	Enabled bool       `mapstructure:"enabled"`
	Hijack  []string   `mapstructure:"hijack"` // "any:53", "IP:port", "[v6]:port"
	Listen  netip.Addr `mapstructure:"listen"` // the resolver address handed to the OS
	Mode    string     `mapstructure:"mode"`   // fake-ip | real
	FakeIP  FakeIP     `mapstructure:"fake_ip"`
	// Upstreams are udp://, tcp://, tls:// or https:// URLs; empty means the
	// system resolvers, which the DNS package reads at start.
	Upstreams []string `mapstructure:"upstreams"`
	// Outbound carries upstream queries; "" means the final outbound (see
	// DNSOutbound).
	Outbound string   `mapstructure:"outbound"`
	Cache    DNSCache `mapstructure:"cache"`
}

// FakeIP configures the address pools of dns.mode fake-ip.
type FakeIP struct {
	Range4  netip.Prefix  `mapstructure:"range4"`
	Range6  netip.Prefix  `mapstructure:"range6"`
	TTL     time.Duration `mapstructure:"ttl"`     // TTL in answers
	Store   string        `mapstructure:"store"`   // mapping file; "" = memory only
	Exclude []string      `mapstructure:"exclude"` // domain patterns answered with real addresses
}

// DNSCache configures the answer cache.
type DNSCache struct {
	Size int `mapstructure:"size"`
}

// Route configures OS integration: routes, ip rules and the system resolver.
type Route struct {
	Auto             bool           `mapstructure:"auto"`
	Table            int            `mapstructure:"table"`
	Priority         int            `mapstructure:"priority"` // first ip rule priority of tungate's band
	IncludeUIDs      []UIDRange     `mapstructure:"include_uids"`
	ExcludeUIDs      []UIDRange     `mapstructure:"exclude_uids"`
	IncludeCgroups   []string       `mapstructure:"include_cgroups"`
	ExcludeCgroups   []string       `mapstructure:"exclude_cgroups"`
	ExcludeAddresses []netip.Prefix `mapstructure:"exclude_addresses"`
	Strict           bool           `mapstructure:"strict"`
	SetSystemDNS     bool           `mapstructure:"set_system_dns"`
	// Journal is the file where every route and rule is recorded before it
	// is made, so that what a killed tungate left behind is removed at the
	// next start (or by `tungate cleanup`).
	Journal string `mapstructure:"journal"`
}

// API configures the control API.
type API struct {
	Listen string `mapstructure:"listen"` // host:port; "" = off
	Secret string `mapstructure:"secret"` // bearer token; required unless listen is loopback
	// CORS lists the origins ("scheme://host[:port]", or "*" for any)
	// whose pages may call the API from a browser: a dashboard served
	// from somewhere other than the API itself.
	CORS []string `mapstructure:"cors"`
	// UI is a folder served at /ui/ without the token (a dashboard's
	// built files): an absolute path or one relative to the working
	// directory; "" = none.
	UI string `mapstructure:"ui"`
	// PProf serves Go's profiler at /debug/pprof/ (behind Secret, if set).
	PProf bool `mapstructure:"pprof"`
}

// FinalOutbound returns the name of the outbound for flows that match no
// rule: Final if set, else the first outbound's name ("" if there is none,
// which Validate rejects).
func (c *Config) FinalOutbound() string {
	if c.Final != "" {
		return c.Final
	}
	if len(c.Outbounds) > 0 {
		return c.Outbounds[0].Name
	}
	return ""
}

// DNSOutbound returns the name of the outbound that carries upstream DNS
// queries: dns.outbound if set, else FinalOutbound.
func (c *Config) DNSOutbound() string {
	if c.DNS.Outbound != "" {
		return c.DNS.Outbound
	}
	return c.FinalOutbound()
}

// LookupOutbound returns the outbound called name.
func (c *Config) LookupOutbound(name string) (Outbound, bool) {
	for _, o := range c.Outbounds {
		if o.Name == name {
			return o, true
		}
	}
	return Outbound{}, false
}

//go:embed default.yaml
var defaultYAML []byte

// DefaultYAML returns the bytes of the embedded default configuration file,
// the one `tungate run` uses without --config. The caller may modify them.
func DefaultYAML() []byte { return bytes.Clone(defaultYAML) }

// Default returns the embedded default configuration, decoded and validated.
// It ignores environment variables and flags (use Load("", flags) for those)
// and returns a fresh copy on every call. It never fails: TestDefault proves
// the embedded file valid, so a failure here is a build defect and panics.
func Default() *Config {
	v, err := newViper("", nil, false)
	if err != nil {
		panic("configs: embedded default.yaml: " + err.Error())
	}
	cfg, err := decodeAndValidate(v.AllSettings())
	if err != nil {
		panic("configs: embedded default.yaml: " + err.Error())
	}
	return cfg
}
