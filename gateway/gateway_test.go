package gateway

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/forwarder"
	"github.com/tungate/tungate/internal/leakcheck"
	"github.com/tungate/tungate/internal/testlog"
)

// loadConfig decodes and validates YAML as `tungate run --config` does.
func loadConfig(t testing.TB, body string) *configs.Config {
	t.Helper()
	cfg, err := loadYAML(t, body)
	if err != nil {
		t.Fatalf("config:\n%s\n%v", body, err)
	}
	return cfg
}

func loadYAML(t testing.TB, body string) (*configs.Config, error) {
	t.Helper()
	path := t.TempDir() + "/tungate.yaml"
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return configs.Load(path, nil)
}

// running returns a gateway for cfg with its routing step, outbounds and
// (with dns.enabled) DNS proxy built and marked running, but no TUN,
// stack or host changes: what Route and Reload need.
func running(t testing.TB, cfg *configs.Config, log *testlog.Buffer) *Gateway {
	t.Helper()
	var w io.Writer = io.Discard
	if log != nil {
		w = log
	}
	g, err := New(cfg, Deps{Log: slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if g.outs, _, err = buildOutbounds(cfg, nil, g.outboundDeps(cfg)); err != nil {
		t.Fatalf("buildOutbounds: %v", err)
	}
	r, err := newRouting(cfg)
	if err != nil {
		t.Fatalf("newRouting: %v", err)
	}
	g.current.Store(newTable(cfg, r, g.outs.dialers))
	if cfg.DNS.Enabled {
		g.dnsOut.set(g.outs.dialers[cfg.DNSOutbound()])
		if g.dns, _, err = newDNSProxy(cfg, &g.dnsOut, nil); err != nil {
			t.Fatalf("newDNSProxy: %v", err)
		}
		t.Cleanup(func() { g.dns.Close() })
	}
	g.state = stateRunning
	t.Cleanup(func() { closeDialers(g.outs.all()) })
	return g
}

// fakeAddr asks g's DNS proxy for name's A record, as an app would, and
// returns the (fake) address it answers.
func fakeAddr(t testing.TB, g *Gateway, name string) netip.Addr {
	t.Helper()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	wire, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	answered := make(chan []byte, 1)
	g.dns.HandleUDP(wire, func(a []byte) { answered <- bytes.Clone(a) })
	var m dns.Msg
	select {
	case a := <-answered:
		if err := m.Unpack(a); err != nil {
			t.Fatal(err)
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("no answer for %s", name)
	}
	for _, rr := range m.Answer {
		if a, ok := rr.(*dns.A); ok {
			addr, _ := netip.AddrFromSlice(a.A.To4())
			return addr
		}
	}
	t.Fatalf("no A record for %s: %v", name, m.String())
	return netip.Addr{}
}

const routingYAML = `
outbounds:
  - {name: direct, type: direct, fwmark: 0x2e7}
  - {name: proxy, type: socks5, address: "127.0.0.1:1080"}
  - {name: block, type: reject}
rules:
  - {domain_suffix: [example.org], outbound: proxy}
  - {ip_cidr: [10.1.0.0/16], port: [443], outbound: block}
  - {network: udp, port: ["5000-5999"], outbound: proxy}
  - {source_cidr: [172.19.0.0/30], ip_cidr: ["fd00:1::/32"], outbound: block}
dns:
  mode: fake-ip
  upstreams: ["udp://127.0.0.1:1"]
  hijack: ["any:53"]
route: {auto: false}
`

func TestRouteStep(t *testing.T) {
	cfg := loadConfig(t, routingYAML)
	g := running(t, cfg, nil)
	fake := fakeAddr(t, g, "www.example.org")
	app := netip.MustParseAddrPort("172.19.0.1:40000")
	for _, tc := range []struct {
		name        string
		meta        Meta
		dns         bool
		outbound    string
		rule        string
		domain, src string
	}{
		{"hijacked DNS to any address", Meta{Network: "udp", Src: app, Dst: netip.MustParseAddrPort("8.8.8.8:53")}, true, "", "", "", ""},
		{"hijacked DNS over TCP", Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("[2001:db8::1]:53")}, true, "", "", "", ""},
		{"fake-ip address: its name matches a domain rule", Meta{Network: "tcp", Src: app, Dst: netip.AddrPortFrom(fake, 443)}, false, "proxy", "rules[0]", "www.example.org", "fake-ip"},
		{"a name the caller gives", Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("192.0.2.1:80"), Domain: "a.example.org"}, false, "proxy", "rules[0]", "a.example.org", "given"},
		{"CIDR and port", Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("10.1.2.3:443")}, false, "block", "rules[1]", "", ""},
		{"CIDR, other port: final", Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("10.1.2.3:80")}, false, "direct", "final", "", ""},
		{"network and port range", Meta{Network: "udp", Src: app, Dst: netip.MustParseAddrPort("192.0.2.9:5353")}, false, "proxy", "rules[2]", "", ""},
		{"same port over TCP: final", Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("192.0.2.9:5353")}, false, "direct", "final", "", ""},
		{"source and IPv6 destination", Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("[fd00:1::5]:80")}, false, "block", "rules[3]", "", ""},
		{"IPv6 from another source: final", Meta{Network: "tcp", Src: netip.MustParseAddrPort("10.9.9.9:1"), Dst: netip.MustParseAddrPort("[fd00:1::5]:80")}, false, "direct", "final", "", ""},
	} {
		d := g.Route(tc.meta)
		if d.DNS != tc.dns || d.Outbound != tc.outbound || d.RuleName != tc.rule || d.Domain != tc.domain || d.DomainSource != tc.src {
			t.Errorf("%s: Route(%+v) = %+v; want dns %v, outbound %q by %q, domain %q from %q", tc.name, tc.meta, d, tc.dns, tc.outbound, tc.rule, tc.domain, tc.src)
		}
		if !tc.dns && (len(d.Chain) != 1 || d.Chain[0] != tc.outbound) {
			t.Errorf("%s: chain %v", tc.name, d.Chain)
		}
		if h := (flowHandler{g}).hijacked(tc.meta.Dst); h != tc.dns {
			t.Errorf("%s: the flow handler sends it to DNS: %v, want %v", tc.name, h, tc.dns)
		}
	}
}

