package netmon

import (
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
)

// ErrNotSupported is returned by Start where the Monitor cannot follow
// the routing table.
var ErrNotSupported = errors.New("following the default route is not supported on " + runtime.GOOS)

// Config configures a Monitor.
type Config struct {
	// Ignore names interfaces whose routes count as absent: tungate's
	// own TUN, so that a default route into it is never the way out.
	Ignore []string
}

// Monitor follows the default route of the network namespace it was
// started in (see the package documentation).
//
// Lifecycle:
//
//	New ──► Start ──► Close
//	 └───────────────► Close
//
// Start reads the kernel's state once before it returns, so Default and
// InterfaceFor answer from the first flow on; it fails after Close, or
// when called twice. Close is idempotent, stops following and waits for
// the Monitor's goroutines: no callback runs after it returns. Default,
// InterfaceFor, State, Subscribe and Ignore are safe from any goroutine
// at any time; before Start (or after a failed one) they see no routes.
type Monitor struct {
	log *slog.Logger

	// view is the current reading, swapped whole: the readers on the
	// dial path take no lock.
	view atomic.Pointer[view]
	// applyMu serialises changes of view and the callbacks that report
	// them, so subscribers see changes one at a time and in order.
	applyMu sync.Mutex
	closing bool // set by Close, under applyMu: no callback runs after

	subMu   sync.Mutex
	subs    map[int]func(Change)
	nextSub int

	// lifeMu serialises Start and Close.
	lifeMu          sync.Mutex
	started, closed bool
	// stopFollowing ends what follow started (netmon_linux.go).
	stopFollowing func()
}

// view is one reading of the kernel's state and what follows from it.
type view struct {
	tab    *table // nil until the first reading
	ignore map[string]bool
	state  State
}

// New returns a Monitor that has not started. log may be nil.
func New(cfg Config, log *slog.Logger) *Monitor {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ignore := make(map[string]bool, len(cfg.Ignore))
	for _, name := range cfg.Ignore {
		if name != "" {
			ignore[name] = true
		}
	}
	m := &Monitor{log: log, subs: make(map[int]func(Change))}
	m.view.Store(&view{ignore: ignore})
	return m
}

// Start reads the routing state and starts following it.
func (m *Monitor) Start() error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	switch {
	case m.closed:
		return errors.New("netmon: Start after Close")
	case m.started:
		return errors.New("netmon: Start called twice")
	}
	m.started = true
	stop, err := m.follow()
	if err != nil {
		return err
	}
	m.stopFollowing = stop
	return nil
}

// Close stops following and waits for the Monitor's goroutines.
func (m *Monitor) Close() error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	// A change under way (in Ignore, or the watch loop) finishes first;
	// any later one tells no one.
	m.applyMu.Lock()
	m.closing = true
	m.applyMu.Unlock()
	if m.stopFollowing != nil {
		m.stopFollowing()
	}
	return nil
}

// State returns the current default interfaces.
func (m *Monitor) State() State { return m.view.Load().state }

// Default returns the interface of the main table's current default route
// for IPv6 (v6) or IPv4; "" when there is none or it is not known.
func (m *Monitor) Default(v6 bool) string { return m.view.Load().state.Default(v6) }

// InterfaceFor returns the interface the main table currently sends dst
// out of — the default interface, unless a more specific route (a LAN, a
// VPN's subnet) sends dst elsewhere — or "" when no route is known or the
// route is unreachable. Routes through ignored interfaces count as
// absent. It takes no lock and allocates nothing; its cost grows with the
// number of main-table routes.
func (m *Monitor) InterfaceFor(dst netip.Addr) string {
	v := m.view.Load()
	return v.tab.lookup(dst, v.ignore)
}

// Subscribe calls fn with every Change from now on, until the returned
// function is called or the Monitor closes. Callbacks run one at a time,
// in the order of the changes (on the Monitor's goroutine, or in Start or
// Ignore for the changes those make): fn must return quickly and must not
// call Ignore or Close (Default, InterfaceFor, Subscribe and the cancel
// functions are fine). A change reaches fn only when a default interface
// changed or an interface is Gone; one under way when cancel is called may
// still reach it.
func (m *Monitor) Subscribe(fn func(Change)) (cancel func()) {
	m.subMu.Lock()
	defer m.subMu.Unlock()
	id := m.nextSub
	m.nextSub++
	m.subs[id] = fn
	return func() {
		m.subMu.Lock()
		delete(m.subs, id)
		m.subMu.Unlock()
	}
}

// Ignore adds an interface whose routes count as absent (a TUN whose name
// is known only once it is open).
func (m *Monitor) Ignore(name string) {
	if name == "" {
		return
	}
	m.update(func(v view) view {
		if v.ignore[name] {
			return v
		}
		v.ignore = maps.Clone(v.ignore)
		v.ignore[name] = true
		return v
	})
}

// apply makes tab the current reading.
func (m *Monitor) apply(tab *table) {
	m.update(func(v view) view {
		v.tab = tab
		return v
	})
}

// update replaces the view with f's, logs what changed and tells the
// subscribers.
func (m *Monitor) update(f func(view) view) {
	m.applyMu.Lock()
	defer m.applyMu.Unlock()
	old := *m.view.Load()
	v := f(old)
	v.state = v.tab.state(v.ignore)
	m.view.Store(&v)
	if v.tab == nil {
		return
	}
	c := Change{Old: old.state, New: v.state}
	if old.tab == nil {
		m.log.Info("default interface", "ipv4", orNone(v.state.Default4), "ipv6", orNone(v.state.Default6))
	} else {
		for _, v6 := range []bool{false, true} {
			if from, to := c.Old.Default(v6), c.New.Default(v6); from != to {
				m.log.Info("default interface changed", "family", family(v6), "from", orNone(from), "to", orNone(to))
			}
		}
		c.Gone = gone(old.tab, v.tab, old.ignore, v.ignore)
		for _, g := range c.Gone {
			m.log.Debug("interface gone", "interface", g.Interface, "family", family(g.V6), "reason", g.Reason)
		}
	}
	if c.Old == c.New && len(c.Gone) == 0 || m.closing {
		return
	}
	m.subMu.Lock()
	ids := slices.Sorted(maps.Keys(m.subs))
	fns := make([]func(Change), len(ids))
	for i, id := range ids {
		fns[i] = m.subs[id]
	}
	m.subMu.Unlock()
	for _, fn := range fns {
		fn(c)
	}
}

func family(v6 bool) string {
	if v6 {
		return "ipv6"
	}
	return "ipv4"
}

func orNone(name string) string {
	if name == "" {
		return "none"
	}
	return name
}
