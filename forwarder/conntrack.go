package forwarder

import (
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tungate/tungate/outbound"
)

// Tracker is the connection tracker: every TCP flow and UDP session the
// relays carry, with a stable id, what routing knew of it, its outbound,
// and cumulative byte counters that the relays bump with one atomic add
// per read (no lock, no allocation: BenchmarkTrackedCopy). Close ends one
// flow; Retire ends every flow of an outbound that a reload removed or
// changed, and refuses the ones still dialling through it.
//
// A Tracker is safe for concurrent use. The zero value is not usable: call
// NewTracker.
type Tracker struct {
	// OnEnd, when set, is called once for every tracked flow that ends,
	// after its relay has stopped counting: the flow's final snapshot and
	// how long it lived. It runs on the relay's goroutine, holding no lock
	// of the tracker or the relays; it must not block. Set it before the
	// first flow is tracked. Unset, a flow's end costs one nil check.
	OnEnd func(c ConnInfo, lived time.Duration)

	lastID atomic.Uint64

	mu      sync.Mutex
	conns   map[uint64]*Conn
	retired map[outbound.Dialer]struct{}
}

// NewTracker returns an empty tracker.
func NewTracker() *Tracker {
	return &Tracker{conns: make(map[uint64]*Conn), retired: make(map[outbound.Dialer]struct{})}
}

// Conn is one tracked flow. Its metadata is fixed when it is tracked; its
// counters move while it lives.
type Conn struct {
	id     uint64
	flow   Flow // Release cleared: the relay owns it
	dialer outbound.Dialer
	start  time.Time
	abort  func()

	up, down atomic.Uint64
}

// ConnInfo is a snapshot of a tracked flow.
type ConnInfo struct {
	ID      uint64
	Network string // "tcp" or "udp"
	Inbound string
	Src     string
	Dst     string
	// Domain is the flow's name when known; DomainSource says from where
	// ("fake-ip", "dns").
	Domain, DomainSource string
	// Rule is the rule that picked the outbound, as the configuration
	// writes it ("rules[2]"); "final" when none matched.
	Rule string
	// RulePayload is the rule's conditions in the configuration's words.
	RulePayload string
	// Chain is the outbounds the flow goes through, outermost first.
	Chain    []string
	Outbound string
	// UID is the app's uid, when known; -1 otherwise.
	UID              int64
	Start            time.Time
	Upload, Download uint64
}

// track registers a flow carried by d; abort ends it. It returns nil when
// d was retired meanwhile: the caller must end the flow.
func (t *Tracker) track(f *Flow, d outbound.Dialer, abort func()) *Conn {
	c := &Conn{id: t.lastID.Add(1), flow: *f, dialer: d, start: time.Now(), abort: abort}
	c.flow.Release = nil
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, gone := t.retired[d]; gone {
		return nil
	}
	t.conns[c.id] = c
	return c
}

// untrack forgets c; the flow has ended. OnEnd runs for c once, when c
// was live.
func (t *Tracker) untrack(c *Conn) {
	t.mu.Lock()
	_, live := t.conns[c.id]
	delete(t.conns, c.id)
	t.mu.Unlock()
	if live && t.OnEnd != nil {
		t.OnEnd(c.info(), time.Since(c.start))
	}
}

// Close ends the flow id: a TCP flow is reset on both sides, a UDP
// session closed. It reports whether the flow was live.
func (t *Tracker) Close(id uint64) bool {
	t.mu.Lock()
	c := t.conns[id]
	t.mu.Unlock()
	if c == nil {
		return false
	}
	c.abort()
	return true
}

// Retire ends every flow carried by one of ds and refuses the flows that
// are still dialling through them when they come to be tracked. It
// returns how many flows it ended. The set of retired dialers grows by
// the outbounds each reload replaces, which is small.
func (t *Tracker) Retire(ds ...outbound.Dialer) int {
	if len(ds) == 0 {
		return 0
	}
	var ended []*Conn
	t.mu.Lock()
	for _, d := range ds {
		t.retired[d] = struct{}{}
	}
	for _, c := range t.conns {
		if _, gone := t.retired[c.dialer]; gone {
			ended = append(ended, c)
		}
	}
	t.mu.Unlock()
	for _, c := range ended {
		c.abort()
	}
	return len(ended)
}

// Len returns the number of live flows.
func (t *Tracker) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.conns)
}

// Snapshot returns every live flow, oldest first.
func (t *Tracker) Snapshot() []ConnInfo {
	t.mu.Lock()
	conns := make([]*Conn, 0, len(t.conns))
	for _, c := range t.conns {
		conns = append(conns, c)
	}
	t.mu.Unlock()
	slices.SortFunc(conns, func(a, b *Conn) int {
		switch {
		case a.id < b.id:
			return -1
		case a.id > b.id:
			return 1
		}
		return 0
	})
	out := make([]ConnInfo, len(conns))
	for i, c := range conns {
		out[i] = c.info()
	}
	return out
}

func (c *Conn) info() ConnInfo {
	f := &c.flow
	rule := f.Rule
	if rule == "" {
		rule = "final"
	}
	uid := int64(-1)
	if f.UID != nil {
		uid = int64(*f.UID)
	}
	return ConnInfo{
		ID: c.id, Network: f.Network, Inbound: f.Inbound,
		Src: f.Src.String(), Dst: f.Dst.String(),
		Domain: f.Domain, DomainSource: f.DomainSource,
		Rule: rule, RulePayload: f.RulePayload,
		Chain:    slices.Clone(f.Chain),
		Outbound: c.dialer.Name(),
		UID:      uid,
		Start:    c.start,
		Upload:   c.up.Load(), Download: c.down.Load(),
	}
}