// run and doctor --explain take the same routing step: for every
// destination the running gateway's decision (which learns a fake-ip
// address's name itself) is the one Explain prints (given the name, as
// `--explain` with a name would be, or only the address).
func TestRunAndExplainAgree(t *testing.T) {
	cfg := loadConfig(t, routingYAML)
	g := running(t, cfg, nil)
	fake := fakeAddr(t, g, "cdn.example.org")
	uid := uint32(1000)
	app := netip.MustParseAddrPort("172.19.0.1:40000")
	for _, tc := range []struct {
		run     Meta
		explain Meta
	}{
		{Meta{Network: "tcp", Src: app, Dst: netip.AddrPortFrom(fake, 443)}, Meta{Network: "tcp", Src: app, Dst: netip.AddrPortFrom(fake, 443), Domain: "cdn.example.org"}},
		{Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("10.1.0.1:443")}, Meta{}},
		{Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("10.1.0.1:444")}, Meta{}},
		{Meta{Network: "udp", Src: app, Dst: netip.MustParseAddrPort("10.1.0.1:5001")}, Meta{}},
		{Meta{Network: "udp", Src: app, Dst: netip.MustParseAddrPort("10.1.0.1:53")}, Meta{}},
		{Meta{Network: "tcp", Src: app, Dst: netip.MustParseAddrPort("[fd00:1::1]:22"), UID: &uid}, Meta{}},
	} {
		if tc.explain == (Meta{}) {
			tc.explain = tc.run
		}
		ran := g.Route(tc.run)
		e, err := Explain(cfg, tc.explain)
		if err != nil {
			t.Fatalf("Explain(%+v): %v", tc.explain, err)
		}
		x := e.Decision
		if ran.DNS != x.DNS || ran.Outbound != x.Outbound || ran.Rule != x.Rule || ran.Domain != x.Domain {
			t.Errorf("%s %s: run decided %+v, explain %+v", tc.run.Network, tc.run.Dst, ran, x)
		}
	}
	// Where the chosen outbound's socket goes: the proxy through the
	// transport (the first direct outbound's mark), the direct socket to
	// the destination itself, none for reject.
	for _, tc := range []struct {
		dst      string
		addr     string
		mark     uint32
		none     bool
		network  string
		protocol string
	}{
		{"10.7.0.1:80", "10.7.0.1:80", 0x2e7, false, "tcp", "tcp"},
		{"10.1.0.1:443", "", 0, true, "tcp", ""},
		{"10.7.0.1:5001", "127.0.0.1:1080", 0x2e7, false, "udp", ""},
	} {
		e, err := Explain(cfg, Meta{Network: tc.network, Src: app, Dst: netip.MustParseAddrPort(tc.dst)})
		if err != nil || !e.Known || e.Upstream.None != tc.none || e.Upstream.Addr != tc.addr || e.Socket.FWMark != tc.mark || e.Upstream.Network != tc.protocol {
			t.Errorf("Explain(%s/%s) = %+v, %v; want upstream %q (none %v, network %q) with mark %#x", tc.dst, tc.network, e, err, tc.addr, tc.none, tc.protocol, tc.mark)
		}
	}
}

