package api

import (
	"bytes"
	"context"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
)

// LogHub is a slog.Handler that passes every record on to the handler it
// wraps and copies it to the /logs streams that are open. A stream that
// falls behind loses lines (its buffer is bounded); logging never waits
// for one.
type LogHub struct {
	next  slog.Handler
	hub   *hub
	attrs []slog.Attr // those of WithAttrs, for the streams' text
}

type hub struct {
	// min is the lowest level a stream asks for (noStreams when none), so
	// that a record nobody wants costs one atomic load.
	min atomic.Int64

	mu   sync.Mutex
	subs map[*logSub]struct{}
}

const noStreams = math.MaxInt64

type logSub struct {
	level slog.Level
	lines chan LogLine
}

// LogLine is one frame of /logs.
type LogLine struct {
	Type    string `json:"type"`
	Payload string `json:"payload"`
}

// logSubBuffer bounds the lines a slow /logs reader can have queued.
const logSubBuffer = 256

// NewLogHub wraps next.
func NewLogHub(next slog.Handler) *LogHub {
	h := &hub{subs: map[*logSub]struct{}{}}
	h.min.Store(noStreams)
	return &LogHub{next: next, hub: h}
}

// Enabled implements slog.Handler: a record is made when next wants it
// or a stream is open.
func (h *LogHub) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l) || int64(l) >= h.hub.min.Load()
}

// Handle implements slog.Handler.
func (h *LogHub) Handle(ctx context.Context, r slog.Record) error {
	var err error
	if h.next.Enabled(ctx, r.Level) {
		err = h.next.Handle(ctx, r)
	}
	h.hub.publish(r, h)
	return err
}

// WithAttrs implements slog.Handler.
func (h *LogHub) WithAttrs(as []slog.Attr) slog.Handler {
	return &LogHub{next: h.next.WithAttrs(as), hub: h.hub, attrs: append(append([]slog.Attr(nil), h.attrs...), as...)}
}

// WithGroup implements slog.Handler. Groups are flattened into the
// stream's text.
func (h *LogHub) WithGroup(name string) slog.Handler {
	return &LogHub{next: h.next.WithGroup(name), hub: h.hub, attrs: h.attrs}
}

func (s *hub) publish(r slog.Record, h *LogHub) {
	if int64(r.Level) < s.min.Load() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.subs) == 0 {
		return
	}
	var line *LogLine
	for sub := range s.subs {
		if r.Level < sub.level {
			continue
		}
		if line == nil {
			line = &LogLine{Type: LevelName(r.Level), Payload: h.render(r)}
		}
		select {
		case sub.lines <- *line:
		default: // a slow reader loses the line
		}
	}
}

// render writes the record's message and attributes as slog's text
// handler would, without time and level (the frame has its type).
func (h *LogHub) render(r slog.Record) string {
	var b bytes.Buffer
	th := slog.NewTextHandler(&b, &slog.HandlerOptions{ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey) {
			return slog.Attr{}
		}
		return a
	}})
	_ = th.WithAttrs(h.attrs).Handle(context.Background(), r)
	return string(bytes.TrimSuffix(b.Bytes(), []byte("\n")))
}

// subscribe opens a stream of records at level and above.
func (h *LogHub) subscribe(level slog.Level) *logSub {
	s := &logSub{level: level, lines: make(chan LogLine, logSubBuffer)}
	h.hub.mu.Lock()
	h.hub.subs[s] = struct{}{}
	h.hub.resetMin()
	h.hub.mu.Unlock()
	return s
}

func (h *LogHub) unsubscribe(s *logSub) {
	h.hub.mu.Lock()
	delete(h.hub.subs, s)
	h.hub.resetMin()
	h.hub.mu.Unlock()
}

// resetMin recomputes min; s.mu is held.
func (s *hub) resetMin() {
	low := int64(noStreams)
	for sub := range s.subs {
		low = min(low, int64(sub.level))
	}
	s.min.Store(low)
}

// LevelName is Clash's name of a level.
func LevelName(l slog.Level) string {
	switch {
	case l >= slog.LevelError:
		return "error"
	case l >= slog.LevelWarn:
		return "warning"
	case l >= slog.LevelInfo:
		return "info"
	}
	return "debug"
}

// ParseLevel reads Clash's level names (and slog's "warn"); "" is info.
func ParseLevel(s string) (slog.Level, bool) {
	switch s {
	case "", "info":
		return slog.LevelInfo, true
	case "debug":
		return slog.LevelDebug, true
	case "warning", "warn":
		return slog.LevelWarn, true
	case "error":
		return slog.LevelError, true
	case "silent":
		return slog.LevelError + 100, true
	}
	return 0, false
}
