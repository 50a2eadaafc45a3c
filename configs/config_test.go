package configs

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/tungate/tungate/outbound/direct"
	"github.com/tungate/tungate/outbound/httpconnect"
	"github.com/tungate/tungate/outbound/reject"
	"github.com/tungate/tungate/outbound/socks5"
)

// writeConfig writes body to a file in a fresh temporary directory and
// returns its path.
func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tungate.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// mustLoad loads body and fails the test, naming the input, if it does not
// load.
func mustLoad(t *testing.T, body string) *Config {
	t.Helper()
	cfg, err := Load(writeConfig(t, body), nil)
	if err != nil {
		t.Fatalf("Load(%q): %v", body, err)
	}
	return cfg
}

// loadProblems loads body and returns the FieldErrors it produced, failing
// the test if Load did not return a *ValidationError.
func loadProblems(t *testing.T, body string) []FieldError {
	t.Helper()
	_, err := Load(writeConfig(t, body), nil)
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("Load(%q) = %v, want a *ValidationError", body, err)
	}
	return ve.Errors
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

func TestDefault(t *testing.T) {
	cfg := Default()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
	checks := []struct {
		key       string
		got, want any
	}{
		{"log.level", cfg.Log.Level, "info"},
		{"log.format", cfg.Log.Format, "text"},
		{"tun.name", cfg.Tun.Name, "tungate0"},
		{"tun.mtu", cfg.Tun.MTU, 9000},
		{"tun.address", cfg.Tun.Address, prefixes("172.19.0.1/30", "fdfe:dcba:9876::1/126")},
		{"tun.offload", cfg.Tun.Offload, "auto"},
		{"tun.fd", cfg.Tun.FD, 0},
		{"stack.tcp.max_in_flight", cfg.Stack.TCP.MaxInFlight, 4096},
		{"stack.tcp.dial_timeout", cfg.Stack.TCP.DialTimeout, 10 * time.Second},
		{"stack.tcp.keepalive", cfg.Stack.TCP.Keepalive, 60 * time.Second},
		{"stack.tcp.idle_timeout", cfg.Stack.TCP.IdleTimeout, time.Duration(0)},
		{"stack.udp.idle_timeout", cfg.Stack.UDP.IdleTimeout, 5 * time.Minute},
		{"stack.udp.dns_idle_timeout", cfg.Stack.UDP.DNSIdleTimeout, 10 * time.Second},
		{"stack.udp.max_sessions", cfg.Stack.UDP.MaxSessions, 65536},
		{"stack.udp.nat", cfg.Stack.UDP.NAT, "full-cone"},
		{"outbounds", cfg.Outbounds, []Outbound{{Name: "direct", Type: "direct", Settings: &direct.Config{FWMark: 0x2e7}}}},
		{"len(rules)", len(cfg.Rules), 0},
		{"final", cfg.Final, ""},
		{"FinalOutbound()", cfg.FinalOutbound(), "direct"},
		{"dns.enabled", cfg.DNS.Enabled, true},
		{"dns.hijack", cfg.DNS.Hijack, []string{"any:53"}},
		{"dns.listen", cfg.DNS.Listen, netip.MustParseAddr("172.19.0.2")},
		{"dns.mode", cfg.DNS.Mode, "real"},
		{"dns.fake_ip.range4", cfg.DNS.FakeIP.Range4, netip.MustParsePrefix("198.18.0.0/15")},
		{"dns.fake_ip.range6", cfg.DNS.FakeIP.Range6, netip.MustParsePrefix("fc00::/18")},
		{"dns.fake_ip.ttl", cfg.DNS.FakeIP.TTL, time.Second},
		{"dns.fake_ip.store", cfg.DNS.FakeIP.Store, ""},
		{"dns.fake_ip.exclude", cfg.DNS.FakeIP.Exclude, []string{"*.lan", "*.local"}},
		{"len(dns.upstreams)", len(cfg.DNS.Upstreams), 0},
		{"dns.outbound", cfg.DNS.Outbound, ""},
		{"DNSOutbound()", cfg.DNSOutbound(), "direct"},
		{"dns.cache.size", cfg.DNS.Cache.Size, 4096},
		{"route.auto", cfg.Route.Auto, true},
		{"route.table", cfg.Route.Table, 2022},
		{"route.priority", cfg.Route.Priority, 9000},
		{"len(route.include_uids)", len(cfg.Route.IncludeUIDs), 0},
		{"len(route.exclude_addresses)", len(cfg.Route.ExcludeAddresses), 0},
		{"route.strict", cfg.Route.Strict, false},
		{"route.set_system_dns", cfg.Route.SetSystemDNS, false},
		{"route.journal", cfg.Route.Journal, "/run/tungate/route.journal"},
		{"api.listen", cfg.API.Listen, ""},
		{"api.secret", cfg.API.Secret, ""},
		{"len(api.cors)", len(cfg.API.CORS), 0},
		{"api.ui", cfg.API.UI, ""},
		{"api.pprof", cfg.API.PProf, false},
		{"log.flows", cfg.Log.Flows, false},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("Default() %s = %v, want %v", c.key, c.got, c.want)
		}
	}
}

