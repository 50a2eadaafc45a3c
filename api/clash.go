package api

import (
	"context"
	"time"
)

// The Clash API's JSON, as the dashboards built on it (metacubexd,
// zashboard, yacd) read it: names, casing and string ports are theirs.

// Snapshot is a /connections frame.
type Snapshot struct {
	DownloadTotal uint64       `json:"downloadTotal"`
	UploadTotal   uint64       `json:"uploadTotal"`
	Connections   []Connection `json:"connections"`
	Memory        uint64       `json:"memory"`
}

// Connection is one live flow. Upload and Download are cumulative: the
// dashboards diff them between frames for speeds.
type Connection struct {
	ID          string    `json:"id"`
	Metadata    Metadata  `json:"metadata"`
	Upload      uint64    `json:"upload"`
	Download    uint64    `json:"download"`
	Start       time.Time `json:"start"`
	Chains      []string  `json:"chains"`
	Rule        string    `json:"rule"`
	RulePayload string    `json:"rulePayload"`
}

// Metadata is what is known of a flow. Ports are strings, as in Clash.
type Metadata struct {
	Network         string `json:"network"`
	Type            string `json:"type"`
	SourceIP        string `json:"sourceIP"`
	SourcePort      string `json:"sourcePort"`
	DestinationIP   string `json:"destinationIP"`
	DestinationPort string `json:"destinationPort"`
	Host            string `json:"host"`
	DNSMode         string `json:"dnsMode"`
	InboundName     string `json:"inboundName"`
	UID             *int64 `json:"uid,omitempty"`
	Process         string `json:"process"`
	ProcessPath     string `json:"processPath"`
}

// Proxy is an outbound, or the GLOBAL selector, in /proxies.
type Proxy struct {
	Name    string   `json:"name"`
	Type    string   `json:"type"`
	UDP     bool     `json:"udp"`
	All     []string `json:"all,omitempty"`
	Now     string   `json:"now,omitempty"`
	History []Delay  `json:"history"`
}

// Delay is one measured latency of a proxy.
type Delay struct {
	Time  time.Time `json:"time"`
	Delay int       `json:"delay"`
}

// Rule is one entry of /rules.
type Rule struct {
	Type    string `json:"type"`
	Payload string `json:"payload"`
	Proxy   string `json:"proxy"`
}

// Configs is GET /configs: the Clash keys the dashboards show, with
// tungate's values (it has no mixed or SOCKS ports of its own yet).
type Configs struct {
	Port        int    `json:"port"`
	SocksPort   int    `json:"socks-port"`
	RedirPort   int    `json:"redir-port"`
	TProxyPort  int    `json:"tproxy-port"`
	MixedPort   int    `json:"mixed-port"`
	AllowLan    bool   `json:"allow-lan"`
	BindAddress string `json:"bind-address"`
	Mode        string `json:"mode"`
	LogLevel    string `json:"log-level"`
	IPv6        bool   `json:"ipv6"`
}

// ConfigPatch is PATCH /configs: the keys tungate lets a dashboard change
// at run time.
type ConfigPatch struct {
	Mode     *string `json:"mode"`
	LogLevel *string `json:"log-level"`
}

// NATEntry is one UDP mapping of GET /nat.
type NATEntry struct {
	ID       string    `json:"id"`
	Source   string    `json:"source"`
	Outbound string    `json:"outbound"`
	First    string    `json:"firstDestination"`
	Host     string    `json:"host"`
	Local    string    `json:"upstreamLocal"`
	Remotes  int       `json:"remotes"`
	LastSeen time.Time `json:"lastSeen"`
	Upload   uint64    `json:"upload"`
	Download uint64    `json:"download"`
}

// Backend is what the API shows and steers: the gateway. Every method is
// safe for concurrent use and returns without waiting on the network,
// except Delay, QueryDNS and Reload, which are bounded by ctx or their own
// timeouts.
type Backend interface {
	// Version names the running tungate.
	Version() string
	// Connections returns every live flow, oldest first, and the bytes
	// relayed since start.
	Connections() Snapshot
	// CloseConnection resets flow id; false if it is not live.
	CloseConnection(id string) bool
	// CloseAllConnections resets every flow and returns how many.
	CloseAllConnections() int
	// Totals returns the bytes relayed since start, up and down.
	Totals() (up, down uint64)
	// Proxies returns the outbounds and the GLOBAL selector by name.
	Proxies() map[string]Proxy
	// Select makes name the choice of selector group.
	Select(group, name string) error
	// Delay measures a GET of url through the outbound called name.
	Delay(ctx context.Context, name, url string) (time.Duration, error)
	// Rules returns the rules in order, the final outbound last.
	Rules() []Rule
	// Configs returns the run-time view of the configuration.
	Configs() Configs
	// Patch changes the mode or the log level.
	Patch(ConfigPatch) error
	// Reload re-reads the configuration file.
	Reload() error
	// FlushDNSCache empties the DNS answer cache; FlushFakeIP drops the
	// fake-ip mappings no live flow uses.
	FlushDNSCache() error
	FlushFakeIP() error
	// QueryDNS asks the DNS proxy, as an app would, and returns its
	// answer as Clash's /dns/query renders it.
	QueryDNS(ctx context.Context, name, qtype string) (any, error)
	// NAT returns the UDP mappings.
	NAT() []NATEntry
	// Explain runs the routing step for a destination.
	Explain(dst, network, domain string) (any, error)
}
