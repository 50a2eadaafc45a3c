package gateway

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/dnsproxy"
	"github.com/tungate/tungate/outbound"
)

// hijack decides which flows dnsproxy answers: port-53 traffic to the
// configured addresses ("any" matches every address) and to dns.listen.
type hijack struct {
	anyPorts map[uint16]bool
	exact    map[netip.AddrPort]bool
}

func newHijack(cfg configs.DNS) (*hijack, error) {
	h := &hijack{anyPorts: map[uint16]bool{}, exact: map[netip.AddrPort]bool{}}
	for i, s := range cfg.Hijack {
		host, portStr, ok := strings.Cut(s, ":")
		if ok && host == "any" {
			port, err := strconv.ParseUint(portStr, 10, 16)
			if err != nil {
				return nil, fmt.Errorf("dns.hijack[%d]: bad port in %q", i, s)
			}
			h.anyPorts[uint16(port)] = true
			continue
		}
		ap, err := netip.ParseAddrPort(s)
		if err != nil {
			return nil, fmt.Errorf("dns.hijack[%d]: %q: %w", i, s, err)
		}
		h.exact[ap] = true
	}
	if cfg.Listen.IsValid() {
		h.exact[netip.AddrPortFrom(cfg.Listen, 53)] = true
	}
	return h, nil
}

// match reports whether dnsproxy answers a flow to dst.
func (h *hijack) match(dst netip.AddrPort) bool {
	if h == nil {
		return false
	}
	return h.anyPorts[dst.Port()] || h.exact[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]
}

// systemUpstreams reads the system resolvers for the default "no upstreams"
// case, leaving out tungate's own addresses: once the system resolver points
// at dns.listen, asking it would be asking ourselves.
func systemUpstreams(cfg *configs.Config) ([]string, error) {
	ups, err := dnsproxy.SystemUpstreams("/etc/resolv.conf")
	if err != nil {
		return nil, err
	}
	// systemd-resolved's stub (127.0.0.53) would hand tungate's own
	// queries back to the resolver tungate may have become: ask the
	// servers resolved itself uses.
	if onlyResolvedStub(ups) {
		if resolved, err := dnsproxy.SystemUpstreams("/run/systemd/resolve/resolv.conf"); err == nil {
			ups = resolved
		}
	}
	own := map[netip.Addr]bool{cfg.DNS.Listen: true}
	for _, p := range cfg.Tun.Address {
		own[p.Addr()] = true
	}
	var out []string
	for _, u := range ups {
		up, err := dnsproxy.ParseUpstream(u)
		if err == nil && own[up.Addr.Addr()] {
			continue
		}
		out = append(out, u)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("dns: the system's only resolvers are tungate's own addresses; set dns.upstreams")
	}
	return out, nil
}

// lateResolver lets outbounds built before the DNS proxy (which needs one
// of them to reach its upstreams) resolve fake-ip names through it.
type lateResolver struct {
	p atomic.Pointer[dnsproxy.Proxy]
}

func (r *lateResolver) IsFake(a netip.Addr) bool {
	p := r.p.Load()
	return p != nil && p.IsFake(a)
}

func (r *lateResolver) Resolve(ctx context.Context, name string, ipv6 bool) ([]netip.Addr, error) {
	p := r.p.Load()
	if p == nil {
		return nil, fmt.Errorf("dns proxy not running")
	}
	return p.Resolve(ctx, name, ipv6)
}

func onlyResolvedStub(ups []string) bool {
	for _, u := range ups {
		up, err := dnsproxy.ParseUpstream(u)
		if err != nil || up.Addr.Addr() != netip.AddrFrom4([4]byte{127, 0, 0, 53}) && up.Addr.Addr() != netip.AddrFrom4([4]byte{127, 0, 0, 54}) {
			return false
		}
	}
	return len(ups) > 0
}

// newDNSProxy builds the DNS proxy of cfg; its upstream queries go through
// dialer. It returns the upstreams it asks (the system's when
// dns.upstreams is empty).
func newDNSProxy(cfg *configs.Config, dialer outbound.Dialer, log *slog.Logger) (*dnsproxy.Proxy, []string, error) {
	upstreams := cfg.DNS.Upstreams
	if len(upstreams) == 0 {
		var err error
		if upstreams, err = systemUpstreams(cfg); err != nil {
			return nil, nil, err
		}
	}
	// Upstreams given by name (tls://dns.example) are resolved once through
	// the plain-UDP upstreams given by address.
	var bootstrap []netip.AddrPort
	for _, u := range upstreams {
		if up, err := dnsproxy.ParseUpstream(u); err == nil && up.Scheme == dnsproxy.SchemeUDP && up.Addr.IsValid() {
			bootstrap = append(bootstrap, up.Addr)
		}
	}
	p, err := dnsproxy.New(dnsproxy.Config{
		Mode:        cfg.DNS.Mode,
		Upstreams:   upstreams,
		Bootstrap:   bootstrap,
		CacheSize:   cfg.DNS.Cache.Size,
		FakeRange4:  cfg.DNS.FakeIP.Range4,
		FakeRange6:  cfg.DNS.FakeIP.Range6,
		FakeTTL:     cfg.DNS.FakeIP.TTL,
		FakeExclude: cfg.DNS.FakeIP.Exclude,
		Store:       cfg.DNS.FakeIP.Store,
	}, dialer, log)
	return p, upstreams, err
}

// swappableDialer is the outbound the DNS proxy's upstream queries go
// through: dns.outbound, which a reload may point elsewhere without
// rebuilding the proxy (and its cache and fake-ip pool).
type swappableDialer struct {
	current atomic.Pointer[dialerBox]
}

type dialerBox struct{ outbound.Dialer }

func (s *swappableDialer) set(d outbound.Dialer) { s.current.Store(&dialerBox{d}) }

func (s *swappableDialer) get() outbound.Dialer { return s.current.Load().Dialer }

// Name implements outbound.Dialer.
func (s *swappableDialer) Name() string { return s.get().Name() }

// DialTCP implements outbound.Dialer.
func (s *swappableDialer) DialTCP(ctx context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	return s.get().DialTCP(ctx, dst)
}

// ListenUDP implements outbound.Dialer.
func (s *swappableDialer) ListenUDP(ctx context.Context, first outbound.Target) (outbound.PacketConn, error) {
	return s.get().ListenUDP(ctx, first)
}

// CarriesUDP implements outbound.UDPCarrier for the current outbound, so
// that the DNS proxy asks its udp:// upstreams over TCP through one that
// carries TCP only.
func (s *swappableDialer) CarriesUDP() bool {
	c, ok := s.get().(outbound.UDPCarrier)
	return !ok || c.CarriesUDP()
}