func TestDefaultIgnoresEnvironmentAndIsACopy(t *testing.T) {
	t.Setenv("TUNGATE_LOG_LEVEL", "debug")
	a := Default()
	if a.Log.Level != "info" {
		t.Errorf("Default() with TUNGATE_LOG_LEVEL=debug: log.level = %q, want the file's %q", a.Log.Level, "info")
	}
	a.Outbounds[0].Name = "changed"
	a.DNS.Hijack[0] = "changed"
	if b := Default(); b.Outbounds[0].Name != "direct" || b.DNS.Hijack[0] != "any:53" {
		t.Errorf("Default() after modifying an earlier result = %+v, want a fresh copy", b)
	}
	y := DefaultYAML()
	y[0] = '!'
	if DefaultYAML()[0] == '!' {
		t.Error("DefaultYAML() returned the embedded bytes themselves; modifying them changed the default")
	}
}

// TestDefaultYAMLRoundTrip proves that the bytes DefaultYAML hands out
// (which `tungate` can print for a user to edit) load back to Default().
func TestDefaultYAMLRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		path string
	}{
		{"DefaultYAML written to a file", writeConfig(t, string(DefaultYAML()))},
		{"empty path", ""},
		{"empty file", writeConfig(t, "")},
		{"examples/system-wide.yaml", filepath.Join("examples", "system-wide.yaml")},
	} {
		got, err := Load(tc.path, nil)
		if err != nil {
			t.Errorf("Load(%s): %v", tc.name, err)
			continue
		}
		if want := Default(); !reflect.DeepEqual(got, want) {
			t.Errorf("Load(%s) =\n%+v\nwant Default() =\n%+v", tc.name, got, want)
		}
	}
}

// TestDefaultYAMLHasEveryKey proves that every section key has its default
// in the file: a key missing there would have no default and could not be
// set from the environment (viper only maps variables to keys it knows).
func TestDefaultYAMLHasEveryKey(t *testing.T) {
	v := viper.New()
	v.SetConfigType("yaml")
	if err := v.ReadConfig(strings.NewReader(string(DefaultYAML()))); err != nil {
		t.Fatal(err)
	}
	inFile := v.AllKeys()
	sort.Strings(inFile)

	var schema []string
	var walk func(prefix string, typ reflect.Type)
	walk = func(prefix string, typ reflect.Type) {
		for i := range typ.NumField() {
			key := joinKey(prefix, typ.Field(i).Tag.Get("mapstructure"))
			if ft := typ.Field(i).Type; isSection(ft) {
				walk(key, ft)
			} else {
				schema = append(schema, key)
			}
		}
	}
	walk("", reflect.TypeFor[Config]())
	sort.Strings(schema)

	if !slices.Equal(inFile, schema) {
		t.Errorf("default.yaml keys =\n%v\nschema keys =\n%v", inFile, schema)
	}
}

// TestLoadConfigMDExample loads the example block of CONFIG.md, copied
// verbatim into testdata, and spot-checks every section.
func TestLoadConfigMDExample(t *testing.T) {
	const path = "testdata/config-md-example.yaml"
	cfg, err := Load(path, nil)
	if err != nil {
		t.Fatalf("Load(%s): %v", path, err)
	}
	wantOutbounds := []Outbound{
		{Name: "direct", Type: "direct", Settings: &direct.Config{FWMark: 743}},
		{Name: "proxy", Type: "socks5", Settings: &socks5.Config{Address: "10.233.0.2:1080", UDP: true}},
		{Name: "web", Type: "http", Settings: &httpconnect.Config{Address: "10.233.0.2:8888"}},
		{Name: "block", Type: "reject", Settings: &reject.Config{}},
	}
	wantRules := []Rule{
		{DomainSuffix: []string{"example.org"}, Outbound: "proxy"},
		{
			IPCIDR:   prefixes("10.233.1.0/24"),
			Port:     []PortRange{{80, 80}, {443, 443}},
			Network:  "tcp",
			Outbound: "direct",
		},
	}
	checks := []struct {
		key       string
		got, want any
	}{
		{"log.level", cfg.Log.Level, "info"},
		{"tun.address", cfg.Tun.Address, prefixes("172.19.0.1/30", "fdfe:dcba:9876::1/126")},
		{"tun.mtu", cfg.Tun.MTU, 9000},
		{"stack.tcp.dial_timeout", cfg.Stack.TCP.DialTimeout, 10 * time.Second},
		{"stack.tcp.idle_timeout", cfg.Stack.TCP.IdleTimeout, time.Duration(0)},
		{"stack.udp.idle_timeout", cfg.Stack.UDP.IdleTimeout, 5 * time.Minute},
		{"stack.udp.nat", cfg.Stack.UDP.NAT, "full-cone"},
		{"outbounds", cfg.Outbounds, wantOutbounds},
		{"rules", cfg.Rules, wantRules},
		{"final", cfg.Final, "direct"},
		{"dns.mode", cfg.DNS.Mode, "fake-ip"},
		{"dns.listen", cfg.DNS.Listen, netip.MustParseAddr("172.19.0.2")},
		{"dns.fake_ip.range6", cfg.DNS.FakeIP.Range6, netip.MustParsePrefix("fc00::/18")},
		{"dns.fake_ip.ttl", cfg.DNS.FakeIP.TTL, time.Second},
		{"dns.upstreams", cfg.DNS.Upstreams, []string{"udp://10.233.0.2:53"}},
		{"dns.outbound", cfg.DNS.Outbound, "direct"},
		{"dns.cache.size", cfg.DNS.Cache.Size, 4096},
		{"route.auto", cfg.Route.Auto, false},
		{"route.table", cfg.Route.Table, 2022},
		{"route.priority", cfg.Route.Priority, 9000},
		{"api.listen", cfg.API.Listen, ""},
		{"len(api.cors)", len(cfg.API.CORS), 0},
		{"api.ui", cfg.API.UI, ""},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("Load(%s) %s = %+v, want %+v", path, c.key, c.got, c.want)
		}
	}
}

