package sysroute

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"

	"github.com/tungate/tungate/internal/wal"
)

// kernel is the routing state tungate changes: netlink on Linux, a fake in
// tests. Every rule and route it adds carries ProtoTungate, and every
// delete asks for ProtoTungate, so it can only ever delete tungate's own;
// its nftables table has a name of its own (nftTableName).
type kernel interface {
	AddRoute(route) error
	// DelRoute, DelRule and DelNFTable return an error satisfying
	// errors.Is(err, errNotFound) when there is nothing to delete.
	DelRoute(route) error
	AddRule(rule) error
	DelRule(rule) error
	// AddNFTable creates the table with its chains and rules in one
	// transaction (t.spec says what they are); it fails if a table of that
	// name exists. DelNFTable deletes the table by family and name, with
	// everything in it.
	AddNFTable(t nftTable) error
	DelNFTable(t nftTable) error
	// Rules lists every rule of a family (with Proto set).
	Rules(family) ([]rule, error)
	// Routes lists every route of a family in table (with Proto set).
	Routes(f family, table int) ([]route, error)
	// NetNS identifies the network namespace the kernel handle works in.
	NetNS() string
	Close() error
}

var errNotFound = errors.New("not found")

// Routes is tungate's installed routing state. Close removes it.
//
// Lifecycle: Install → installed → Close → closed (Close again: no-op,
// same result).
type Routes struct {
	log   *slog.Logger
	k     kernel
	j     *journal
	first int // the band's first and last priority
	last  int

	mu     sync.Mutex
	added  []journalEntry // in the order they were made
	closed bool
	err    error
}

// Band returns the first and last priority of tungate's rules.
func (r *Routes) Band() (first, last int) { return r.first, r.last }

// Rules returns the installed rules as `ip rule` shows them, IPv4's
// first, each family's by priority.
func (r *Routes) Rules() []string {
	r.mu.Lock()
	var rules []rule
	for _, e := range r.added {
		if e.Rule != nil {
			rules = append(rules, *e.Rule)
		}
	}
	r.mu.Unlock()
	slices.SortFunc(rules, func(a, b rule) int {
		if a.Family != b.Family {
			return int(a.Family - b.Family)
		}
		return a.Priority - b.Priority
	})
	out := make([]string, len(rules))
	for i, ru := range rules {
		out[i] = fmt.Sprintf("%s %s", ru.Family, ru)
	}
	return out
}

// install is Install on a given kernel.
func install(c Config, k kernel, log *slog.Logger) (*Routes, error) {
	routes, rules, err := plan(c)
	if err != nil {
		return nil, err
	}
	// Cgroups are looked up before anything changes: a missing one fails
	// the start with nothing to undo.
	table, err := cgroupTable(c)
	if err != nil {
		return nil, err
	}
	j, err := openJournal(c.Journal)
	if err != nil {
		return nil, err
	}
	if _, err := cleanLocked(c, k, j, log); err != nil {
		j.Close()
		return nil, err
	}
	first, last := c.Priority, c.Priority
	for _, ru := range rules {
		last = max(last, ru.Priority)
	}
	if err := checkConflicts(c, k, rules, first, last); err != nil {
		j.Remove()
		return nil, err
	}
	r := &Routes{log: log, k: k, j: j, first: first, last: last}
	err = j.Append(record{Op: wal.OpBegin, PID: os.Getpid(), NetNS: k.NetNS(), Table: c.Table, First: first, Last: last})
	if err == nil && table != nil {
		// Before the rules: marks that no rule looks at yet change
		// nothing, and every exception is in place before the catch-all.
		err = r.add(journalEntry{NFTable: table})
	}
	for i := 0; err == nil && i < len(routes); i++ {
		err = r.add(journalEntry{Route: &routes[i]})
	}
	for _, ru := range addOrder(rules) {
		if err != nil {
			break
		}
		err = r.add(journalEntry{Rule: &ru})
	}
	if err != nil {
		if uerr := r.Close(); uerr != nil {
			log.Error("auto-route: undoing a failed install", "err", uerr, "journal", c.Journal)
		}
		return nil, err
	}
	if table != nil {
		logCgroups(log, table)
	}
	return r, nil
}

// addOrder returns rules in the order to add them: per family the band's
// end (the goto target) first, so that every goto resolves as soon as it
// exists, then the others by priority, so that the catch-all into the TUN
// comes last and traffic enters the TUN only once every exception is in
// place. Removal is the reverse.
func addOrder(rules []rule) []rule {
	out := make([]rule, 0, len(rules))
	for start := 0; start < len(rules); {
		end := start
		for end < len(rules) && rules[end].Family == rules[start].Family {
			end++
		}
		band := rules[start:end]
		out = append(out, band[len(band)-1])
		out = append(out, band[:len(band)-1]...)
		start = end
	}
	return out
}

