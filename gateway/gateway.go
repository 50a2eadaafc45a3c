package gateway

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"runtime/metrics"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/tungate/tungate/api"
	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/dnsproxy"
	"github.com/tungate/tungate/forwarder"
	"github.com/tungate/tungate/loopguard"
	"github.com/tungate/tungate/netmon"
	"github.com/tungate/tungate/netstack"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/tun"
)

// shutdownFlush is how long queued packets (the RSTs of aborted flows) get
// to reach the app before the device closes.
const shutdownFlush = 200 * time.Millisecond

// shutdownHandshakeWait bounds how long shutdown waits for TCP flows to end
// before destroying the stack (which ends handshakes stuck on a silent app).
const shutdownHandshakeWait = 2 * time.Second

// Gateway is one tungate data plane: the TUN, the netstack, the routing
// step, the outbounds, the DNS proxy, the relays and their tracker, the
// API, and the host state it changed.
//
// Its states:
//
//	         Start (ok)            Close
//	created ───────────► running ───────► closed
//	   │                  │   ▲              ▲
//	   │                  └───┘ Reload       │
//	   └──────── Start (failed) or Close ────┘
//
// Start brings the parts up in order and, when one fails, takes down the
// ones it started. Reload applies to a running gateway only. Close is
// idempotent and ordered: routes and system DNS first (no new traffic),
// then the relays (open flows reset), the DNS proxy, the device and the
// stack, then the rest. Start, Reload and Close are serialised.
type Gateway struct {
	log  *slog.Logger
	deps Deps

	// mode is the Clash API's: "rule" (the rules), "global" (every flow
	// to the GLOBAL selection) or "direct" (every flow to the first
	// direct outbound). Both survive reloads.
	mode   atomic.Pointer[string]
	global atomic.Pointer[string]

	mu      sync.Mutex // serialises Start, Reload and Close
	state   state
	cfg     *configs.Config
	outs    *outboundSet // under mu
	current atomic.Pointer[table]

	tracker  *forwarder.Tracker
	mon      *netmon.Monitor
	loop     *loopguard.Detector
	resolver lateResolver
	dnsOut   swappableDialer
	dns      *dnsproxy.Proxy
	tcp      *forwarder.TCP
	udp      *forwarder.UDPTable
	dev      *tun.Device
	stack    *netstack.Stack
	api      *api.Server
	system   systemState
	reloads  *prometheus.CounterVec
}

type state int

const (
	stateCreated state = iota
	stateRunning
	stateClosed
)

// table is what one configuration decides per flow, swapped whole by a
// reload: flows read it through one atomic load.
type table struct {
	routing   *routing
	outbounds map[string]outbound.Dialer
	// direct is the first outbound that owns sockets ("direct" mode's
	// outbound), "" when there is none.
	direct string
}

// newTable is the table of cfg over its built outbounds.
func newTable(cfg *configs.Config, r *routing, dialers map[string]outbound.Dialer) *table {
	t := &table{routing: r, outbounds: dialers}
	for _, o := range cfg.Outbounds {
		if _, ok := o.Settings.(outbound.SocketOwner); ok {
			t.direct = o.Name
			break
		}
	}
	return t
}

// Deps is what a gateway is given besides its configuration.
type Deps struct {
	// Log is the logger; nil discards.
	Log *slog.Logger
	// Logs, when set, feeds the API's /logs stream (Log should write
	// through it).
	Logs *api.LogHub
	// Level, when set, is Log's level, which the API may change.
	Level *slog.LevelVar
	// Version names this tungate in the API.
	Version string
	// Load re-reads the configuration file; nil when there is none (the
	// embedded default). The API's PUT /configs reloads through it.
	Load func() (*configs.Config, error)
}

