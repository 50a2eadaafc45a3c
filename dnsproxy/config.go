package dnsproxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// Modes of Config.Mode.
const (
	ModeReal   = "real"
	ModeFakeIP = "fake-ip"
)

// Defaults applied by New to zero fields.
const (
	DefaultTimeout   = 3 * time.Second
	DefaultCacheSize = 4096
	DefaultFakeTTL   = time.Second
)

// Config configures a Proxy. Zero values take the defaults noted per field.
type Config struct {
	// Mode is ModeReal or ModeFakeIP; "" means ModeReal.
	Mode string
	// Upstreams are "udp://1.2.3.4:53", "tcp://…", "tls://host-or-ip:853"
	// or "https://host-or-ip/dns-query" (ports default to 53, 53, 853 and
	// 443), tried in order with failover. Empty means the nameservers of
	// /etc/resolv.conf as UDP upstreams, read once by New. When the
	// dialer carries no UDP (outbound.UDPCarrier), udp:// upstreams are
	// asked over TCP.
	Upstreams []string
	// Timeout bounds one attempt at one upstream; 0 means DefaultTimeout.
	Timeout time.Duration
	// CacheSize is the number of cached answers; 0 means DefaultCacheSize.
	CacheSize int
	// FakeRange4 and FakeRange6 are the fake-ip pools (fake-ip mode). The
	// first and last address of each are never handed out. A zero prefix
	// disables fake answers for that family: such queries get an empty
	// NOERROR answer (NODATA), so clients use the other family.
	FakeRange4, FakeRange6 netip.Prefix
	// FakeTTL is the TTL of fake answers; 0 means DefaultFakeTTL.
	FakeTTL time.Duration
	// FakeExclude lists names that get real answers in fake-ip mode:
	// "*.lan" matches every name below lan (not lan itself), "host.lan"
	// matches that name only, "*" matches every name.
	FakeExclude []string
	// Store is the file that keeps fake-ip mappings across restarts and
	// crashes; "" keeps them in memory only.
	Store string
	// TLSConfig is the base TLS configuration of tls:// and https://
	// upstreams (RootCAs and so on); ServerName is always set from the
	// upstream URL. nil means the system roots.
	TLSConfig *tls.Config
	// Bootstrap are plain-UDP servers used to resolve upstream hostnames,
	// once, on first use. An upstream given by hostname without any
	// bootstrap server is an error.
	Bootstrap []netip.AddrPort
}

// resolvConf is where New reads the system resolvers when no upstream is
// configured.
const resolvConf = "/etc/resolv.conf"

// SystemUpstreams returns the nameservers of a resolv.conf file as udp://
// upstream strings.
func SystemUpstreams(path string) ([]string, error) {
	cc, err := dns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("system resolvers: %w", err)
	}
	port := cc.Port
	if port == "" {
		port = "53"
	}
	var ups []string
	for _, s := range cc.Servers {
		if i := strings.IndexByte(s, '%'); i >= 0 { // zone of a link-local server
			s = s[:i]
		}
		if _, err := netip.ParseAddr(s); err != nil {
			continue
		}
		ups = append(ups, "udp://"+net.JoinHostPort(s, port))
	}
	if len(ups) == 0 {
		return nil, fmt.Errorf("system resolvers: no nameserver in %s", path)
	}
	return ups, nil
}

// validate checks cfg and fills in defaults.
func (cfg *Config) validate() error {
	var errs []error
	switch cfg.Mode {
	case "":
		cfg.Mode = ModeReal
	case ModeReal, ModeFakeIP:
	default:
		errs = append(errs, fmt.Errorf("mode %q: want %q or %q", cfg.Mode, ModeReal, ModeFakeIP))
	}
	if cfg.Timeout < 0 {
		errs = append(errs, fmt.Errorf("timeout %v: must not be negative", cfg.Timeout))
	} else if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.CacheSize < 0 {
		errs = append(errs, fmt.Errorf("cache size %d: must not be negative", cfg.CacheSize))
	} else if cfg.CacheSize == 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	for _, b := range cfg.Bootstrap {
		if !b.IsValid() || b.Port() == 0 {
			errs = append(errs, fmt.Errorf("bootstrap %s: want IP:port", b))
		}
	}
	if cfg.Mode == ModeFakeIP {
		if cfg.FakeTTL < 0 {
			errs = append(errs, fmt.Errorf("fake-ip ttl %v: must not be negative", cfg.FakeTTL))
		} else if cfg.FakeTTL == 0 {
			cfg.FakeTTL = DefaultFakeTTL
		}
		if err := checkFakeRange("fake-ip range4", cfg.FakeRange4, false); err != nil {
			errs = append(errs, err)
		}
		if err := checkFakeRange("fake-ip range6", cfg.FakeRange6, true); err != nil {
			errs = append(errs, err)
		}
		if !cfg.FakeRange4.IsValid() && !cfg.FakeRange6.IsValid() {
			errs = append(errs, errors.New("fake-ip mode needs range4 or range6"))
		}
		cfg.FakeRange4, cfg.FakeRange6 = cfg.FakeRange4.Masked(), cfg.FakeRange6.Masked()
		for _, pat := range cfg.FakeExclude {
			if err := checkPattern(pat); err != nil {
				errs = append(errs, fmt.Errorf("fake-ip exclude %q: %w", pat, err))
			}
		}
	}
	return errors.Join(errs...)
}

func checkFakeRange(key string, p netip.Prefix, v6 bool) error {
	if !p.IsValid() {
		return nil
	}
	if p.Addr().Is4() == v6 || p.Addr().Is4In6() {
		fam := "IPv4"
		if v6 {
			fam = "IPv6"
		}
		return fmt.Errorf("%s %s: want an %s prefix", key, p, fam)
	}
	if p.Addr().BitLen()-p.Bits() < 2 {
		return fmt.Errorf("%s %s: too small, want at least 4 addresses", key, p)
	}
	return nil
}

func checkPattern(pat string) error {
	if pat == "*" {
		return nil
	}
	name := strings.TrimPrefix(pat, "*.")
	if name == "" || strings.Contains(name, "*") {
		return errors.New(`want "name", "*.name" or "*"`)
	}
	if _, ok := dns.IsDomainName(name); !ok {
		return errors.New("not a domain name")
	}
	return nil
}

// nameMatcher matches lower-case names without a trailing dot against
// FakeExclude patterns in time proportional to the number of labels.
type nameMatcher struct {
	all    bool
	exact  map[string]struct{}
	suffix map[string]struct{} // "lan" for "*.lan"
}

func newNameMatcher(patterns []string) *nameMatcher {
	m := &nameMatcher{exact: map[string]struct{}{}, suffix: map[string]struct{}{}}
	for _, pat := range patterns {
		pat = strings.TrimSuffix(strings.ToLower(pat), ".")
		switch {
		case pat == "*":
			m.all = true
		case strings.HasPrefix(pat, "*."):
			m.suffix[pat[2:]] = struct{}{}
		default:
			m.exact[pat] = struct{}{}
		}
	}
	return m
}

func (m *nameMatcher) match(name string) bool {
	if m.all {
		return true
	}
	if _, ok := m.exact[name]; ok {
		return true
	}
	if len(m.suffix) == 0 {
		return false
	}
	for i := 0; i < len(name); i++ {
		if name[i] == '.' {
			if _, ok := m.suffix[name[i+1:]]; ok {
				return true
			}
		}
	}
	return false
}
