package dnsproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/outbound"
)

// failureLog reports failed upstream attempts: the first of each upstream
// and cause within a window at WARN, the others at DEBUG, counted in the
// next WARN line of that upstream and cause ("(12 more since)"). A dead
// upstream thus costs one line a minute at the default level, not one per
// query.
type failureLog struct {
	log    *slog.Logger
	window time.Duration
	now    func() time.Time

	mu   sync.Mutex
	last map[failureKey]*failureEntry
}

type failureKey struct{ upstream, cause string }

type failureEntry struct {
	warned     time.Time // of the last WARN line
	suppressed int       // failures since, logged at DEBUG only
}

// failureWindow is how often one upstream and cause may log at WARN.
const failureWindow = time.Minute

// maxFailureKeys bounds the remembered (upstream, cause) pairs; causes are
// few kinds, but the fallback is an error's text.
const maxFailureKeys = 1024

func newFailureLog(log *slog.Logger, window time.Duration) *failureLog {
	return &failureLog{log: log, window: window, now: time.Now, last: make(map[failureKey]*failureEntry)}
}

// failed logs one failed attempt at upstream (its configured name): err,
// or, when err is nil, an answer with rcode.
func (f *failureLog) failed(upstream string, err error, rcode int) {
	cause := failureCause(err, rcode)
	key := failureKey{upstream, cause}
	now := f.now()
	f.mu.Lock()
	e, ok := f.last[key]
	if ok && now.Sub(e.warned) < f.window {
		e.suppressed++
		f.mu.Unlock()
		f.log.Debug("dns upstream failed", f.attrs(upstream, cause, err)...)
		return
	}
	suppressed := 0
	if ok {
		suppressed = e.suppressed
	} else {
		if len(f.last) >= maxFailureKeys {
			clear(f.last)
		}
		e = &failureEntry{}
		f.last[key] = e
	}
	e.warned, e.suppressed = now, 0
	f.mu.Unlock()
	msg := "dns upstream failed"
	if suppressed > 0 {
		msg = fmt.Sprintf("dns upstream failed (%d more since)", suppressed)
	}
	f.log.Warn(msg, f.attrs(upstream, cause, err)...)
}

func (f *failureLog) attrs(upstream, cause string, err error) []any {
	args := []any{"upstream", upstream, "cause", cause}
	if err != nil {
		args = append(args, "err", err)
	}
	return args
}

// failureCause names the kind of a failed attempt, the key of the rate
// limit: "refused", "timeout", "unreachable", "certificate", "tls", the
// rcode an upstream answered ("SERVFAIL"), or else the innermost error's
// text.
func failureCause(err error, rcode int) string {
	if err == nil {
		if s, ok := dns.RcodeToString[rcode]; ok {
			return s
		}
		return fmt.Sprintf("rcode %d", rcode)
	}
	var (
		cv   *tls.CertificateVerificationError
		ua   x509.UnknownAuthorityError
		hn   x509.HostnameError
		ci   x509.CertificateInvalidError
		alrt tls.AlertError
		rh   tls.RecordHeaderError
		nerr net.Error
	)
	switch {
	case errors.Is(err, outbound.ErrRefused), errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &nerr) && nerr.Timeout():
		return "timeout"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return "unreachable"
	case errors.As(err, &cv), errors.As(err, &ua), errors.As(err, &hn), errors.As(err, &ci):
		return "certificate"
	case errors.As(err, &alrt), errors.As(err, &rh):
		return "tls"
	}
	for {
		next := errors.Unwrap(err)
		if next == nil {
			return err.Error()
		}
		err = next
	}
}