func TestPartialFileKeepsOtherDefaults(t *testing.T) {
	const body = "log: {level: debug}\nstack:\n  udp:\n    nat: symmetric\n"
	cfg := mustLoad(t, body)
	want := Default()
	want.Log.Level = "debug"
	want.Stack.UDP.NAT = "symmetric"
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("Load(%q) =\n%+v\nwant the default with two keys changed =\n%+v", body, cfg, want)
	}
}

func TestEmptySectionsKeepDefaults(t *testing.T) {
	const body = "log:\ndns:\n  fake_ip:\n"
	if cfg := mustLoad(t, body); !reflect.DeepEqual(cfg, Default()) {
		t.Errorf("Load(%q) = %+v, want Default()", body, cfg)
	}
}

func TestEnvironmentOverrides(t *testing.T) {
	tests := []struct {
		env, value string
		check      func(*Config) any
		want       any
	}{
		{"TUNGATE_LOG_LEVEL", "debug", func(c *Config) any { return c.Log.Level }, "debug"},
		{"TUNGATE_STACK_TCP_DIAL_TIMEOUT", "3s", func(c *Config) any { return c.Stack.TCP.DialTimeout }, 3 * time.Second},
		{"TUNGATE_TUN_MTU", "1500", func(c *Config) any { return c.Tun.MTU }, 1500},
		{"TUNGATE_DNS_FAKE_IP_RANGE4", "100.64.0.0/10", func(c *Config) any { return c.DNS.FakeIP.Range4 }, netip.MustParsePrefix("100.64.0.0/10")},
		{"TUNGATE_ROUTE_AUTO", "false", func(c *Config) any { return c.Route.Auto }, false},
		{"TUNGATE_TUN_ADDRESS", "10.0.0.1/30, fd00::1/126", func(c *Config) any { return c.Tun.Address }, prefixes("10.0.0.1/30", "fd00::1/126")},
		{"TUNGATE_ROUTE_INCLUDE_UIDS", "1000,2000-2999", func(c *Config) any { return c.Route.IncludeUIDs }, []UIDRange{{1000, 1000}, {2000, 2999}}},
		{"TUNGATE_ROUTE_JOURNAL", "/tmp/tg/route.journal", func(c *Config) any { return c.Route.Journal }, "/tmp/tg/route.journal"},
		{"TUNGATE_API_CORS", "http://127.0.0.1:8080, https://dash.example", func(c *Config) any { return c.API.CORS }, []string{"http://127.0.0.1:8080", "https://dash.example"}},
		{"TUNGATE_API_PPROF", "true", func(c *Config) any { return c.API.PProf }, true},
		{"TUNGATE_LOG_FLOWS", "true", func(c *Config) any { return c.Log.Flows }, true},
	}
	for _, tc := range tests {
		t.Run(tc.env, func(t *testing.T) {
			t.Setenv(tc.env, tc.value)
			// The file sets the key too: the environment must win over it.
			cfg, err := Load(writeConfig(t, "log: {level: warn}\ntun: {mtu: 1400}\n"), nil)
			if err != nil {
				t.Fatalf("Load with %s=%q: %v", tc.env, tc.value, err)
			}
			if got := tc.check(cfg); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Load with %s=%q: got %v, want %v", tc.env, tc.value, got, tc.want)
			}
		})
	}
}

func TestEnvironmentValueIsValidated(t *testing.T) {
	t.Setenv("TUNGATE_STACK_TCP_DIAL_TIMEOUT", "soon")
	_, err := Load("", nil)
	var ve *ValidationError
	if !errors.As(err, &ve) || len(ve.Errors) != 1 || ve.Errors[0].Key != "stack.tcp.dial_timeout" {
		t.Fatalf("Load with TUNGATE_STACK_TCP_DIAL_TIMEOUT=soon = %v, want one error for stack.tcp.dial_timeout", err)
	}
	if !strings.Contains(ve.Errors[0].Msg, "from the environment variable TUNGATE_STACK_TCP_DIAL_TIMEOUT") {
		t.Errorf("the error does not name the variable it came from: %v", err)
	}
}

func TestFlagOverrides(t *testing.T) {
	file := writeConfig(t, "log: {level: warn, format: json}\n")
	tests := []struct {
		args       []string
		env        string // TUNGATE_LOG_LEVEL, if set
		wantLevel  string
		wantFormat string
	}{
		{nil, "", "warn", "json"}, // flags not given: the file's values stay
		{[]string{"--log-level=debug"}, "", "debug", "json"},
		{[]string{"--log-format", "text"}, "", "warn", "text"},
		{[]string{"--log-level=error"}, "info", "error", "json"}, // flag beats environment
		{nil, "info", "info", "json"},                            // environment beats file
	}
	for _, tc := range tests {
		fs := pflag.NewFlagSet("tungate", pflag.ContinueOnError)
		BindFlags(fs)
		BindFlags(fs) // twice must not panic on redefinition
		if err := fs.Parse(tc.args); err != nil {
			t.Fatalf("Parse(%q): %v", tc.args, err)
		}
		t.Setenv("TUNGATE_LOG_LEVEL", tc.env) // viper treats an empty variable as unset
		cfg, err := Load(file, fs)
		if err != nil {
			t.Fatalf("Load with args %q, TUNGATE_LOG_LEVEL=%q: %v", tc.args, tc.env, err)
		}
		if cfg.Log.Level != tc.wantLevel || cfg.Log.Format != tc.wantFormat {
			t.Errorf("Load with args %q, TUNGATE_LOG_LEVEL=%q: log = %+v, want level %q format %q",
				tc.args, tc.env, cfg.Log, tc.wantLevel, tc.wantFormat)
		}
	}
}