// New returns a gateway for cfg (validated by configs.Load). It opens
// nothing: Start does.
func New(cfg *configs.Config, deps Deps) (*Gateway, error) {
	if cfg == nil {
		return nil, errors.New("gateway: no configuration")
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := preflight(cfg); err != nil {
		return nil, err
	}
	g := &Gateway{log: discardIfNil(deps.Log), deps: deps, cfg: cfg, tracker: forwarder.NewTracker()}
	if cfg.Log.Flows {
		flows := g.log.With("component", "flow")
		g.tracker.OnEnd = func(c forwarder.ConnInfo, lived time.Duration) { logFlowEnd(flows, c, lived) }
	}
	rule := modeRule
	g.mode.Store(&rule)
	return g, nil
}

// preflight builds what Start would build from cfg alone — the routing
// step and every outbound — and drops it, so that a configuration Start
// would refuse before touching the host is refused here. Validate is meant
// to refuse all of it already (TestCheckEqualsRun holds the two together).
func preflight(cfg *configs.Config) error {
	if _, err := newRouting(cfg); err != nil {
		return err
	}
	set, _, err := buildOutbounds(cfg, nil, outbound.Deps{})
	if err != nil {
		return err
	}
	closeDialers(set.all())
	return nil
}

// logFlowEnd is log.flows: one line per ended TCP flow or UDP session.
func logFlowEnd(log *slog.Logger, c forwarder.ConnInfo, lived time.Duration) {
	log.Info("flow end", "network", c.Network, "inbound", c.Inbound, "src", c.Src, "dst", c.Dst, "domain", c.Domain,
		"rule", c.Rule, "outbound", c.Outbound, "up", c.Upload, "down", c.Download, "duration", lived.Round(time.Millisecond))
}

// Tracker returns the connection tracker: every live flow.
func (g *Gateway) Tracker() *forwarder.Tracker { return g.tracker }

// Start brings the gateway up. On failure everything it started is
// undone and the gateway is closed.
func (g *Gateway) Start() (err error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.state != stateCreated {
		return errors.New("gateway: Start on a gateway that is not new")
	}
	defer func() {
		if err != nil {
			g.closeLocked()
		}
	}()
	cfg := g.cfg
	if err := recoverSystemDNS(cfg, g.log); err != nil {
		return err
	}
	g.mon = g.startMonitor(cfg)
	g.loop = g.startLoopGuard(cfg)

	g.outs, _, err = buildOutbounds(cfg, nil, g.outboundDeps(cfg))
	if err != nil {
		return err
	}
	r, err := newRouting(cfg)
	if err != nil {
		return err
	}
	g.current.Store(newTable(cfg, r, g.outs.dialers))

	var upstreams []string // the DNS proxy's, for the first screen
	if cfg.DNS.Enabled {
		g.dnsOut.set(g.outs.dialers[cfg.DNSOutbound()])
		if g.dns, upstreams, err = newDNSProxy(cfg, &g.dnsOut, g.log.With("component", "dns")); err != nil {
			return err
		}
		g.resolver.p.Store(g.dns)
	}

	g.tcp, err = forwarder.NewTCP(forwarder.TCPConfig{
		DialTimeout: cfg.Stack.TCP.DialTimeout,
		IdleTimeout: cfg.Stack.TCP.IdleTimeout,
		Tracker:     g.tracker,
	}, g.routeFlow, g.log.With("component", "tcp"))
	if err != nil {
		return err
	}
	g.udp, err = forwarder.NewUDPTable(forwarder.UDPConfig{
		IdleTimeout:    cfg.Stack.UDP.IdleTimeout,
		DNSIdleTimeout: cfg.Stack.UDP.DNSIdleTimeout,
		MaxSessions:    cfg.Stack.UDP.MaxSessions,
		Symmetric:      cfg.Stack.UDP.NAT == "symmetric",
		Names:          g.names,
		Tracker:        g.tracker,
	}, g.routeFlow, func(p []byte, from, to netip.AddrPort) error {
		return g.stack.WriteUDP(p, from, to)
	}, g.log.With("component", "udp"))
	if err != nil {
		return err
	}

	g.dev, err = tun.Open(tun.Config{
		Name:      cfg.Tun.Name,
		MTU:       cfg.Tun.MTU,
		Addresses: cfg.Tun.Address,
		Offload:   cfg.Tun.Offload != "off",
		FD:        cfg.Tun.FD,
	}, g.log)
	if err != nil {
		return err
	}
	if g.mon != nil {
		g.mon.Ignore(g.dev.Name()) // an adopted TUN (tun.fd) names itself only now
	}
	g.stack, err = netstack.New(g.dev, flowHandler{g}, netstack.Config{
		MTU:         g.dev.MTU(),
		MaxInFlight: cfg.Stack.TCP.MaxInFlight,
		Keepalive:   cfg.Stack.TCP.Keepalive,
	}, g.log.With("component", "netstack"))
	if err != nil {
		return err
	}
	g.stack.Start(func(err error) bool { return errors.Is(err, tun.ErrClosed) || errors.Is(err, os.ErrClosed) })

	if cfg.API.Listen != "" {
		g.api, err = api.New(api.Config{Listen: cfg.API.Listen, Secret: cfg.API.Secret, CORS: cfg.API.CORS, UI: cfg.API.UI, PProf: cfg.API.PProf, Logs: g.deps.Logs}, g.metrics(), apiBackend{g}, g.log.With("component", "api"))
		if err != nil {
			return err
		}
		if err = g.api.Start(); err != nil {
			return err
		}
	}

	names := make([]string, 0, len(cfg.Outbounds))
	for _, o := range cfg.Outbounds {
		names = append(names, o.Name+"("+o.Type+")")
	}
	g.log.Info("tungate running", "tun", g.dev.Name(), "outbounds", strings.Join(names, ","), "final", cfg.FinalOutbound(), "rules", len(cfg.Rules))
	if err = g.installRoutes(cfg); err != nil {
		return err
	}
	if cfg.DNS.Enabled {
		g.log.Info("dns proxy running", "mode", cfg.DNS.Mode, "listen", cfg.DNS.Listen, "hijack", strings.Join(cfg.DNS.Hijack, ","), "outbound", cfg.DNSOutbound())
	}
	sc := screen{tun: g.dev.Name(), upstreams: upstreams}
	if g.api != nil {
		sc.api = g.api.Addr().String()
	}
	for _, line := range firstScreen(cfg, sc) {
		g.log.Info(line)
	}
	g.state = stateRunning
	return nil
}

// outboundDeps is what every outbound of cfg is built with.
func (g *Gateway) outboundDeps(cfg *configs.Config) outbound.Deps {
	deps := outbound.Deps{
		Log:       g.log,
		Resolver:  &g.resolver,
		KeepAlive: cfg.Stack.TCP.Keepalive,
		Monitor:   g.mon,
	}
	if g.loop != nil {
		deps.Dialing = g.loop.Dialing
	}
	return deps
}

// startMonitor starts following the default interface when an upstream
// socket needs it; nil when none does, or when it cannot be followed here
// (then those sockets are bound to no interface and rely on the fwmark,
// and one line says so).
func (g *Gateway) startMonitor(cfg *configs.Config) *netmon.Monitor {
	if !followsDefault(cfg) {
		return nil
	}
	m := netmon.New(netmon.Config{Ignore: []string{cfg.Tun.Name}}, g.log.With("component", "netmon"))
	if err := m.Start(); err != nil {
		g.log.Warn("default interface not followed: outbound sockets with interface \"\" are bound to none and rely on the fwmark", "err", err)
		m.Close()
		return nil
	}
	return m
}

// startLoopGuard starts recognising flows that tungate's own upstream
// sockets sent into the TUN (a routing loop: an outbound whose fwmark no
// rule excludes, or one bound to the TUN), so that they are refused at
// once — a RST, or ICMP port unreachable for UDP — with one log line
// saying how to fix it, instead of being dialled again, which would loop
// until the dial timeout. Every upstream socket reports itself (Dialing),
// so the kernel is asked only about flows to a destination being dialled
// at that moment: no system call for the others.
func (g *Gateway) startLoopGuard(cfg *configs.Config) *loopguard.Detector {
	log := g.log.With("component", "loop")
	marks, unmarked := OwnMarks(cfg)
	lc := loopguard.Config{Marks: marks, Unmarked: unmarked, Tracked: true, Priority: cfg.Route.Priority, Tun: cfg.Tun.Name}
	if cfg.Route.Auto {
		lc.Excluded = marks // sysroute excludes exactly these
	}
	det, err := loopguard.New(lc, log)
	if err != nil {
		log.Warn("loop detection is off", "err", err)
		return nil
	}
	log.Debug("loop guard on", "fwmarks", marks, "unmarked_outbounds", unmarked)
	return det
}

// Route is the routing step every flow takes, as it runs now: hijacked
// DNS, the flow's name (fake-ip or real-mode answers), the loop guard and
// the rules. It has no side effects: a flow's fake address is pinned by
// the relays' use of it, not here. doctor --explain takes the same step
// through Explain.
func (g *Gateway) Route(m Meta) Decision {
	d, _ := g.route(m)
	return d
}

func (g *Gateway) route(m Meta) (Decision, outbound.Dialer) {
	t := g.current.Load()
	var names Names
	if g.dns != nil {
		names = g.dns
	}
	d := t.routing.route(m, names)
	if d.DNS {
		return d, nil
	}
	if g.loop.Loop(m.Network, m.Src, m.Dst) {
		d.Loop, d.Outbound, d.Chain = true, loopRefusal{}.Name(), []string{loopRefusal{}.Name()}
		return d, loopRefusal{}
	}
	switch *g.mode.Load() {
	case modeGlobal:
		if name := g.globalChoice(t); name != "" {
			d.Outbound, d.Rule, d.RuleName, d.RulePayload, d.Chain = name, -1, modeGlobal, "", []string{name}
		}
	case modeDirect:
		if t.direct != "" {
			d.Outbound, d.Rule, d.RuleName, d.RulePayload, d.Chain = t.direct, -1, modeDirect, "", []string{t.direct}
		}
	}
	return d, t.outbounds[d.Outbound]
}

// globalChoice is the GLOBAL selection, or the final outbound when none
// was made or the chosen one is gone.
func (g *Gateway) globalChoice(t *table) string {
	if p := g.global.Load(); p != nil {
		if _, ok := t.outbounds[*p]; ok {
			return *p
		}
	}
	return t.routing.cfg.FinalOutbound()
}

// routeFlow is the relays' forwarder.Route.
func (g *Gateway) routeFlow(f *forwarder.Flow) outbound.Dialer {
	d, dialer := g.route(Meta{Network: f.Network, Inbound: f.Inbound, Src: f.Src, Dst: f.Dst, UID: f.UID})
	f.Domain, f.DomainSource = d.Domain, d.DomainSource
	f.Rule, f.RulePayload, f.Chain = d.RuleName, d.RulePayload, d.Chain
	if a := f.Dst.Addr(); d.DomainSource == "fake-ip" {
		// A live flow keeps its fake address from being recycled to
		// another name (the routing step found the mapping; an address
		// without one has nothing to pin).
		g.dns.Pin(a)
		f.Release = func() { g.dns.Unpin(a) }
	}
	g.log.Debug("route", "network", f.Network, "src", f.Src, "dst", f.Dst, "domain", f.Domain, "rule", d.Rule, "outbound", d.Outbound)
	if dialer == nil {
		// Hijacked DNS reaches the relays only when DNS is off; a rule
		// naming no outbound cannot pass validation.
		return loopRefusal{}
	}
	return dialer
}

// names gives the domain behind an address, for UDP datagrams to more
// than one destination.
func (g *Gateway) names(a netip.Addr) (string, bool) {
	if g.dns == nil {
		return "", false
	}
	return g.dns.Domain(a)
}

// metrics is the registry the API serves: the Go runtime's (go_goroutines
// among them: how tests see that flows leave nothing behind), and each
// part's own collector.
func (g *Gateway) metrics() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(g.stack.Collector(), g.tcp.Collector(), g.udp.Collector())
	if g.dns != nil {
		reg.MustRegister(g.dns.Collector())
	}
	reg.MustRegister(outboundCollector{g})
	g.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "tungate", Name: "config_reloads_total", Help: "Configuration reloads, by result (applied, refused)."}, []string{"result"})
	reg.MustRegister(g.reloads)
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: "tungate", Name: "tracked_flows", Help: "TCP flows and UDP sessions in the connection tracker."}, func() float64 { return float64(g.tracker.Len()) }))
	return reg
}