// heldFlow is an app connection held at its SYN, for the relay: the app's
// side is a loopback socket pair.
type heldFlow struct {
	src, dst netip.AddrPort
	app      *net.TCPConn
	refused  chan struct{}
}

func (f *heldFlow) Src() netip.AddrPort { return f.src }
func (f *heldFlow) Dst() netip.AddrPort { return f.dst }
func (f *heldFlow) Accept() (forwarder.AppConn, error) {
	return abortable{f.app}, nil
}
func (f *heldFlow) Refuse() { close(f.refused); f.app.Close() }

type abortable struct{ *net.TCPConn }

func (c abortable) Abort() error {
	c.SetLinger(0)
	return c.Close()
}

// relayed is one flow through g's TCP relay to an upstream on loopback.
type relayed struct {
	client, upstream *net.TCPConn
}

// startRelayed has g relay a new flow to ln (loopback) and returns both
// ends once the upstream accepted it.
func startRelayed(t *testing.T, relay *forwarder.TCP, ln *net.TCPListener) relayed {
	t.Helper()
	pair, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pair.Close()
	client, err := net.DialTCP("tcp4", nil, pair.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	appSide, err := pair.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	f := &heldFlow{src: client.LocalAddr().(*net.TCPAddr).AddrPort(), dst: ln.Addr().(*net.TCPAddr).AddrPort(), app: appSide, refused: make(chan struct{})}
	go relay.Handle(f)
	ln.SetDeadline(time.Now().Add(3 * time.Second))
	up, err := ln.AcceptTCP()
	if err != nil {
		t.Fatalf("the upstream saw no connection: %v", err)
	}
	t.Cleanup(func() { up.Close() })
	return relayed{client: client, upstream: up}
}

func (r relayed) echoes(t *testing.T, what string) {
	t.Helper()
	r.client.SetDeadline(time.Now().Add(3 * time.Second))
	r.upstream.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := r.client.Write([]byte("ping")); err != nil {
		t.Fatalf("%s: write: %v", what, err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(r.upstream, got); err != nil || string(got) != "ping" {
		t.Fatalf("%s: the upstream read %q, %v", what, got, err)
	}
}

func (r relayed) reset(t *testing.T, what string) {
	t.Helper()
	r.client.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err := io.Copy(io.Discard, r.client)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("%s: the app's read ended with %v, want a reset", what, err)
	}
}

// reloadBase ends with the rules, so that a test can append one.
const reloadBase = `
dns: {enabled: false}
route: {auto: false}
outbounds:
  - {name: direct, type: direct, fwmark: 0x2e7, interface: lo}
  - {name: second, type: direct, fwmark: 0x2e7, interface: lo}
  - {name: block, type: reject}
rules:
  - {port: [%d], outbound: second}
`

func TestReload(t *testing.T) {
	leakcheck.Check(t)
	ln1, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln1.Close()
	ln2, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln2.Close()
	port2 := ln2.Addr().(*net.TCPAddr).Port
	yaml := func(extra string) string { return strings.Replace(reloadBase, "%d", strconv.Itoa(port2), 1) + extra }

	var log testlog.Buffer
	cfg := loadConfig(t, yaml(""))
	g := running(t, cfg, &log)
	relay, err := forwarder.NewTCP(forwarder.TCPConfig{DialTimeout: 2 * time.Second, Tracker: g.tracker}, g.routeFlow, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	viaDirect := startRelayed(t, relay, ln1)
	viaSecond := startRelayed(t, relay, ln2)
	viaDirect.echoes(t, "before any reload, via direct")
	viaSecond.echoes(t, "before any reload, via second")
	snap := g.tracker.Snapshot()
	byOutbound := map[string]forwarder.ConnInfo{}
	for _, c := range snap {
		byOutbound[c.Outbound] = c
	}
	if len(snap) != 2 || byOutbound["second"].Rule != "rules[0]" || byOutbound["direct"].Rule != "final" {
		t.Fatalf("tracker before reload: %+v", snap)
	}
	directBefore := g.current.Load().outbounds["direct"]

	// Valid: a new rule, outbounds unchanged: every flow keeps going and
	// the new rule routes new flows.
	reload := func(body string) error {
		return g.Reload(func() (*configs.Config, error) { return loadYAML(t, body) })
	}
	if err := reload(yaml("  - {ip_cidr: [192.0.2.0/24], outbound: block}\n")); err != nil {
		t.Fatalf("Reload(valid): %v", err)
	}
	if d := g.Route(Meta{Network: "tcp", Dst: netip.MustParseAddrPort("192.0.2.1:80")}); d.Outbound != "block" {
		t.Errorf("after adding a rule: %+v, want block", d)
	}
	if g.current.Load().outbounds["direct"] != directBefore {
		t.Error("an unchanged outbound was rebuilt")
	}
	viaDirect.echoes(t, "after a rule reload, via direct")
	viaSecond.echoes(t, "after a rule reload, via second")
	if !strings.Contains(log.String(), `msg="config reloaded"`) {
		t.Errorf("no reload line:\n%s", log.String())
	}

	// Invalid: every error logged with its key, nothing changes.
	bad := "stack: {tcp: {dial_timeout: abc}}\nbogus: 1\n" + yaml("  - {ip_cidr: [10.0.0.0/33], outbound: nosuch}\n")
	if err := reload(bad); err == nil {
		t.Fatal("Reload(invalid) = nil")
	}
	for _, key := range []string{"rules[1].ip_cidr[0]", "stack.tcp.dial_timeout", "bogus"} {
		if !strings.Contains(log.String(), `msg="reload refused" error="`+key+":") {
			t.Errorf("the refusal does not name %s:\n%s", key, log.String())
		}
	}
	if d := g.Route(Meta{Network: "tcp", Dst: netip.MustParseAddrPort("192.0.2.1:80")}); d.Outbound != "block" {
		t.Errorf("after a refused reload: %+v, want the running rules", d)
	}
	viaSecond.echoes(t, "after a refused reload")

	// A key that needs a restart is named and not applied.
	if err := reload("tun: {mtu: 1500}\n" + yaml("")); err != nil {
		t.Fatalf("Reload(tun.mtu): %v", err)
	}
	if !strings.Contains(log.String(), `msg="reload: restart needed" key=tun.mtu`) || g.cfg.Tun.MTU != 9000 {
		t.Errorf("tun.mtu: restart not asked for, or applied (mtu %d):\n%s", g.cfg.Tun.MTU, log.String())
	}

	// An outbound removed: its flows are reset, the others keep going.
	without := strings.Replace(yaml(""), "  - {name: second, type: direct, fwmark: 0x2e7, interface: lo}\n", "", 1)
	without = strings.Replace(without, "outbound: second", "outbound: direct", 1)
	if err := reload(without); err != nil {
		t.Fatalf("Reload(second removed): %v", err)
	}
	viaSecond.reset(t, "the flow of the removed outbound")
	viaDirect.echoes(t, "a flow of a kept outbound")
	waitFor(t, "the removed outbound's flow untracked", func() bool { return g.tracker.Len() == 1 })
	if snap := g.tracker.Snapshot(); len(snap) != 1 || snap[0].Outbound != "direct" {
		t.Errorf("tracker after removal: %+v", snap)
	}
	again := startRelayed(t, relay, ln2)
	again.echoes(t, "a new flow to second's port, now via direct")

	// An outbound changed (another interface binding): reset too.
	changed := strings.Replace(without, "{name: direct, type: direct, fwmark: 0x2e7, interface: lo}", "{name: direct, type: direct, fwmark: 0x2e8, interface: lo}", 1)
	if err := reload(changed); err != nil {
		t.Fatalf("Reload(direct changed): %v", err)
	}
	viaDirect.reset(t, "the flow of the changed outbound")
	again.reset(t, "the other flow of the changed outbound")
	waitFor(t, "no flow tracked after every outbound changed", func() bool { return g.tracker.Len() == 0 })
	relay.Close()
	closeDialers(g.outs.all())
}

// The lifecycle: Start only once, Close idempotent, a failed Start leaves
// a closed gateway behind.
func TestLifecycle(t *testing.T) {
	leakcheck.Check(t)
	// A TUN fd that is not open: Start fails after building the outbounds
	// and the loop guard, and must take them down again.
	cfg := loadConfig(t, `
tun: {fd: 987654}
outbounds: [{name: d, type: direct, interface: lo}]
dns: {enabled: false}
route: {auto: false, journal: ""}
`)
	g, err := New(cfg, Deps{})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Start(); err == nil {
		t.Fatal("Start with a TUN fd that is not open succeeded")
	}
	if g.state != stateClosed {
		t.Errorf("after a failed Start: state %d, want closed", g.state)
	}
	g.Close()
	g.Close()
	if err := g.Start(); err == nil {
		t.Error("Start after Close succeeded")
	}
	if err := g.Reload(func() (*configs.Config, error) { return cfg, nil }); err == nil {
		t.Error("Reload of a closed gateway succeeded")
	}
	if _, err := New(nil, Deps{}); err == nil {
		t.Error("New(nil) succeeded")
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(3 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