func TestFlagValueIsValidated(t *testing.T) {
	fs := pflag.NewFlagSet("tungate", pflag.ContinueOnError)
	BindFlags(fs)
	if err := fs.Parse([]string{"--log-level=loud"}); err != nil {
		t.Fatal(err)
	}
	_, err := Load("", fs)
	if err == nil || !strings.Contains(err.Error(), `log.level: invalid value "loud"`) {
		t.Errorf("Load with --log-level=loud = %v, want an error naming log.level", err)
	}
}

func TestOutboundEntryDefaults(t *testing.T) {
	tests := []struct {
		entry string
		want  Outbound
	}{
		{"{name: d, type: direct}", Outbound{Name: "d", Type: "direct", Settings: &direct.Config{FWMark: 0x2e7}}},
		{"{name: d, type: direct, fwmark: 0}", Outbound{Name: "d", Type: "direct", Settings: &direct.Config{}}},
		{"{name: d, type: direct, fwmark: null}", Outbound{Name: "d", Type: "direct", Settings: &direct.Config{FWMark: 0x2e7}}},
		{"{name: d, type: direct, fwmark: 100}", Outbound{Name: "d", Type: "direct", Settings: &direct.Config{FWMark: 100}}},
		{"{name: d, type: direct, fwmark: 0x10}", Outbound{Name: "d", Type: "direct", Settings: &direct.Config{FWMark: 16}}},
		{`{name: d, type: direct, fwmark: "0x2e7"}`, Outbound{Name: "d", Type: "direct", Settings: &direct.Config{FWMark: 743}}},
		{"{name: d, type: direct, fwmark: 0xffffffff}", Outbound{Name: "d", Type: "direct", Settings: &direct.Config{FWMark: 1<<32 - 1}}},
		{"{name: d, type: direct, interface: eth0}", Outbound{Name: "d", Type: "direct", Settings: &direct.Config{Interface: "eth0", FWMark: 0x2e7}}},
		{"{name: s, type: socks5, address: '192.0.2.1:1080'}", Outbound{Name: "s", Type: "socks5", Settings: &socks5.Config{Address: "192.0.2.1:1080", UDP: true}}},
		{"{name: s, type: socks5, address: '192.0.2.1:1080', udp: false}", Outbound{Name: "s", Type: "socks5", Settings: &socks5.Config{Address: "192.0.2.1:1080"}}},
		{"{name: s, type: socks5, address: '192.0.2.1:1080', username: u, password: 1234}",
			Outbound{Name: "s", Type: "socks5", Settings: &socks5.Config{Address: "192.0.2.1:1080", Username: "u", Password: "1234", UDP: true}}},
		{"{name: w, type: http, address: '192.0.2.1:8080'}", Outbound{Name: "w", Type: "http", Settings: &httpconnect.Config{Address: "192.0.2.1:8080"}}},
		{"{name: r, type: reject}", Outbound{Name: "r", Type: "reject", Settings: &reject.Config{}}},
	}
	for _, tc := range tests {
		body := "outbounds: [" + tc.entry + "]\n"
		cfg := mustLoad(t, body)
		if len(cfg.Outbounds) != 1 || !reflect.DeepEqual(cfg.Outbounds[0], tc.want) {
			t.Errorf("Load(%q) outbounds = %+v, want [%+v]", body, cfg.Outbounds, tc.want)
		}
	}
}

func TestRuleValueForms(t *testing.T) {
	const body = `
outbounds: [{name: direct, type: direct}]
rules:
  - port: [80, "443", "8000-8999", " 10 - 20 "]
    ip_cidr: ["10.0.0.0/8", "fd00::/8"]
    outbound: direct
  - port: 53
    outbound: direct
route:
  include_uids: [0, "1000", "2000-2999"]
`
	cfg := mustLoad(t, body)
	r := cfg.Rules[0]
	if want := []PortRange{{80, 80}, {443, 443}, {8000, 8999}, {10, 20}}; !slices.Equal(r.Port, want) {
		t.Errorf("rules[0].port = %v, want %v", r.Port, want)
	}
	if want := []UIDRange{{0, 0}, {1000, 1000}, {2000, 2999}}; !slices.Equal(cfg.Route.IncludeUIDs, want) {
		t.Errorf("route.include_uids = %v, want %v", cfg.Route.IncludeUIDs, want)
	}
	if want := prefixes("10.0.0.0/8", "fd00::/8"); !slices.Equal(r.IPCIDR, want) {
		t.Errorf("rules[0].ip_cidr = %v, want %v", r.IPCIDR, want)
	}
	if want := []PortRange{{53, 53}}; !slices.Equal(cfg.Rules[1].Port, want) {
		t.Errorf("rules[1].port (a single value, not a list) = %v, want %v", cfg.Rules[1].Port, want)
	}
	if !r.Port[2].Contains(8500) || r.Port[2].Contains(9000) || r.Port[2].String() != "8000-8999" {
		t.Errorf("PortRange %v: Contains/String disagree with the range", r.Port[2])
	}
}

