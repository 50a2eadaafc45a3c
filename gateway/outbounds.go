package gateway

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"slices"

	"github.com/tungate/tungate/configs"
	"github.com/tungate/tungate/outbound"
	"github.com/tungate/tungate/outbound/direct"
)

// transportName names the dialer that reaches proxy servers.
const transportName = "proxy-transport"

// transportSocket is how proxy servers are reached: like the first
// outbound that owns sockets (direct), or with the default mark and the
// default interface when there is none. This is the one place the rule is
// written.
func transportSocket(cfg *configs.Config) outbound.Socket {
	for _, o := range cfg.Outbounds {
		if so, ok := o.Settings.(outbound.SocketOwner); ok {
			return so.Socket()
		}
	}
	return outbound.Socket{FWMark: direct.DefaultFWMark}
}

// ownSockets returns how every upstream socket tungate opens is made: each
// socket-owning outbound's, and the proxy transport's.
func ownSockets(cfg *configs.Config) []outbound.Socket {
	var out []outbound.Socket
	for _, o := range cfg.Outbounds {
		if so, ok := o.Settings.(outbound.SocketOwner); ok {
			out = append(out, so.Socket())
		}
	}
	if len(out) == 0 {
		out = append(out, transportSocket(cfg))
	}
	return out
}

// OwnMarks returns the fwmarks on tungate's own upstream sockets, without
// duplicates, and whether some of them carry none.
func OwnMarks(cfg *configs.Config) (marks []uint32, unmarked bool) {
	for _, s := range ownSockets(cfg) {
		switch {
		case s.FWMark == 0:
			unmarked = true
		case !slices.Contains(marks, s.FWMark):
			marks = append(marks, s.FWMark)
		}
	}
	return marks, unmarked
}

// followsDefault reports whether some upstream socket follows the default
// interface (a socket with interface "").
func followsDefault(cfg *configs.Config) bool {
	for _, s := range ownSockets(cfg) {
		if s.Interface == "" {
			return true
		}
	}
	return false
}

// outboundSet is the built outbounds of one configuration, and what they
// were built from, so that a reload can keep the ones that did not change.
type outboundSet struct {
	transport       outbound.Socket
	transportDialer outbound.Dialer
	dialers         map[string]outbound.Dialer
	built           map[string]configs.Outbound
}

// buildOutbounds builds cfg's outbounds, reusing from prev (nil at start)
// every one whose entry is unchanged and that does not depend on a
// changed transport. It returns the new set and the dialers of prev it
// did not reuse.
func buildOutbounds(cfg *configs.Config, prev *outboundSet, deps outbound.Deps) (*outboundSet, []outbound.Dialer, error) {
	set := &outboundSet{
		transport: transportSocket(cfg),
		dialers:   make(map[string]outbound.Dialer, len(cfg.Outbounds)),
		built:     make(map[string]configs.Outbound, len(cfg.Outbounds)),
	}
	transportKept := prev != nil && prev.transport == set.transport
	var made []outbound.Dialer
	fail := func(err error) (*outboundSet, []outbound.Dialer, error) {
		closeDialers(made)
		return nil, nil, err
	}
	if transportKept {
		set.transportDialer = prev.transportDialer
	} else {
		t, err := direct.NewSocket(transportName, set.transport, deps)
		if err != nil {
			return fail(err)
		}
		set.transportDialer = t
		made = append(made, t)
	}
	deps.Transport = set.transportDialer
	for i, o := range cfg.Outbounds {
		if old, ok := prev.reusable(o, transportKept); ok {
			set.dialers[o.Name] = old
			set.built[o.Name] = o
			continue
		}
		if o.Settings == nil {
			return fail(fmt.Errorf("outbounds[%d] (%s): outbound type %q is not supported", i, o.Name, o.Type))
		}
		d, err := o.Settings.New(o.Name, deps)
		if err != nil {
			return fail(fmt.Errorf("outbounds[%d] (%s): %w", i, o.Name, err))
		}
		made = append(made, d)
		set.dialers[o.Name] = d
		set.built[o.Name] = o
	}
	var replaced []outbound.Dialer
	if prev != nil {
		for name, d := range prev.dialers {
			if set.dialers[name] != d {
				replaced = append(replaced, d)
			}
		}
		if !transportKept {
			replaced = append(replaced, prev.transportDialer)
		}
	}
	return set, replaced, nil
}

// reusable returns the dialer s built for o's name when o is the same
// entry and the transport it may use is the same.
func (s *outboundSet) reusable(o configs.Outbound, transportKept bool) (outbound.Dialer, bool) {
	if s == nil {
		return nil, false
	}
	old, ok := s.built[o.Name]
	if !ok || old.Type != o.Type || !reflect.DeepEqual(old.Settings, o.Settings) {
		return nil, false
	}
	if _, owns := o.Settings.(outbound.SocketOwner); !owns && !transportKept {
		return nil, false // a proxy reaches its server through the transport
	}
	return s.dialers[o.Name], true
}

// closeDialers releases the outbounds that hold something (io.Closer).
func closeDialers(ds []outbound.Dialer) {
	for _, d := range ds {
		if c, ok := d.(io.Closer); ok {
			c.Close()
		}
	}
}

// DescribeOutbound renders an outbound for logs and doctor.
func DescribeOutbound(o configs.Outbound) string {
	if s, ok := o.Settings.(fmt.Stringer); ok {
		return s.String()
	}
	return o.Type
}

// loopRefusal refuses a looping flow.
type loopRefusal struct{}

func (loopRefusal) Name() string { return "loop-guard" }

func (loopRefusal) DialTCP(_ context.Context, dst outbound.Target) (outbound.TCPConn, error) {
	return nil, fmt.Errorf("routing loop to %s refused: %w", dst, outbound.ErrRefused)
}

func (loopRefusal) ListenUDP(_ context.Context, first outbound.Target) (outbound.PacketConn, error) {
	return nil, fmt.Errorf("routing loop to %s refused: %w", first, outbound.ErrRefused)
}

// CarriesUDP implements outbound.UDPCarrier: a looping datagram is
// refused at once (ICMP port unreachable).
func (loopRefusal) CarriesUDP() bool { return false }

var _ outbound.UDPCarrier = loopRefusal{}

func discardIfNil(log *slog.Logger) *slog.Logger {
	if log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return log
}
