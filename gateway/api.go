package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/api"
	"github.com/tungate/tungate/forwarder"
	"github.com/tungate/tungate/outbound"
)

// Modes of the Clash API (PATCH /configs).
const (
	modeRule   = "rule"
	modeGlobal = "global"
	modeDirect = "direct"
)

// globalGroup is the Clash API's selector over every outbound, used in
// global mode.
const globalGroup = "GLOBAL"

// apiBackend is the gateway as the API sees it.
type apiBackend struct{ g *Gateway }

var _ api.Backend = apiBackend{}

func (b apiBackend) Version() string {
	if b.g.deps.Version == "" {
		return "tungate"
	}
	return "tungate " + b.g.deps.Version
}

func (b apiBackend) Totals() (up, down uint64) {
	g := b.g
	up = g.tcp.Stats().BytesUp.Load() + g.udp.Stats().BytesUp.Load()
	down = g.tcp.Stats().BytesDown.Load() + g.udp.Stats().BytesDown.Load()
	return up, down
}

func (b apiBackend) Connections() api.Snapshot {
	up, down := b.Totals()
	conns := b.g.tracker.Snapshot()
	s := api.Snapshot{UploadTotal: up, DownloadTotal: down, Connections: make([]api.Connection, len(conns)), Memory: goMemory()}
	dnsMode := "normal"
	if cfg := b.g.running().routing.cfg; cfg.DNS.Enabled && cfg.DNS.Mode == "fake-ip" {
		dnsMode = "fake-ip"
	}
	for i, c := range conns {
		s.Connections[i] = clashConnection(c, dnsMode)
	}
	return s
}

// clashConnection renders a tracked flow as the dashboards read it.
func clashConnection(c forwarder.ConnInfo, dnsMode string) api.Connection {
	src, _ := netip.ParseAddrPort(c.Src)
	dst, _ := netip.ParseAddrPort(c.Dst)
	md := api.Metadata{
		Network:         c.Network,
		Type:            "Tun",
		SourceIP:        src.Addr().String(),
		SourcePort:      strconv.Itoa(int(src.Port())),
		DestinationIP:   dst.Addr().String(),
		DestinationPort: strconv.Itoa(int(dst.Port())),
		Host:            c.Domain,
		DNSMode:         dnsMode,
		InboundName:     c.Inbound,
	}
	if c.UID >= 0 {
		uid := c.UID
		md.UID = &uid
	}
	chains := c.Chain
	if len(chains) == 0 {
		chains = []string{c.Outbound}
	}
	return api.Connection{
		ID: strconv.FormatUint(c.ID, 10), Metadata: md,
		Upload: c.Upload, Download: c.Download, Start: c.Start,
		Chains: chains, Rule: c.Rule, RulePayload: c.RulePayload,
	}
}

func (b apiBackend) CloseConnection(id string) bool {
	n, err := strconv.ParseUint(id, 10, 64)
	return err == nil && b.g.tracker.Close(n)
}

func (b apiBackend) CloseAllConnections() int {
	n := 0
	for _, c := range b.g.tracker.Snapshot() {
		if b.g.tracker.Close(c.ID) {
			n++
		}
	}
	return n
}

// running returns the configuration in force.
func (g *Gateway) running() *table { return g.current.Load() }

func (b apiBackend) Proxies() map[string]api.Proxy {
	t := b.g.running()
	cfg := t.routing.cfg
	out := make(map[string]api.Proxy, len(cfg.Outbounds)+1)
	names := make([]string, 0, len(cfg.Outbounds))
	for _, o := range cfg.Outbounds {
		udp := true
		if c, ok := t.outbounds[o.Name].(outbound.UDPCarrier); ok {
			udp = c.CarriesUDP()
		}
		out[o.Name] = api.Proxy{Name: o.Name, Type: clashType(o.Type), UDP: udp, History: []api.Delay{}}
		names = append(names, o.Name)
	}
	out[globalGroup] = api.Proxy{Name: globalGroup, Type: "Selector", UDP: true, All: names, Now: b.g.globalChoice(t), History: []api.Delay{}}
	return out
}