// TestLoadReportsProblems checks that each bad input is reported with its
// full key and a message that says what is wrong.
func TestLoadReportsProblems(t *testing.T) {
	const outbounds = "outbounds: [{name: direct, type: direct}, {name: proxy, type: socks5, address: '192.0.2.1:1080'}]\n"
	tests := []struct {
		name, body string
		key, msg   string // the one expected problem; msg is a substring
	}{
		{"misspelt key", "dns: {mod: fake-ip}", "dns.mod", `unknown key (did you mean "mode"?)`},
		{"unknown top-level key", "finall: direct", "finall", `did you mean "final"?`},
		{"unknown key, nothing close", "tun: {colour: blue}", "tun.colour", "unknown key"},
		{"unknown key in outbound", "outbounds: [{name: d, type: direct, fwmrk: 1}]", "outbounds[0].fwmrk", `did you mean "fwmark"?`},
		{"unknown key in rule", outbounds + "rules: [{ipcidr: [10.0.0.0/8], outbound: direct}]", "rules[0].ipcidr", `did you mean "ip_cidr"?`},
		{"key of another kind", "outbounds: [{name: r, type: reject, address: 'x:1'}]", "outbounds[0].address", "unknown key"},
		{"bad value of a kind's key", "outbounds: [{name: d, type: direct, fwmark: yes}]", "outbounds[0].fwmark", ""},
		{"bad proxy address", "outbounds: [{name: p, type: socks5, address: nohost}]", "outbounds[0].address", "needs host:port"},
		{"wireguard not built", "outbounds: [{name: w, type: wireguard}]", "outbounds[0].type", "not built yet"},
		// What run would refuse, check refuses (issue 10's check = run).
		{"uid rule condition", outbounds + "rules: [{uid: [1000], outbound: direct}]", "rules[0].uid", "not supported yet"},
		{"cgroup rule condition", outbounds + "rules: [{cgroup: [a.slice], outbound: direct}]", "rules[0].cgroup", "not supported yet"},
		{"route table beyond 32 bits", "route: {table: 4294967297}", "route.table", "outside 1-4294967295"},
		{"zero udp idle timeout", "stack: {udp: {idle_timeout: 0s}}", "stack.udp.idle_timeout", "greater than 0"},
		{"zero dns idle timeout", "stack: {udp: {dns_idle_timeout: 0s}}", "stack.udp.dns_idle_timeout", "greater than 0"},
		{"zero dial timeout", "stack: {tcp: {dial_timeout: 0s}}", "stack.tcp.dial_timeout", "greater than 0"},
		{"tun name too long", "tun: {name: abcdefghijklmnop}", "tun.name", "at most 15"},
		{"proxy given by name", "outbounds: [{name: p, type: socks5, address: 'proxy.example:1080'}]", "outbounds[0].address", "must be an IP address"},
		{"socks5 username over RFC 1929", "outbounds: [{name: p, type: socks5, address: '192.0.2.1:1080', username: '" + strings.Repeat("u", 256) + "'}]", "outbounds[0].username", "RFC 1929 allows 255"},
		{"http username with a colon", "outbounds: [{name: p, type: http, address: '192.0.2.1:8080', username: 'a:b'}]", "outbounds[0].username", "Basic authentication cannot carry"},
		{"direct interface name too long", "outbounds: [{name: d, type: direct, interface: abcdefghijklmnop}]", "outbounds[0].interface", "at most 15"},
		{"fake-ip store in a missing directory", "dns: {mode: fake-ip, fake_ip: {store: /nonexistent/dir/fakeip}}", "dns.fake_ip.store", "does not exist"},
		{"unknown kind", "outbounds: [{name: w, type: vmess}]", "outbounds[0].type", `want "direct", "http", "reject" or "socks5"`},
		{"unknown nested key", "dns: {fake_ip: {range: 10.0.0.0/8}}", "dns.fake_ip.range", "unknown key"},
		{"bad CIDR in rule", outbounds + "rules: [{ip_cidr: [10.0.0.0/33], outbound: direct}]", "rules[0].ip_cidr[0]", `invalid CIDR "10.0.0.0/33"`},
		{"bad CIDR second entry", outbounds + "rules: [{ip_cidr: [10.0.0.0/8, nonsense], outbound: direct}]", "rules[0].ip_cidr[1]", `invalid CIDR "nonsense"`},
		{"bad tun address", "tun: {address: [172.19.0.1]}", "tun.address[0]", `invalid CIDR "172.19.0.1"`},
		{"bad duration", "stack: {tcp: {dial_timeout: 10 seconds}}", "stack.tcp.dial_timeout", `invalid duration "10 seconds"`},
		{"duration without unit", "stack: {udp: {idle_timeout: 300}}", "stack.udp.idle_timeout", "has no unit"},
		{"negative duration", "dns: {fake_ip: {ttl: -1s}}", "dns.fake_ip.ttl", "must not be negative"},
		{"bad port range", outbounds + "rules: [{port: [8000-], outbound: direct}]", "rules[0].port[0]", "invalid port range"},
		{"reversed port range", outbounds + "rules: [{port: [9000-8000], outbound: direct}]", "rules[0].port[0]", "starts after it ends"},
		{"port 0", outbounds + "rules: [{port: [0], outbound: direct}]", "rules[0].port[0]", "outside 1-65535"},
		{"bad uid range", "route: {include_uids: [abc]}", "route.include_uids[0]", "invalid uid range"},
		{"wrong type: list for int", "tun: {mtu: [1500]}", "tun.mtu", "expected a number, got a list"},
		{"wrong type: bool for int", "tun: {mtu: true}", "tun.mtu", "expected a number"},
		{"wrong type: string for bool", "dns: {enabled: maybe}", "dns.enabled", `invalid boolean "maybe"`},
		{"wrong type: scalar for section", "dns: fake-ip", "dns", "expected a map of keys"},
		{"wrong type: map for string", "final: {name: direct}", "final", "expected a string, got a map"},
		{"fwmark too large", "outbounds: [{name: d, type: direct, fwmark: 0x100000000}]", "outbounds[0].fwmark", "out of range (0 to 4294967295)"},
		{"wrong type: map for list", outbounds + "rules: [{port: {from: 1}, outbound: direct}]", "rules[0].port", "expected a list, got a map"},
		{"fwmark negative", "outbounds: [{name: d, type: direct, fwmark: -1}]", "outbounds[0].fwmark", "negative"},
		{"bad log level", "log: {level: verbose}", "log.level", `invalid value "verbose"`},
		{"bad log format", "log: {format: xml}", "log.format", `invalid value "xml"`},
		{"bad offload", "tun: {offload: on}", "tun.offload", `invalid value "on"`},
		{"bad nat", "stack: {udp: {nat: cone}}", "stack.udp.nat", `invalid value "cone"`},
		{"bad dns mode", "dns: {mode: fakeip}", "dns.mode", `invalid value "fakeip"`},
		{"bad network", outbounds + "rules: [{network: sctp, outbound: direct}]", "rules[0].network", `invalid value "sctp"`},
		{"bad outbound type", "outbounds: [{name: x, type: vmess}]", "outbounds[0].type", `invalid value "vmess"`},
		{"missing outbound type", "outbounds: [{name: x}]", "outbounds[0].type", "must be set"},
		{"mtu too small", "tun: {mtu: 500}", "tun.mtu", "outside 576-65535"},
		{"mtu too small for IPv6", "tun: {mtu: 1000}", "tun.mtu", "below 1280"},
		{"no tun address", "tun: {address: []}", "tun.address", "at least one"},
		{"negative fd", "tun: {fd: -1}", "tun.fd", "must not be negative"},
		{"no outbounds", "outbounds: []", "outbounds", "at least one"},
		{"empty outbound name", "outbounds: [{type: direct}]", "outbounds[0].name", "must not be empty"},
		{"duplicate outbound names", "outbounds: [{name: a, type: direct}, {name: a, type: reject}]", "outbounds[1].name", `duplicate outbound name "a"`},
		{"socks5 without address", "outbounds: [{name: s, type: socks5}]", "outbounds[0].address", "socks5 outbound needs host:port"},
		{"http bad port", "outbounds: [{name: w, type: http, address: 'h:99999'}]", "outbounds[0].address", "invalid port"},
		{"unknown outbound in rule", outbounds + "rules: [{domain: [a.com], outbound: prxy}]", "rules[0].outbound", `unknown outbound "prxy"`},
		{"rule without outbound", outbounds + "rules: [{domain: [a.com]}]", "rules[0].outbound", "must name an outbound"},
		{"unknown final", outbounds + "final: prxy", "final", `unknown outbound "prxy"`},
		{"unknown dns outbound", outbounds + "dns: {outbound: prxy}", "dns.outbound", `unknown outbound "prxy"`},
		{"rule without condition", outbounds + "rules: [{outbound: proxy}]", "rules[0]", "no condition"},
		{"bad regex", outbounds + "rules: [{domain_regex: ['(a'], outbound: direct}]", "rules[0].domain_regex[0]", "invalid regular expression"},
		{"bad hijack", "dns: {hijack: ['53']}", "dns.hijack[0]", "invalid hijack address"},
		{"bad hijack host", "dns: {hijack: ['somewhere:53']}", "dns.hijack[0]", "neither \"any\" nor an IP"},
		{"bad dns listen", "dns: {listen: 172.19.0}", "dns.listen", `invalid IP address "172.19.0"`},
		{"empty dns listen", "dns: {listen: ''}", "dns.listen", "must be an IP address"},
		{"range4 not IPv4", "dns: {fake_ip: {range4: 'fc00::/18'}}", "dns.fake_ip.range4", "must be an IPv4 CIDR"},
		{"range6 not IPv6", "dns: {fake_ip: {range6: 198.18.0.0/15}}", "dns.fake_ip.range6", "must be an IPv6 CIDR"},
		{"upstream without scheme", "dns: {upstreams: ['1.1.1.1']}", "dns.upstreams[0]", "needs a scheme"},
		{"upstream bad scheme", "dns: {upstreams: ['quic://1.1.1.1']}", "dns.upstreams[0]", `unsupported scheme "quic"`},
		{"upstream no host", "dns: {upstreams: ['https:///dns-query']}", "dns.upstreams[0]", "no host"},
		{"zero cache", "dns: {cache: {size: 0}}", "dns.cache.size", "greater than 0"},
		{"zero max_in_flight", "stack: {tcp: {max_in_flight: 0}}", "stack.tcp.max_in_flight", "greater than 0"},
		{"zero max_sessions", "stack: {udp: {max_sessions: 0}}", "stack.udp.max_sessions", "greater than 0"},
		{"main routing table", "route: {table: 254}", "route.table", "reserved kernel table"},
		{"priority after main", "route: {priority: 40000}", "route.priority", "outside 1-32765"},
		{"bad exclude address", "route: {exclude_addresses: [10.1/8]}", "route.exclude_addresses[0]", "invalid CIDR"},
		{"empty journal", "route: {auto: true, journal: ''}", "route.journal", "must be an absolute file path"},
		{"relative journal", "route: {journal: route.journal}", "route.journal", "must be an absolute file path"},
		{"api without secret", "api: {listen: '0.0.0.0:9090'}", "api.secret", "required"},
		{"api without host or secret", "api: {listen: ':9090'}", "api.secret", "required"},
		{"api bad listen", "api: {listen: localhost}", "api.listen", "want host:port"},
		{"cors origin without scheme", "api: {cors: ['127.0.0.1:8080']}", "api.cors[0]", "has no scheme"},
		{"cors origin with a path", "api: {cors: ['*', 'http://127.0.0.1:8080/']}", "api.cors[1]", "has a path"},
		{"cors origin with a query", "api: {cors: ['http://dash.example?x=1']}", "api.cors[0]", "has a path, query or fragment"},
		{"cors origin with credentials", "api: {cors: ['http://u:p@dash.example']}", "api.cors[0]", "has credentials"},
		{"cors origin without host", "api: {cors: ['http://:8080']}", "api.cors[0]", "has no host"},
		{"cors origin bad port", "api: {cors: ['http://dash.example:99999']}", "api.cors[0]", "invalid port"},
		{"cors origin empty port", "api: {cors: ['http://dash.example:']}", "api.cors[0]", "empty port"},
		{"cors origin default port", "api: {cors: ['https://dash.example:443']}", "api.cors[0]", `write "https://dash.example"`},
		{"cors empty origin", "api: {cors: ['']}", "api.cors[0]", "has no scheme"},
		{"ui folder missing", "api: {listen: '127.0.0.1:9090', ui: /nonexistent/dashboard}", "api.ui", "not an existing directory"},
		{"ui is a file", "api: {listen: '127.0.0.1:9090', ui: testdata/config-md-example.yaml}", "api.ui", "not an existing directory"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := loadProblems(t, tc.body)
			if len(got) != 1 || got[0].Key != tc.key || !strings.Contains(got[0].Msg, tc.msg) {
				t.Errorf("Load(%q) problems =\n%s\nwant exactly one: %s: …%s…", tc.body, (&ValidationError{got}).Error(), tc.key, tc.msg)
			}
		})
	}
}

