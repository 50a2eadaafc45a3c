package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tungate/tungate/api"
	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/dnsproxy"
	"github.com/tungate/tungate/forwarder"
	"github.com/tungate/tungate/netmon"
	"github.com/tungate/tungate/netstack"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/outbound/httpconnect"
	"github.com/tungate/tungate/outbound/socks5"
	"github.com/tungate/tungate/router"
	"github.com/tungate/tungate/tun"
)

// defaultFWMark marks proxy connections when no direct outbound says
// otherwise; it matches the direct outbound's default.
const defaultFWMark = 0x2e7

// shutdownFlush is how long queued packets (the RSTs of aborted flows) get
// to reach the app before the device closes.
const shutdownFlush = 200 * time.Millisecond

// shutdownHandshakeWait bounds how long shutdown waits for TCP flows to end
// before destroying the stack (which ends handshakes stuck on a silent app).
const shutdownHandshakeWait = 2 * time.Second

func newLogger(cfg configs.Log) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Level))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

// gateway is one running tungate: every part, in start order.
type gateway struct {
	log   *slog.Logger
	dev   *tun.Device
	stack *netstack.Stack
	tcp   *forwarder.TCP
	udp   *forwarder.UDPTable
	dns   *dnsproxy.Proxy
	api   *api.Server
	mon   *netmon.Monitor // the default interface, when an outbound follows it
	// dialers are the outbounds by name.
	dialers map[string]outbound.Dialer
	routes  installedRoutes
	closed  bool
}

func run(ctx context.Context, cfg *configs.Config) error {
	log := newLogger(cfg.Log)
	g, err := start(cfg, log)
	if err != nil {
		return err
	}
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	log.Info("shutting down")
	g.close()
	log.Info("stopped")
	return nil
}