// clashType is the Clash name of an outbound kind: its type, capitalised
// ("direct" → "Direct").
func clashType(kind string) string {
	if kind == "" {
		return ""
	}
	return strings.ToUpper(kind[:1]) + kind[1:]
}

func (b apiBackend) Select(group, name string) error {
	if group != globalGroup {
		return fmt.Errorf("%q is not a selector group (GLOBAL is)", group)
	}
	if _, ok := b.g.running().outbounds[name]; !ok {
		return fmt.Errorf("no outbound %q", name)
	}
	b.g.global.Store(&name)
	b.g.log.Info("api: GLOBAL selects", "outbound", name)
	return nil
}

// Delay measures an HTTP GET of rawURL through the outbound called name:
// the time until the response's headers.
func (b apiBackend) Delay(ctx context.Context, name, rawURL string) (time.Duration, error) {
	d, ok := b.g.running().outbounds[name]
	if !ok {
		return 0, fmt.Errorf("outbound %q: %w", name, api.ErrNotFound)
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return 0, err
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			target, err := b.g.target(ctx, addr)
			if err != nil {
				return nil, err
			}
			return d.DialTCP(ctx, target)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	resp, err := tr.RoundTrip(req)
	if err != nil {
		return 0, err
	}
	elapsed := time.Since(start)
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	return elapsed, nil
}

// target makes host:port an outbound target: an address as is, a name
// resolved through the DNS proxy (and handed on as the target's domain).
func (g *Gateway) target(ctx context.Context, hostport string) (outbound.Target, error) {
	host, portStr, err := net.SplitHostPort(hostport)
	if err != nil {
		return outbound.Target{}, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return outbound.Target{}, fmt.Errorf("port %q", portStr)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return outbound.Target{Addr: netip.AddrPortFrom(a.Unmap(), uint16(port))}, nil
	}
	if g.dns == nil {
		return outbound.Target{}, fmt.Errorf("%s: a name, and DNS is off", host)
	}
	addrs, err := g.dns.Resolve(ctx, host, false)
	if err != nil || len(addrs) == 0 {
		return outbound.Target{}, fmt.Errorf("resolve %s: %v", host, err)
	}
	return outbound.Target{Addr: netip.AddrPortFrom(addrs[0], uint16(port)), Domain: host}, nil
}

func (b apiBackend) Rules() []api.Rule {
	cfg := b.g.running().routing.cfg
	out := make([]api.Rule, 0, len(cfg.Rules)+1)
	for i, r := range cfg.Rules {
		out = append(out, api.Rule{Type: fmt.Sprintf("rules[%d]", i), Payload: DescribeRule(r), Proxy: r.Outbound})
	}
	return append(out, api.Rule{Type: "final", Payload: "", Proxy: cfg.FinalOutbound()})
}

func (b apiBackend) Configs() api.Configs {
	level := "info"
	if b.g.deps.Level != nil {
		level = api.LevelName(b.g.deps.Level.Level())
	}
	ipv6 := false
	for _, p := range b.g.running().routing.cfg.Tun.Address {
		ipv6 = ipv6 || p.Addr().Is6()
	}
	return api.Configs{Mode: *b.g.mode.Load(), LogLevel: level, IPv6: ipv6}
}

func (b apiBackend) Patch(p api.ConfigPatch) error {
	if p.Mode != nil {
		m := strings.ToLower(*p.Mode)
		switch m {
		case modeRule, modeGlobal:
		case modeDirect:
			if b.g.running().direct == "" {
				return errors.New("mode direct: no direct outbound is configured")
			}
		default:
			return fmt.Errorf("mode %q: want rule, global or direct", *p.Mode)
		}
		b.g.mode.Store(&m)
		b.g.log.Info("api: mode set", "mode", m)
	}
	if p.LogLevel != nil {
		if b.g.deps.Level == nil {
			return errors.New("log-level: not adjustable here")
		}
		l, ok := api.ParseLevel(*p.LogLevel)
		if !ok || *p.LogLevel == "" {
			return fmt.Errorf("log-level %q: want debug, info, warning, error or silent", *p.LogLevel)
		}
		b.g.deps.Level.Set(l)
	}
	return nil
}

func (b apiBackend) Reload() error {
	if b.g.deps.Load == nil {
		return errors.New("nothing to reload: tungate runs on the embedded default configuration (no --config)")
	}
	return b.g.Reload(b.g.deps.Load)
}

func (b apiBackend) FlushDNSCache() error {
	if b.g.dns == nil {
		return errors.New("DNS is off (dns.enabled: false)")
	}
	b.g.dns.FlushCache()
	b.g.log.Info("api: DNS cache flushed")
	return nil
}

func (b apiBackend) FlushFakeIP() error {
	if b.g.dns == nil {
		return errors.New("DNS is off (dns.enabled: false)")
	}
	n, err := b.g.dns.FlushFakeIP()
	if err != nil {
		return err
	}
	b.g.log.Info("api: fake-ip mappings flushed", "mappings", n)
	return nil
}

// QueryDNS asks the DNS proxy as an app would and renders the answer as
// Clash's /dns/query does.
func (b apiBackend) QueryDNS(ctx context.Context, name, qtype string) (any, error) {
	if b.g.dns == nil {
		return nil, errors.New("DNS is off (dns.enabled: false)")
	}
	if name == "" {
		return nil, errors.New("name: required")
	}
	if qtype == "" {
		qtype = "A"
	}
	t, ok := dns.StringToType[strings.ToUpper(qtype)]
	if !ok {
		return nil, fmt.Errorf("type %q: not a DNS record type", qtype)
	}
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), t)
	m, err := b.g.dns.Exchange(ctx, q)
	if err != nil {
		return nil, err
	}
	type rr struct {
		Name string `json:"name"`
		Type uint16 `json:"type"`
		TTL  uint32 `json:"TTL"`
		Data string `json:"data"`
	}
	render := func(rrs []dns.RR) []rr {
		out := make([]rr, 0, len(rrs))
		for _, r := range rrs {
			h := r.Header()
			out = append(out, rr{Name: h.Name, Type: h.Rrtype, TTL: h.Ttl, Data: strings.TrimPrefix(r.String(), h.String())})
		}
		return out
	}
	type question struct {
		Name  string `json:"name"`
		Qtype uint16 `json:"qtype"`
		Class uint16 `json:"qclass"`
	}
	return map[string]any{
		"Status":   m.Rcode,
		"Question": []question{{Name: q.Question[0].Name, Qtype: t, Class: dns.ClassINET}},
		"TC":       m.Truncated, "RD": m.RecursionDesired, "RA": m.RecursionAvailable, "AD": m.AuthenticatedData, "CD": m.CheckingDisabled,
		"Answer":    render(m.Answer),
		"Authority": render(m.Ns),
	}, nil
}

func (b apiBackend) NAT() []api.NATEntry {
	ms := b.g.udp.Mappings()
	out := make([]api.NATEntry, len(ms))
	for i, m := range ms {
		out[i] = api.NATEntry{
			ID: strconv.FormatUint(m.ID, 10), Source: m.Src.String(), Outbound: m.Outbound,
			First: m.First.String(), Host: m.Domain, Local: m.Local, Remotes: m.Remotes,
			LastSeen: m.LastSeen, Upload: m.Up, Download: m.Down,
		}
	}
	return out
}

// Explain runs the routing step for dst over network (default tcp), with
// domain when given, as the running gateway would.
func (b apiBackend) Explain(dst, network, domain string) (any, error) {
	ap, err := netip.ParseAddrPort(dst)
	if err != nil {
		return nil, fmt.Errorf("dst: want ADDR:PORT: %v", err)
	}
	if network == "" {
		network = "tcp"
	}
	if !slices.Contains([]string{"tcp", "udp"}, network) {
		return nil, fmt.Errorf("network %q: want tcp or udp", network)
	}
	return b.g.Route(Meta{Network: network, Inbound: "api", Dst: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), Domain: domain}), nil
}
