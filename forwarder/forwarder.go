package forwarder

import (
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/tungate/tungate/outbound"
)

// Flow is what is known of a new flow when its outbound is chosen.
type Flow struct {
	Network string // "tcp" or "udp"
	// Inbound names the entry the flow came through ("tun").
	Inbound  string
	Src, Dst netip.AddrPort
	// UID is the app's uid, when known.
	UID *uint32
	// Domain is the name the app resolved to reach Dst, when known. Route
	// may fill it in (from fake-ip or the DNS cache); the outbound gets it.
	// DomainSource says where it came from ("fake-ip", "dns").
	Domain, DomainSource string
	// Rule names the rule that picked the outbound ("rules[2]"; "" for
	// the final outbound) and RulePayload its conditions; Chain is the
	// outbounds the flow goes through, outermost first. Route fills them
	// in for the connection tracker.
	Rule, RulePayload string
	Chain             []string
	// Release, when Route sets it, is called once when the flow (for UDP:
	// the mapping) has ended, e.g. to unpin a fake address.
	Release func()
}

// Route picks the outbound for a flow and may fill in what it learns
// (Domain, Release). It must not block.
type Route func(f *Flow) outbound.Dialer

// causeLog logs a failure once per outbound and cause within a window, so a
// dead upstream produces one line a minute rather than one per flow.
type causeLog struct {
	log    *slog.Logger
	window time.Duration

	mu   sync.Mutex
	last map[string]time.Time
}

func newCauseLog(log *slog.Logger, window time.Duration) *causeLog {
	return &causeLog{log: log, window: window, last: make(map[string]time.Time)}
}

func (c *causeLog) warn(outboundName string, cause error, msg string, args ...any) {
	key := outboundName + "\x00" + causeKey(cause)
	now := time.Now()
	c.mu.Lock()
	t, seen := c.last[key]
	if seen && now.Sub(t) < c.window {
		c.mu.Unlock()
		c.log.Debug(msg, args...)
		return
	}
	if len(c.last) > 1024 {
		clear(c.last)
	}
	c.last[key] = now
	c.mu.Unlock()
	c.log.Warn(msg, args...)
}

// causeKey reduces an error to its innermost cause, so that the same refusal
// for different destinations counts as one cause.
func causeKey(err error) string {
	for {
		next := errors.Unwrap(err)
		if next == nil {
			return err.Error()
		}
		err = next
	}
}