// outboundCollector asks every outbound of the running configuration for
// its own counters (outbound.MetricsCollector). It is unchecked (describes
// nothing) because the set of outbounds changes with reloads.
type outboundCollector struct{ g *Gateway }

func (outboundCollector) Describe(chan<- *prometheus.Desc) {}

func (c outboundCollector) Collect(ch chan<- prometheus.Metric) {
	for _, d := range c.g.current.Load().outbounds {
		if mc, ok := d.(outbound.MetricsCollector); ok {
			mc.Collect(ch)
		}
	}
}

// Close shuts down in order: routes and system DNS first (no new traffic
// enters the TUN), new flows refused, open ones ended (their RSTs still
// reach the apps), then the device, the stack and the API. It is
// idempotent.
func (g *Gateway) Close() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closeLocked()
	return nil
}

// closeLocked is Close. A flow still in its handshake with the app holds
// its goroutine until the stack is destroyed, so the TCP relay's Close is
// waited for only briefly before the stack goes, and fully after.
func (g *Gateway) closeLocked() {
	if g.state == stateClosed {
		return
	}
	g.state = stateClosed
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
	if g.outs != nil {
		closeDialers(g.outs.all())
	}
	if g.mon != nil {
		g.mon.Close()
	}
	g.loop.Close()
	if g.api != nil {
		g.api.Close()
	}
}