// buildOutbounds builds the dialers. Direct sockets with interface ""
// follow mon's default interface (see newDirect); mon may be nil.
func buildOutbounds(cfg *configs.Config, resolver outbound.Resolver, mon *netmon.Monitor, log *slog.Logger) (map[string]outbound.Dialer, error) {
	dialers := make(map[string]outbound.Dialer, len(cfg.Outbounds))
	// Proxies are reached the way the direct outbound reaches the
	// Internet: marked (and bound) so their traffic never re-enters the
	// TUN.
	baseCfg := outbound.DirectConfig{Name: "proxy-transport", FWMark: defaultFWMark, KeepAlive: cfg.Stack.TCP.Keepalive}
	for _, o := range cfg.Outbounds {
		if o.Type == configs.OutboundDirect {
			baseCfg.FWMark, baseCfg.Interface = o.FWMark, o.Interface
			break
		}
	}
	base, err := newDirect(baseCfg, mon, log.With("outbound", baseCfg.Name))
	if err != nil {
		return nil, err
	}
	for i, o := range cfg.Outbounds {
		var (
			d   outbound.Dialer
			err error
		)
		switch o.Type {
		case configs.OutboundSOCKS5:
			d, err = socks5.New(socks5.Config{Name: o.Name, Address: o.Address, Username: o.Username, Password: o.Password, UDP: o.UDP}, base, log.With("outbound", o.Name))
		case configs.OutboundHTTP:
			d, err = httpconnect.New(httpconnect.Config{Name: o.Name, Address: o.Address, Username: o.Username, Password: o.Password}, base, log.With("outbound", o.Name))
		case configs.OutboundDirect:
			d, err = newDirect(outbound.DirectConfig{
				Name: o.Name, Interface: o.Interface, FWMark: o.FWMark, KeepAlive: cfg.Stack.TCP.Keepalive,
				Resolver: resolver,
			}, mon, log.With("outbound", o.Name))
		case configs.OutboundReject:
			d = outbound.NewReject(o.Name)
		default:
			err = fmt.Errorf("outbound type %q is not supported yet", o.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("outbounds[%d] (%s): %w", i, o.Name, err)
		}
		dialers[o.Name] = d
	}
	return dialers, nil
}

func start(cfg *configs.Config, log *slog.Logger) (g *gateway, err error) {
	if err := recoverSystemDNS(cfg, log); err != nil {
		return nil, err
	}
	g = &gateway{log: log, mon: startMonitor(cfg, log)}
	defer func() {
		if err != nil {
			g.close()
		}
	}()
	var resolver lateResolver
	dialers, err := buildOutbounds(cfg, &resolver, g.mon, log)
	if err != nil {
		return g, err
	}
	g.dialers = dialers
	rt, err := router.New(cfg.Rules, cfg.FinalOutbound())
	if err != nil {
		return g, err
	}

	var hj *hijack
	if cfg.DNS.Enabled {
		if hj, err = newHijack(cfg.DNS); err != nil {
			return g, err
		}
		if g.dns, err = newDNSProxy(cfg, dialers[cfg.DNSOutbound()], log.With("component", "dns")); err != nil {
			return g, err
		}
		resolver.p.Store(g.dns)
	}

	route := func(f *forwarder.Flow) outbound.Dialer {
		if g.dns != nil {
			if name, ok := g.dns.Domain(f.Dst.Addr()); ok {
				f.Domain = name
			}
			if a := f.Dst.Addr(); g.dns.IsFake(a) {
				// A live flow keeps its fake address from being
				// recycled to another name.
				g.dns.Pin(a)
				f.Release = func() { g.dns.Unpin(a) }
			}
		}
		name, idx := rt.Match(router.Metadata{Network: f.Network, Src: f.Src, Dst: f.Dst, Domain: f.Domain})
		log.Debug("route", "network", f.Network, "src", f.Src, "dst", f.Dst, "domain", f.Domain, "rule", idx, "outbound", name)
		return dialers[name]
	}
	// A flow from one of tungate's own sockets (a wrong mark, a wrong
	// interface) would loop through the TUN: refuse it at once.
	route = g.loopGuard(cfg, route)

	g.tcp, err = forwarder.NewTCP(forwarder.TCPConfig{
		DialTimeout: cfg.Stack.TCP.DialTimeout,
		IdleTimeout: cfg.Stack.TCP.IdleTimeout,
	}, route, log.With("component", "tcp"))
	if err != nil {
		return g, err
	}
	g.udp, err = forwarder.NewUDPTable(forwarder.UDPConfig{
		IdleTimeout:    cfg.Stack.UDP.IdleTimeout,
		DNSIdleTimeout: cfg.Stack.UDP.DNSIdleTimeout,
		MaxSessions:    cfg.Stack.UDP.MaxSessions,
		Symmetric:      cfg.Stack.UDP.NAT == "symmetric",
		Names:          g.names,
	}, route, func(p []byte, from, to netip.AddrPort) error {
		return g.stack.WriteUDP(p, from, to)
	}, log.With("component", "udp"))
	if err != nil {
		return g, err
	}

	g.dev, err = tun.Open(tun.Config{
		Name:      cfg.Tun.Name,
		MTU:       cfg.Tun.MTU,
		Addresses: cfg.Tun.Address,
		Offload:   cfg.Tun.Offload != "off",
		FD:        cfg.Tun.FD,
	}, log)
	if err != nil {
		return g, err
	}
	if g.mon != nil {
		g.mon.Ignore(g.dev.Name()) // an adopted TUN (tun.fd) names itself only now
	}
	g.stack, err = netstack.New(g.dev, &flowHandler{g: g, hijack: hj}, netstack.Config{
		MTU:         g.dev.MTU(),
		MaxInFlight: cfg.Stack.TCP.MaxInFlight,
		Keepalive:   cfg.Stack.TCP.Keepalive,
	}, log.With("component", "netstack"))
	if err != nil {
		return g, err
	}
	g.stack.Start(func(err error) bool { return errors.Is(err, tun.ErrClosed) || errors.Is(err, os.ErrClosed) })

	if cfg.API.Listen != "" {
		reg := prometheus.NewRegistry()
		registerMetrics(reg, g)
		g.api, err = api.New(api.Config{Listen: cfg.API.Listen, Secret: cfg.API.Secret}, reg, log.With("component", "api"))
		if err != nil {
			return g, err
		}
		if err = g.api.Start(); err != nil {
			return g, err
		}
	}

	names := make([]string, 0, len(cfg.Outbounds))
	for _, o := range cfg.Outbounds {
		names = append(names, o.Name+"("+o.Type+")")
	}
	log.Info("tungate running", "tun", g.dev.Name(), "outbounds", strings.Join(names, ","), "final", cfg.FinalOutbound(), "rules", len(cfg.Rules))
	if err = g.installRoutes(cfg); err != nil {
		return g, err
	}
	if cfg.DNS.Enabled {
		log.Info("dns proxy running", "mode", cfg.DNS.Mode, "listen", cfg.DNS.Listen, "hijack", strings.Join(cfg.DNS.Hijack, ","), "outbound", cfg.DNSOutbound())
	}
	return g, nil
}

// close shuts down in order: refuse new flows, end the open ones (their
// RSTs still reach the apps), then the device, the stack and the API.
//
// A flow still in its handshake with the app holds its goroutine until the
// stack is destroyed, so the TCP relay's Close is waited for only briefly
// before the stack goes, and fully after.
func (g *gateway) close() {
	if g.closed {
		return
	}
	g.closed = true
	// Routes go first, so that no new traffic enters the TUN.
	g.removeRoutes()
	if g.stack != nil {
		g.stack.StopAccepting()
	}
	tcpClosed := make(chan struct{})
	go func() {
		defer close(tcpClosed)
		if g.tcp != nil {
			g.tcp.Close()
		}
	}()
	if g.udp != nil {
		g.udp.Close()
	}
	if g.dns != nil {
		g.dns.Close()
	}
	select {
	case <-tcpClosed:
	case <-time.After(shutdownHandshakeWait):
		g.log.Warn("tcp flows still closing; destroying the stack under them")
	}
	if g.stack != nil {
		g.stack.Flush(shutdownFlush)
	}
	if g.dev != nil {
		if err := g.dev.Close(); err != nil {
			g.log.Warn("closing tun", "err", err)
		}
	}
	if g.stack != nil {
		g.stack.Close()
	}
	<-tcpClosed
	if g.mon != nil {
		g.mon.Close()
	}
	if g.api != nil {
		g.api.Close()
	}
}

// names gives the domain behind an address, for UDP datagrams to more
// than one destination.
func (g *gateway) names(a netip.Addr) (string, bool) {
	if g.dns == nil {
		return "", false
	}
	return g.dns.Domain(a)
}

func newDNSProxy(cfg *configs.Config, dialer outbound.Dialer, log *slog.Logger) (*dnsproxy.Proxy, error) {
	upstreams := cfg.DNS.Upstreams
	if len(upstreams) == 0 {
		var err error
		if upstreams, err = systemUpstreams(cfg); err != nil {
			return nil, err
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
	return dnsproxy.New(dnsproxy.Config{
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
}

// flowHandler hands the netstack's flows to the DNS proxy (hijacked port-53
// traffic) or to the forwarders (everything else).
type flowHandler struct {
	g      *gateway
	hijack *hijack
}

func (h *flowHandler) HandleTCP(r *netstack.TCPRequest) {
	if h.hijack.match(r.Dst()) {
		conn, err := r.Accept()
		if err != nil {
			return
		}
		h.g.dns.ServeTCP(conn)
		return
	}
	h.g.tcp.Handle(tcpFlow{r})
}

func (h *flowHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) bool {
	if h.hijack.match(dst) {
		stack := h.g.stack
		h.g.dns.HandleUDP(payload, func(answer []byte) {
			if err := stack.WriteUDP(answer, dst, src); err != nil {
				h.g.log.Debug("dns reply", "to", src, "err", err)
			}
		})
		return true
	}
	return h.g.udp.Handle(src, dst, payload)
}

// FlushUDP implements netstack.UDPFlusher.
func (h *flowHandler) FlushUDP() { h.g.udp.Flush() }

type tcpFlow struct{ *netstack.TCPRequest }

func (f tcpFlow) Accept() (forwarder.AppConn, error) {
	c, err := f.TCPRequest.Accept()
	if err != nil {
		return nil, err
	}
	return c, nil
}
