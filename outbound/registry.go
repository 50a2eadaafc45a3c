package outbound

import (
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tungate/tungate/netmon"
)

// Kind is one type of outbound ("direct", "socks5", …). Each kind lives in
// a folder of its own — its configuration, validation, constructor,
// metrics and tests — and registers itself from an init function; package
// outbound/kinds links every kind in. Package configs decodes an
// outbounds[] entry into the kind's Config and the gateway builds it, so
// adding a kind touches its folder and one line of outbound/kinds.
type Kind struct {
	// Type is the value of outbounds[].type.
	Type string
	// NewConfig returns a pointer to the kind's configuration with its
	// defaults set. configs decodes the entry's keys other than name and
	// type into it by their mapstructure tags, so a key the struct does
	// not declare is an error that names it.
	NewConfig func() Config
}

// Config is a kind's decoded configuration. Optional behaviour is
// discovered by type assertion (SocketOwner, Explainer, fmt.Stringer), so
// a kind implements only what applies to it.
type Config interface {
	// Validate returns the problems of the entry's keys; a Problem's Key
	// is relative to the entry ("address", not "outbounds[1].address").
	Validate() []Problem
	// New builds the outbound called name.
	New(name string, deps Deps) (Dialer, error)
}

// Problem is one invalid key of a Config.
type Problem struct {
	Key, Msg string
}

// Deps is what the gateway hands every outbound it builds.
type Deps struct {
	Log *slog.Logger
	// Transport reaches proxy servers: a direct socket marked and bound
	// like tungate's own direct outbound (see SocketOwner), so proxy
	// traffic never re-enters the TUN.
	Transport Dialer
	// Resolver turns fake-ip destinations into real addresses.
	Resolver Resolver
	// KeepAlive is the TCP keepalive period of upstream sockets.
	KeepAlive time.Duration
	// Monitor follows the default interface; nil when nothing follows it
	// (or it cannot be followed here).
	Monitor *netmon.Monitor
	// Dialing, when set, is told of every upstream socket before it
	// connects or sends (see DirectConfig.Dialing): loop detection.
	Dialing func(dst netip.AddrPort) (done func())
}

// Socket is how an outbound's own upstream sockets are marked and bound.
type Socket struct {
	// FWMark is the SO_MARK of every socket; 0 sets none.
	FWMark uint32
	// Interface binds every socket; "" follows the default interface.
	Interface string
}

// SocketOwner is a Config whose outbound opens sockets of its own towards
// upstreams (direct). The gateway reads them for loop prevention, for
// auto-route's exclusions and for doctor; the first one's Socket is also
// how proxies are reached (the proxy transport).
type SocketOwner interface {
	Socket() Socket
}

// Upstream is where an outbound's own socket for a flow goes, as doctor
// --explain shows it.
type Upstream struct {
	// None says the outbound opens no socket; Note says what it does
	// instead.
	None bool
	Note string
	// Addr is the socket's destination as configured: host:port, a name
	// when the configuration holds one (not looked up).
	Addr string
	// Network is "tcp" or "udp", or "" when the port is picked later
	// (a SOCKS5 UDP relay).
	Network string
	// Transport says the socket is the proxy transport's; otherwise it is
	// the outbound's own (SocketOwner).
	Transport bool
	// What names the socket in prose.
	What string
}

// Explainer is a Config that can say where its outbound's socket for a
// flow to dst over network goes.
type Explainer interface {
	Upstream(dst netip.AddrPort, network string) Upstream
}

// MetricsCollector is implemented by outbounds that keep counters of their
// own (a proxy's dials and refusals). Collect sends them labelled with the
// outbound's name; the gateway calls it for every live outbound at each
// scrape.
type MetricsCollector interface {
	Collect(ch chan<- prometheus.Metric)
}

var (
	kindsMu sync.RWMutex
	kinds   = map[string]Kind{}
	order   []string
)

// Register adds a kind. It panics on a duplicate or empty type: both are
// build defects.
func Register(k Kind) {
	kindsMu.Lock()
	defer kindsMu.Unlock()
	if k.Type == "" || k.NewConfig == nil {
		panic("outbound: Register needs a type and NewConfig")
	}
	if _, dup := kinds[k.Type]; dup {
		panic(fmt.Sprintf("outbound: kind %q registered twice", k.Type))
	}
	kinds[k.Type] = k
	order = append(order, k.Type)
}

// Lookup returns the kind registered for typ.
func Lookup(typ string) (Kind, bool) {
	kindsMu.RLock()
	defer kindsMu.RUnlock()
	k, ok := kinds[typ]
	return k, ok
}

// Types returns the registered types, sorted.
func Types() []string {
	kindsMu.RLock()
	defer kindsMu.RUnlock()
	out := append([]string(nil), order...)
	sort.Strings(out)
	return out
}

// Logger returns the log of the outbound called name: Log with its name
// attached (nil stays nil: the constructors discard).
func (d Deps) Logger(name string) *slog.Logger {
	if d.Log == nil {
		return nil
	}
	return d.Log.With("outbound", name)
}

// ProxyAddressProblems validates a proxy kind's address key: host:port,
// the host an IP address (see ParseProxyAddress).
func ProxyAddressProblems(kind, address string) []Problem {
	if err := CheckHostPort(address); err != nil {
		return []Problem{{Key: "address", Msg: fmt.Sprintf("%s outbound needs host:port: %v", kind, err)}}
	}
	if _, err := ParseProxyAddress(address); err != nil {
		return []Problem{{Key: "address", Msg: err.Error()}}
	}
	return nil
}