func TestLoadAcceptsEdgeValues(t *testing.T) {
	tests := []string{
		"api: {listen: '127.0.0.1:9090'}",
		"api: {listen: 'localhost:9090'}",
		"api: {listen: '[::1]:9090'}",
		"api: {listen: '0.0.0.0:9090', secret: s3cret}",
		"api: {listen: '127.0.0.1:9090', cors: ['*', 'http://127.0.0.1:8080', 'https://dash.example', 'http://[::1]:3000', 'chrome-extension://abcdef']}",
		"api: {cors: 'http://127.0.0.1:8080'}",          // a single origin for a list
		"api: {listen: '127.0.0.1:9090', ui: testdata}", // an existing folder, relative to the working directory
		"api: {listen: '', ui: /nonexistent/dashboard}", // the API is off: the folder is not read
		"api: {listen: '127.0.0.1:9090', ui: ''}",       // no UI
		"tun: {mtu: 576, address: [10.0.0.1/30]}",
		"tun: {name: '', fd: 3}",
		"dns: {enabled: false, listen: ''}",
		"route: {auto: false, journal: ''}", // no journal needed without auto-route
		"dns: {hijack: ['any:53', '10.0.0.1:53', '[fd00::1]:5353']}",
		"dns: {upstreams: ['udp://1.1.1.1', 'tcp://[2606:4700::1111]:53', 'tls://dns.example:853', 'https://dns.example/dns-query']}",
		"outbounds: [{name: d, type: direct}]\nrules: [{network: udp, outbound: d}]",
		"stack: {tcp: {idle_timeout: 0s, keepalive: '0'}}",
		"LOG: {Level: debug}", // viper keys are case-insensitive
	}
	for _, body := range tests {
		mustLoad(t, body)
	}
}