// add journals e, then makes it.
func (r *Routes) add(e journalEntry) error {
	seq, err := r.j.add(e)
	if err != nil {
		return err
	}
	switch {
	case e.Route != nil:
		err = r.k.AddRoute(*e.Route)
	case e.Rule != nil:
		err = r.k.AddRule(*e.Rule)
	default:
		err = r.k.AddNFTable(*e.NFTable)
	}
	if err != nil {
		// Not made, so not ours to delete later (an identical object may
		// belong to someone else).
		if aerr := r.j.abort(seq); aerr != nil {
			r.log.Warn("auto-route: journal", "err", aerr)
		}
		return fmt.Errorf("auto-route: add %s: %w", e, err)
	}
	r.mu.Lock()
	r.added = append(r.added, e)
	r.mu.Unlock()
	r.log.Debug("auto-route: added", "what", e.String())
	return nil
}

// Close removes every rule and route Install made, and its nftables table,
// newest first, then the journal. Objects already gone (the TUN's routes
// vanish with the device) are not an error. If something cannot be removed, the journal stays for
// the next start or `tungate cleanup`, and the error says what. Close is
// idempotent: later calls return the first call's result.
func (r *Routes) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return r.err
	}
	r.closed = true
	errs := undo(r.k, r.added, r.log)
	if len(errs) == 0 {
		if err := r.j.Remove(); err != nil {
			errs = append(errs, err)
		}
	} else {
		r.j.Close()
		errs = append(errs, fmt.Errorf("the journal %s keeps what is left: `tungate cleanup` removes it", r.j.Path()))
	}
	r.k.Close()
	r.err = errors.Join(errs...)
	return r.err
}

// undo deletes entries newest first (logging each at debug level) and
// returns what failed; objects already gone are not failures.
func undo(k kernel, entries []journalEntry, log *slog.Logger) []error {
	var errs []error
	for _, e := range slices.Backward(entries) {
		err := delEntry(k, e)
		switch {
		case err == nil:
			log.Debug("auto-route: removed", "what", e.String())
		case errors.Is(err, errNotFound):
			log.Debug("auto-route: already gone", "what", e.String())
		default:
			errs = append(errs, fmt.Errorf("auto-route: remove %s: %w", e, err))
		}
	}
	return errs
}

// delEntry deletes the object of e.
func delEntry(k kernel, e journalEntry) error {
	switch {
	case e.Route != nil:
		return k.DelRoute(*e.Route)
	case e.Rule != nil:
		return k.DelRule(*e.Rule)
	default:
		return k.DelNFTable(*e.NFTable)
	}
}

// cleanLocked removes what an earlier run left: first the objects its
// journal lists, then (a safety net for a lost journal) any rule tagged
// ProtoTungate in the band, any route tagged ProtoTungate in the table and
// the nftables table named after it.
// It empties the journal and returns how many objects it removed.
func cleanLocked(c Config, k kernel, j *journal, log *slog.Logger) (int, error) {
	data, err := j.Read()
	if err != nil {
		return 0, fmt.Errorf("route.journal %s: %w", j.Path(), err)
	}
	pj := parseJournal(data)
	for _, p := range pj.Problems {
		log.Warn("auto-route: skipping a damaged journal line", "journal", j.Path(), "problem", p)
	}
	removed := 0
	entries := pj.Entries
	if pj.Begin != nil && pj.Begin.NetNS != "" && pj.Begin.NetNS != k.NetNS() {
		// Another namespace's state: not ours to touch from here (and
		// gone with the namespace if that was deleted).
		log.Warn("auto-route: the journal was written in another network namespace; leaving its entries alone",
			"journal", j.Path(), "journal_netns", pj.Begin.NetNS, "netns", k.NetNS(), "entries", len(entries))
		entries = nil
	}
	entries = slices.DeleteFunc(entries, func(e journalEntry) bool {
		if ownedEntry(e, pj.Begin) {
			return false
		}
		log.Warn("auto-route: journal entry outside tungate's band or table; leaving it alone", "what", e.String())
		return true
	})
	var errs []error
	for _, e := range slices.Backward(entries) {
		err := delEntry(k, e)
		switch {
		case err == nil:
			removed++
			log.Info("auto-route: removed a leftover of an earlier run", "what", e.String())
		case errors.Is(err, errNotFound):
		default:
			errs = append(errs, fmt.Errorf("remove leftover %s: %w", e, err))
		}
	}
	n, err := sweep(c, k, log)
	removed += n
	if err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return removed, fmt.Errorf("auto-route: cleaning up after an earlier run: %w", errors.Join(errs...))
	}
	return removed, j.Reset()
}