// all returns every dialer of the set, the transport included.
func (s *outboundSet) all() []outbound.Dialer {
	out := []outbound.Dialer{s.transportDialer}
	for _, d := range s.dialers {
		out = append(out, d)
	}
	return out
}

// flowHandler hands the netstack's flows to the DNS proxy (hijacked port-53
// traffic) or to the relays (everything else).
type flowHandler struct{ g *Gateway }

func (h flowHandler) hijacked(dst netip.AddrPort) bool {
	return h.g.dns != nil && h.g.current.Load().routing.hijack.match(dst)
}

// HandleTCP implements netstack.Handler.
func (h flowHandler) HandleTCP(r *netstack.TCPRequest) {
	if h.hijacked(r.Dst()) {
		conn, err := r.Accept()
		if err != nil {
			return
		}
		h.g.dns.ServeTCP(conn)
		return
	}
	h.g.tcp.Handle(tcpFlow{r})
}

// HandleUDP implements netstack.Handler.
func (h flowHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) bool {
	if h.hijacked(dst) {
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
func (h flowHandler) FlushUDP() { h.g.udp.Flush() }

type tcpFlow struct{ *netstack.TCPRequest }

func (f tcpFlow) Accept() (forwarder.AppConn, error) {
	c, err := f.TCPRequest.Accept()
	if err != nil {
		return nil, err
	}
	return c, nil
}

// goMemory is the memory the Go runtime holds from the OS, for the API
// (runtime/metrics: no stop-the-world, unlike ReadMemStats).
func goMemory() uint64 {
	s := []metrics.Sample{{Name: "/memory/classes/total:bytes"}, {Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 || s[1].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64() - s[1].Value.Uint64()
}
