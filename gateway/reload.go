package gateway

import (
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"slices"

	"github.com/tungate/tungate/configs"
)

// liveKeys are the configuration keys a reload applies. Every other key
// (the TUN, the stack, routes, the API, the DNS proxy's own settings)
// belongs to something that runs for the process's life: a change to one
// is logged as needing a restart and the running value stays. log.level
// is applied to the Level of Deps.
var liveKeys = []string{"outbounds", "rules", "final", "dns.hijack", "dns.outbound", "log.level"}

// Reload re-reads the configuration through load and applies it: the
// rules, the outbounds and the DNS policy (dns.hijack, dns.outbound) are
// swapped at once, for every new flow. Flows whose outbound still exists
// unchanged keep running; flows whose outbound was removed or changed are
// reset. A configuration that does not load, or whose outbounds or rules
// cannot be built, is refused with every error logged, and the running
// one stays. A changed key outside liveKeys is logged as needing a
// restart and not applied; the rest of the file is.
func (g *Gateway) Reload(load func() (*configs.Config, error)) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.state != stateRunning {
		return errors.New("gateway: Reload on a gateway that is not running")
	}
	next, err := load()
	if err == nil {
		err = g.apply(next)
	}
	if err != nil {
		g.refused(err)
		return err
	}
	return nil
}

// refused logs every error of a refused reload.
func (g *Gateway) refused(err error) {
	var ve *configs.ValidationError
	if errors.As(err, &ve) {
		for _, fe := range ve.Errors {
			g.log.Error("reload refused", "error", fe.Error())
		}
	} else {
		g.log.Error("reload refused", "error", err.Error())
	}
	g.log.Error("reload refused: the running configuration stays")
	if g.reloads != nil {
		g.reloads.WithLabelValues("refused").Inc()
	}
}

// apply makes next the running configuration, as Reload says.
func (g *Gateway) apply(next *configs.Config) error {
	prev := g.cfg
	effective := *next
	for _, key := range restartKeys(prev, next) {
		g.log.Warn("reload: restart needed", "key", key)
	}
	// What is not live keeps its running value.
	effective.Tun, effective.Stack, effective.Route, effective.API = prev.Tun, prev.Stack, prev.Route, prev.API
	effective.Log.Format = prev.Log.Format
	effective.Log.Flows = prev.Log.Flows // the tracker's hook is set once, in New
	dns := prev.DNS
	dns.Hijack, dns.Outbound = next.DNS.Hijack, next.DNS.Outbound
	effective.DNS = dns
	if err := effective.Validate(); err != nil {
		// The live keys of next refer to something only next has (a
		// dns.outbound, say, that is fine only with next's dns.enabled).
		return err
	}
	if a, b := fmt.Sprint(OwnMarks(prev)), fmt.Sprint(OwnMarks(&effective)); a != b {
		g.log.Warn("reload: restart needed", "key", "outbounds", "why", "the fwmarks of tungate's own sockets changed from "+a+" to "+b+"; auto-route and the loop guard keep the old ones until a restart")
	}

	r, err := newRouting(&effective)
	if err != nil {
		return err
	}
	set, replaced, err := buildOutbounds(&effective, g.outs, g.outboundDeps(&effective))
	if err != nil {
		return err
	}
	g.current.Store(newTable(&effective, r, set.dialers))
	if g.dns != nil {
		carried := g.dnsOut.CarriesUDP()
		g.dnsOut.set(set.dialers[effective.DNSOutbound()])
		if carried && !g.dnsOut.CarriesUDP() {
			g.log.Info("dns outbound carries no UDP: asking udp:// upstreams over TCP", "outbound", g.dnsOut.Name())
		}
	}
	ended := g.tracker.Retire(replaced...)
	closeDialers(replaced)
	kept := 0
	for name, d := range set.dialers {
		if g.outs.dialers[name] == d {
			kept++
		}
	}
	g.outs, g.cfg = set, &effective
	if g.deps.Level != nil {
		var l slog.Level
		if l.UnmarshalText([]byte(effective.Log.Level)) == nil {
			g.deps.Level.Set(l)
		}
	}
	g.log.Info("config reloaded", "outbounds", len(set.dialers), "outbounds_kept", kept, "rules", len(effective.Rules), "flows_reset", ended)
	if g.reloads != nil {
		g.reloads.WithLabelValues("applied").Inc()
	}
	return nil
}

// restartKeys returns the keys that differ between a and b and that a
// reload does not apply, by their configuration names ("tun.mtu").
func restartKeys(a, b *configs.Config) []string {
	var keys []string
	diffKeys("", reflect.ValueOf(*a), reflect.ValueOf(*b), &keys)
	return slices.DeleteFunc(keys, isLive)
}

func isLive(key string) bool {
	for _, l := range liveKeys {
		if key == l || len(key) > len(l) && key[:len(l)] == l && (key[len(l)] == '.' || key[len(l)] == '[') {
			return true
		}
	}
	return false
}

// diffKeys appends the keys of the leaves where a and b differ, walking
// sections by their mapstructure tags.
func diffKeys(prefix string, a, b reflect.Value, out *[]string) {
	t := a.Type()
	if t.Kind() == reflect.Struct && t.NumField() > 0 && t.Field(0).Tag.Get("mapstructure") != "" {
		for i := range t.NumField() {
			name := t.Field(i).Tag.Get("mapstructure")
			if name == "" || name == "-" {
				continue
			}
			key := name
			if prefix != "" {
				key = prefix + "." + name
			}
			diffKeys(key, a.Field(i), b.Field(i), out)
		}
		return
	}
	if !reflect.DeepEqual(a.Interface(), b.Interface()) {
		*out = append(*out, prefix)
	}
}