// ownedEntry checks that a journal entry is within the band and table its
// run recorded (a guard against a damaged or foreign file).
func ownedEntry(e journalEntry, begin *record) bool {
	if begin == nil {
		return e.NFTable == nil || e.NFTable.owned(0)
	}
	if e.Route != nil {
		return e.Route.Table == begin.Table
	}
	if e.NFTable != nil {
		return e.NFTable.owned(begin.Table)
	}
	ru := e.Rule
	if ru.Priority < begin.First || ru.Priority > begin.Last {
		return false
	}
	return ru.Table == 0 || ru.Table == begin.Table || ru.Table == tableMain
}

// sweep deletes what carries tungate's tag within c's band and table, and
// the nftables table named after c's table.
func sweep(c Config, k kernel, log *slog.Logger) (int, error) {
	first, last := sweepBand(c)
	removed := 0
	var errs []error
	for _, f := range []family{4, 6} {
		rules, err := k.Rules(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("list %s rules: %w", f, err))
			continue
		}
		for _, ru := range rules {
			if ru.Proto != ProtoTungate || ru.Priority < first || ru.Priority > last {
				continue
			}
			if ru.Table != 0 && ru.Table != c.Table && ru.Table != tableMain {
				continue
			}
			if err := k.DelRule(ru); err != nil && !errors.Is(err, errNotFound) {
				errs = append(errs, fmt.Errorf("remove leftover rule %s: %w", ru, err))
				continue
			}
			removed++
			log.Info("auto-route: removed a leftover rule of an earlier run", "family", f, "rule", ru.String())
		}
		routes, err := k.Routes(f, c.Table)
		if err != nil {
			errs = append(errs, fmt.Errorf("list %s routes of table %d: %w", f, c.Table, err))
			continue
		}
		for _, rt := range routes {
			if rt.Proto != ProtoTungate {
				continue
			}
			if err := k.DelRoute(rt); err != nil && !errors.Is(err, errNotFound) {
				errs = append(errs, fmt.Errorf("remove leftover route %s: %w", rt, err))
				continue
			}
			removed++
			log.Info("auto-route: removed a leftover route of an earlier run", "family", f, "route", rt.String())
		}
	}
	// The table last, as it was made first.
	nt := nftTable{Family: nftFamily, Name: nftTableName(c.Table)}
	switch err := k.DelNFTable(nt); {
	case err == nil:
		removed++
		log.Info("auto-route: removed a leftover nftables table of an earlier run", "table", nt.String())
	case errors.Is(err, errNotFound):
	default:
		errs = append(errs, fmt.Errorf("remove leftover %s: %w", nt, err))
	}
	return removed, errors.Join(errs...)
}

// checkConflicts refuses to install over someone else's state: a rule in
// tungate's band (its gotos would land on it) or a route in its table.
func checkConflicts(c Config, k kernel, rules []rule, first, last int) error {
	fams := map[family]bool{}
	for _, ru := range rules {
		fams[ru.Family] = true
	}
	for _, f := range []family{4, 6} {
		if !fams[f] {
			continue
		}
		existing, err := k.Rules(f)
		if err != nil {
			return fmt.Errorf("auto-route: list %s rules: %w", f, err)
		}
		for _, ru := range existing {
			if ru.Priority >= first && ru.Priority <= last {
				return fmt.Errorf("route.priority: %s rule %q is in tungate's band %d-%d; choose another route.priority", f, ru.String(), first, last)
			}
		}
		routes, err := k.Routes(f, c.Table)
		if err != nil {
			return fmt.Errorf("auto-route: list %s routes of table %d: %w", f, c.Table, err)
		}
		if len(routes) > 0 {
			return fmt.Errorf("route.table: table %d already has %s routes that are not tungate's (%q); choose another route.table", c.Table, f, routes[0].String())
		}
	}
	return nil
}

// cleanup is Cleanup on a given kernel.
func cleanup(c Config, k kernel, log *slog.Logger) (int, error) {
	if c.Journal == "" {
		return 0, errors.New("route.journal must be set")
	}
	if c.Priority <= 0 || c.Priority > lastPriority || c.Table <= 0 {
		return 0, fmt.Errorf("route.priority %d / route.table %d: invalid", c.Priority, c.Table)
	}
	if _, err := os.Stat(c.Journal); errors.Is(err, os.ErrNotExist) {
		// No journal: only the sweep by tag.
		return sweep(c, k, log)
	}
	j, err := openJournal(c.Journal)
	if err != nil {
		return 0, err
	}
	n, err := cleanLocked(c, k, j, log)
	if err != nil {
		j.Close()
		return n, err
	}
	return n, j.Remove()
}