func TestAPICORSAndUI(t *testing.T) {
	dir := t.TempDir()
	body := "api: {listen: '127.0.0.1:9090', secret: s, cors: ['http://127.0.0.1:8080', '*'], ui: '" + dir + "'}"
	cfg := mustLoad(t, body)
	if want := []string{"http://127.0.0.1:8080", "*"}; !slices.Equal(cfg.API.CORS, want) {
		t.Errorf("Load(%q) api.cors = %q, want %q", body, cfg.API.CORS, want)
	}
	if cfg.API.UI != dir {
		t.Errorf("Load(%q) api.ui = %q, want %q", body, cfg.API.UI, dir)
	}
}

func TestLoadReportsEveryProblemAtOnce(t *testing.T) {
	const body = `
log: {level: loud}
dns: {mod: fake-ip, listen: nowhere}
stack: {tcp: {dial_timeout: soon}}
outbounds:
  - {name: a, type: direct}
  - {name: a, type: socks5}
rules:
  - {ip_cidr: [10.0.0.0/8, 10.0.0.0/33], outbound: prxy}
  - {outbound: a}
final: nope
`
	got := loadProblems(t, body)
	// Unknown keys come first, then values that do not decode, then values
	// that fail validation, each group in the order of Config's fields.
	want := []string{
		"dns.mod",
		"stack.tcp.dial_timeout",
		"rules[0].ip_cidr[1]",
		"dns.listen",
		"log.level",
		"outbounds[1].name",
		"outbounds[1].address",
		"rules[0].outbound",
		"rules[1]",
		"final",
	}
	var keys []string
	for _, fe := range got {
		keys = append(keys, fe.Key)
	}
	if !slices.Equal(keys, want) {
		t.Errorf("Load(%q) reported problems for\n%q\nwant\n%q\nfull report:\n%s", body, keys, want, (&ValidationError{got}).Error())
	}
}

func TestValidationErrorFormat(t *testing.T) {
	ve := &ValidationError{Errors: []FieldError{
		{Key: "dns.mod", Msg: "unknown key"},
		{Key: "rules[0].ip_cidr[1]", Msg: `invalid CIDR "10.0.0.0/33"`},
	}}
	const want = "dns.mod: unknown key\nrules[0].ip_cidr[1]: invalid CIDR \"10.0.0.0/33\""
	if got := ve.Error(); got != want {
		t.Errorf("ValidationError.Error() = %q, want %q", got, want)
	}
	var fe FieldError
	if !errors.As(ve, &fe) || fe.Key != "dns.mod" {
		t.Errorf("errors.As(ValidationError, *FieldError) = %v, want the first FieldError", fe)
	}
}

func TestValidateConfigChangedInCode(t *testing.T) {
	cfg := Default()
	cfg.Rules = append(cfg.Rules, Rule{Port: []PortRange{{To: 80, From: 90}}, Outbound: "direct"})
	cfg.Tun.Address = append(cfg.Tun.Address, netip.Prefix{})
	err := cfg.Validate()
	var ve *ValidationError
	if !errors.As(err, &ve) || len(ve.Errors) != 2 ||
		ve.Errors[0].Key != "tun.address[2]" || ve.Errors[1].Key != "rules[0].port[0]" {
		t.Errorf("Validate() of a config with a zero prefix and a reversed port range = %v", err)
	}
}

func TestLoadFileErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "missing.yaml")
	bad := writeConfig(t, "log: [unclosed\n")
	for _, path := range []string{missing, bad} {
		_, err := Load(path, nil)
		var ve *ValidationError
		if err == nil || errors.As(err, &ve) || !strings.Contains(err.Error(), path) {
			t.Errorf("Load(%s) = %v, want a plain error naming the file", path, err)
		}
	}
}

func TestExamplesLoad(t *testing.T) {
	paths, err := filepath.Glob(filepath.Join("examples", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"system-wide.yaml", "socks5-proxy.yaml", "per-app.yaml"} {
		if !slices.Contains(paths, filepath.Join("examples", want)) {
			t.Errorf("examples/%s is missing", want)
		}
	}
	for _, path := range paths {
		if _, err := Load(path, nil); err != nil {
			t.Errorf("Load(%s): %v", path, err)
		}
	}
}

func TestFinalAndDNSOutbound(t *testing.T) {
	tests := []struct {
		cfg       Config
		final, ns string
	}{
		{Config{}, "", ""},
		{Config{Outbounds: []Outbound{{Name: "a"}, {Name: "b"}}}, "a", "a"},
		{Config{Outbounds: []Outbound{{Name: "a"}, {Name: "b"}}, Final: "b"}, "b", "b"},
		{Config{Outbounds: []Outbound{{Name: "a"}, {Name: "b"}}, DNS: DNS{Outbound: "b"}}, "a", "b"},
	}
	for _, tc := range tests {
		if got := tc.cfg.FinalOutbound(); got != tc.final {
			t.Errorf("%+v.FinalOutbound() = %q, want %q", tc.cfg, got, tc.final)
		}
		if got := tc.cfg.DNSOutbound(); got != tc.ns {
			t.Errorf("%+v.DNSOutbound() = %q, want %q", tc.cfg, got, tc.ns)
		}
	}
	cfg := Default()
	if o, ok := cfg.LookupOutbound("direct"); !ok || o.Type != "direct" {
		t.Errorf("Default().LookupOutbound(%q) = %+v, %v", "direct", o, ok)
	}
	if _, ok := cfg.LookupOutbound("proxy"); ok {
		t.Errorf("Default().LookupOutbound(%q) found an outbound that does not exist", "proxy")
	}
}

func TestUnknownKeySuggestion(t *testing.T) {
	known := []string{"mode", "listen", "hijack", "fd"}
	tests := []struct{ key, want string }{
		{"mod", `unknown key (did you mean "mode"?)`},
		{"lisen", `unknown key (did you mean "listen"?)`},
		{"hijak", `unknown key (did you mean "hijack"?)`},
		{"ab", "unknown key"}, // two edits from "fd", but so is every two-letter key
		{"upstream", "unknown key"},
	}
	for _, tc := range tests {
		if got := unknownKeyMsg(tc.key, known); got != tc.want {
			t.Errorf("unknownKeyMsg(%q) = %q, want %q", tc.key, got, tc.want)
		}
	}
}
