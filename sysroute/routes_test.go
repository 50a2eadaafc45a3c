package sysroute

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tungate/tungate/internal/testlog"
	"github.com/tungate/tungate/internal/wal"
)

// fakeKernel keeps rules and routes in memory with the kernel's matching:
// a delete names an object by its fields and must find it.
type fakeKernel struct {
	t       *testing.T
	journal string // when set, every add checks that it was journaled first
	ns      string

	rules  []rule
	routes []route
	tables []nftTable
	// failAdd makes the n-th add (1-based, rules and routes counted
	// together) fail; failDel makes deletes of matching objects fail.
	failAdd int
	adds    int
	failDel func(what string) bool
	log     []string
}

func newFakeKernel(t *testing.T) *fakeKernel { return &fakeKernel{t: t, ns: "1:1"} }

// checkJournaled fails the test unless the journal's last line is the add
// record of what is being added (the write-ahead rule).
func (k *fakeKernel) checkJournaled(rt *route, ru *rule, nt ...*nftTable) {
	if k.journal == "" {
		return
	}
	data, err := os.ReadFile(k.journal)
	if err != nil {
		k.t.Errorf("journal unreadable during an add: %v", err)
		return
	}
	lines := bytes.Split(bytes.TrimSuffix(data, []byte{'\n'}), []byte{'\n'})
	var rec record
	if err := json.Unmarshal(lines[len(lines)-1], &rec); err != nil {
		k.t.Errorf("journal's last line %q: %v", lines[len(lines)-1], err)
		return
	}
	want := record{Op: wal.OpAdd, Seq: rec.Seq, Route: rt, Rule: ru}
	if len(nt) > 0 {
		want.NFTable = nt[0]
	}
	got, _ := json.Marshal(rec)
	w, _ := json.Marshal(want)
	if !bytes.Equal(got, w) {
		k.t.Errorf("adding %v %v: the journal's last line is %s, want %s", rt, ru, got, w)
	}
}

func (k *fakeKernel) addFails() bool {
	k.adds++
	return k.failAdd == k.adds
}

func (k *fakeKernel) AddRoute(r route) error {
	k.checkJournaled(&r, nil)
	if k.addFails() {
		return errors.New("injected failure")
	}
	for _, o := range k.routes {
		if o.Family == r.Family && o.Table == r.Table && o.To == r.To {
			return errors.New("file exists")
		}
	}
	r.Proto = ProtoTungate
	k.routes = append(k.routes, r)
	k.log = append(k.log, "add route "+r.String())
	return nil
}

func (k *fakeKernel) DelRoute(r route) error {
	if k.failDel != nil && k.failDel(r.String()) {
		return errors.New("injected failure")
	}
	for i, o := range k.routes {
		if o.Family == r.Family && o.Table == r.Table && o.To == r.To && o.Type == r.Type && o.Proto == ProtoTungate {
			k.routes = slices.Delete(k.routes, i, i+1)
			k.log = append(k.log, "del route "+r.String())
			return nil
		}
	}
	return fmt.Errorf("%w: no such route", errNotFound)
}

func (k *fakeKernel) AddRule(r rule) error {
	k.checkJournaled(nil, &r)
	if k.addFails() {
		return errors.New("injected failure")
	}
	r.Proto, r.Why = ProtoTungate, ""
	k.rules = append(k.rules, r)
	k.log = append(k.log, fmt.Sprintf("add rule %s %s", r.Family, r))
	return nil
}

func (k *fakeKernel) DelRule(r rule) error {
	if k.failDel != nil && k.failDel(r.String()) {
		return errors.New("injected failure")
	}
	for i, o := range k.rules {
		if o.Family == r.Family && o.Priority == r.Priority && o.Proto == ProtoTungate && o.Action == r.Action && o.Table == r.Table {
			k.rules = slices.Delete(k.rules, i, i+1)
			k.log = append(k.log, fmt.Sprintf("del rule %s %s", r.Family, r))
			return nil
		}
	}
	return fmt.Errorf("%w: no such rule", errNotFound)
}

func (k *fakeKernel) AddNFTable(t nftTable) error {
	k.checkJournaled(nil, nil, &t)
	if k.addFails() {
		return errors.New("injected failure")
	}
	if t.spec == nil {
		k.t.Errorf("AddNFTable(%s) without a spec", t)
	}
	for _, o := range k.tables {
		if o.Family == t.Family && o.Name == t.Name {
			return errors.New("file exists")
		}
	}
	t.spec = nil
	k.tables = append(k.tables, t)
	k.log = append(k.log, "add "+t.String())
	return nil
}

func (k *fakeKernel) DelNFTable(t nftTable) error {
	if k.failDel != nil && k.failDel(t.String()) {
		return errors.New("injected failure")
	}
	for i, o := range k.tables {
		if o.Family == t.Family && o.Name == t.Name {
			k.tables = slices.Delete(k.tables, i, i+1)
			k.log = append(k.log, "del "+t.String())
			return nil
		}
	}
	return fmt.Errorf("%w: no such table", errNotFound)
}

func (k *fakeKernel) Rules(f family) ([]rule, error) {
	var out []rule
	for _, r := range k.rules {
		if r.Family == f {
			out = append(out, r)
		}
	}
	return out, nil
}

func (k *fakeKernel) Routes(f family, table int) ([]route, error) {
	var out []route
	for _, r := range k.routes {
		if r.Family == f && r.Table == table {
			out = append(out, r)
		}
	}
	return out, nil
}

func (k *fakeKernel) NetNS() string { return k.ns }
func (k *fakeKernel) Close() error  { return nil }

func (k *fakeKernel) state() string {
	var b strings.Builder
	for _, r := range k.routes {
		fmt.Fprintf(&b, "route %s %s proto %d\n", r.Family, r, r.Proto)
	}
	for _, r := range k.rules {
		fmt.Fprintf(&b, "rule %s %s proto %d\n", r.Family, r, r.Proto)
	}
	for _, t := range k.tables {
		fmt.Fprintf(&b, "%s\n", t)
	}
	return b.String()
}

func testLogger(*testing.T) (*slog.Logger, *testlog.Buffer) { return testlog.New() }

func journalConfig(t *testing.T) Config {
	c := baseConfig()
	c.Journal = filepath.Join(t.TempDir(), "run", "route.journal")
	return c
}

func TestInstallJournalsBeforeEachChangeAndCloseUndoes(t *testing.T) {
	c := journalConfig(t)
	k := newFakeKernel(t)
	k.journal = c.Journal
	log, _ := testLogger(t)
	r, err := install(c, k, log)
	if err != nil {
		t.Fatalf("install: %v", err)
	}
	if len(k.routes) != 2 || len(k.rules) != 8 {
		t.Fatalf("after install:\n%s", k.state())
	}
	if first, last := r.Band(); first != 9000 || last != 9003 {
		t.Errorf("Band() = %d-%d, want 9000-9003", first, last)
	}
	wantRules := both(
		"9000: from all fwmark 0x2e7 goto 9003",
		"9001: from all lookup main suppress_prefixlength 0",
		"9002: from all lookup 2022",
		"9003: from all nop",
	)
	if got := r.Rules(); !slices.Equal(got, wantRules) {
		t.Errorf("Rules() =\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(wantRules, "\n"))
	}
	// Another run sharing the journal must not start while this one
	// lives.
	if _, err := install(c, newFakeKernel(t), log); !errors.Is(err, ErrJournalBusy) {
		t.Errorf("second install on the same journal: %v, want ErrJournalBusy", err)
	}
	adds := slices.Clone(k.log)
	k.log = nil
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if k.state() != "" {
		t.Errorf("after Close:\n%s", k.state())
	}
	// Exactly the reverse of the adds.
	var want []string
	for _, a := range slices.Backward(adds) {
		want = append(want, "del"+strings.TrimPrefix(a, "add"))
	}
	if !slices.Equal(k.log, want) {
		t.Errorf("Close removed, in order:\n%s\nwant:\n%s", strings.Join(k.log, "\n"), strings.Join(want, "\n"))
	}
	if _, err := os.Stat(c.Journal); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("journal after Close: %v, want it removed", err)
	}
	if err := r.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestInstallFailureLeavesNothing(t *testing.T) {
	testInstallFailureLeavesNothing(t, 10, journalConfig)
}

// testInstallFailureLeavesNothing fails each of the first adds kernel adds
// of install(config(t)) in turn and checks that nothing is left behind.
func testInstallFailureLeavesNothing(t *testing.T, adds int, config func(*testing.T) Config) {
	for fail := 1; fail <= adds; fail++ {
		t.Run(fmt.Sprint("add ", fail, " fails"), func(t *testing.T) {
			c := config(t)
			k := newFakeKernel(t)
			k.failAdd = fail
			log, _ := testLogger(t)
			if _, err := install(c, k, log); err == nil || !strings.Contains(err.Error(), "injected failure") {
				t.Fatalf("install: %v, want the injected failure", err)
			}
			if k.state() != "" {
				t.Errorf("left behind:\n%s", k.state())
			}
			if _, err := os.Stat(c.Journal); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("journal after a failed install: %v, want it removed", err)
			}
		})
	}
}

// crash simulates SIGKILL: the process's files close, nothing is undone.
func crash(r *Routes) { r.j.Close() }

func TestLeftoversRemovedAtNextInstall(t *testing.T) {
	c := journalConfig(t)
	c.Strict = true
	c.TunAddrs = prefixes("172.19.0.1/30")
	k := newFakeKernel(t)
	log, logs := testLogger(t)
	r, err := install(c, k, log)
	if err != nil {
		t.Fatal(err)
	}
	installed := k.state()
	crash(r)
	// The TUN's route goes with the device when the process dies.
	k.routes = slices.DeleteFunc(k.routes, func(r route) bool { return r.Type == rtDev })

	r2, err := install(c, k, log)
	if err != nil {
		t.Fatalf("install after a crash: %v\n%s", err, logs)
	}
	if k.state() != installed {
		t.Errorf("after the second install:\n%s\nwant the same as the first:\n%s", k.state(), installed)
	}
	if !strings.Contains(logs.String(), "removed a leftover of an earlier run") {
		t.Errorf("log does not mention the leftovers:\n%s", logs)
	}
	if err := r2.Close(); err != nil {
		t.Fatal(err)
	}
	if k.state() != "" {
		t.Errorf("after Close:\n%s", k.state())
	}
}

func TestCleanupAfterCrash(t *testing.T) {
	c := journalConfig(t)
	k := newFakeKernel(t)
	log, _ := testLogger(t)
	r, err := install(c, k, log)
	if err != nil {
		t.Fatal(err)
	}
	crash(r)
	n, err := cleanup(c, k, log)
	if err != nil {
		t.Fatalf("cleanup: %v", err)
	}
	if n != 10 || k.state() != "" {
		t.Errorf("cleanup removed %d, left:\n%s", n, k.state())
	}
	if _, err := os.Stat(c.Journal); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("journal after cleanup: %v, want it removed", err)
	}
	// Nothing left, no journal: still fine.
	if n, err := cleanup(c, k, log); err != nil || n != 0 {
		t.Errorf("cleanup again = %d, %v; want 0, nil", n, err)
	}
}

func TestCloseKeepsJournalWhenRemovalFails(t *testing.T) {
	c := journalConfig(t)
	k := newFakeKernel(t)
	log, _ := testLogger(t)
	r, err := install(c, k, log)
	if err != nil {
		t.Fatal(err)
	}
	k.failDel = func(what string) bool { return strings.Contains(what, "suppress_prefixlength") }
	err = r.Close()
	if err == nil || !strings.Contains(err.Error(), "tungate cleanup") {
		t.Fatalf("Close: %v, want an error pointing at tungate cleanup", err)
	}
	if err2 := r.Close(); err2 == nil || err2.Error() != err.Error() {
		t.Errorf("second Close = %v, want the first result again", err2)
	}
	if _, err := os.Stat(c.Journal); err != nil {
		t.Fatalf("journal after a failed Close: %v, want it kept", err)
	}
	k.failDel = nil
	if _, err := cleanup(c, k, log); err != nil {
		t.Fatal(err)
	}
	if k.state() != "" {
		t.Errorf("after cleanup:\n%s", k.state())
	}
}

// writeJournal writes records (and then raw, e.g. a torn line).
func writeJournal(t *testing.T, path string, recs []record, raw string) {
	t.Helper()
	var b bytes.Buffer
	for _, r := range recs {
		line, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		b.Write(line)
		b.WriteByte('\n')
	}
	b.WriteString(raw)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestReplay(t *testing.T) {
	c := journalConfig(t)
	k := newFakeKernel(t)
	_, rules, _ := plan(c)
	rt := route{Family: 4, Table: 2022, To: defaultPrefix(4), Type: rtUnreachable}
	// The state a killed run left: a route, three rules, and one rule it
	// never got to add.
	k.routes = []route{{Family: 4, Table: 2022, To: rt.To, Type: rtUnreachable, Proto: ProtoTungate}}
	for _, ru := range rules[:3] {
		ru.Proto = ProtoTungate
		k.rules = append(k.rules, ru)
	}
	// Someone else's rule, identical to one whose add failed.
	foreign := rules[3]
	foreign.Proto = ProtoTungate
	k.rules = append(k.rules, foreign)

	begin := record{Op: wal.OpBegin, PID: 1, NetNS: "1:1", Table: 2022, First: 9000, Last: 9003}
	recs := []record{begin, {Op: wal.OpAdd, Seq: 1, Route: &rt}}
	for i := range 3 {
		recs = append(recs, record{Op: wal.OpAdd, Seq: 2 + i, Rule: &rules[i]})
	}
	recs = append(recs, record{Op: wal.OpAdd, Seq: 5, Rule: &rules[3]}, record{Op: wal.OpAbort, Seq: 5})
	// Written ahead, never made: deleting it finds nothing.
	recs = append(recs, record{Op: wal.OpAdd, Seq: 6, Rule: &rules[4]})
	torn := `{"op":"add","seq":7,"rule":{"family":6,"prio`
	writeJournal(t, c.Journal, recs, torn)

	j, err := openJournal(c.Journal)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	log, logs := testLogger(t)
	// Keep the sweep (by tag, in the configured band) out of the way so
	// that only the journal removes.
	c2 := c
	c2.Priority = 20000
	n, err := cleanLocked(c2, k, j, log)
	if err != nil {
		t.Fatalf("cleanLocked: %v", err)
	}
	if n != 4 {
		t.Errorf("removed %d objects, want 4 (the route and three rules)", n)
	}
	want := fmt.Sprintf("rule ipv4 %s proto %d\n", foreign, ProtoTungate)
	if k.state() != want {
		t.Errorf("left:\n%s\nwant only the rule whose add was aborted:\n%s", k.state(), want)
	}
	wantOrder := []string{
		"del rule ipv4 " + rules[2].String(),
		"del rule ipv4 " + rules[1].String(),
		"del rule ipv4 " + rules[0].String(),
		"del route " + rt.String(),
	}
	if !slices.Equal(k.log, wantOrder) {
		t.Errorf("replay order:\n%s\nwant newest first:\n%s", strings.Join(k.log, "\n"), strings.Join(wantOrder, "\n"))
	}
	if strings.Contains(logs.String(), "damaged") {
		t.Errorf("a torn last line was reported as damage:\n%s", logs)
	}
	if data, _ := os.ReadFile(c.Journal); len(data) != 0 {
		t.Errorf("journal after replay = %q, want it emptied", data)
	}
}

func TestParseJournal(t *testing.T) {
	ru := rule{Family: 4, Priority: 9000, Action: actNop}
	good := func(seq int) string {
		b, _ := json.Marshal(record{Op: wal.OpAdd, Seq: seq, Rule: &ru})
		return string(b) + "\n"
	}
	tests := []struct {
		name     string
		data     string
		entries  int
		problems int
	}{
		{"empty", "", 0, 0},
		{"complete", good(1) + good(2), 2, 0},
		{"torn last line ignored", good(1) + `{"op":"ad`, 1, 0},
		{"torn last line that happens to parse ignored", good(1) + strings.TrimSuffix(good(2), "\n"), 1, 0},
		{"damaged middle line skipped and reported", good(1) + "garbage\n" + good(3), 2, 1},
		{"add without object", `{"op":"add","seq":1}` + "\n", 0, 1},
		{"unknown op", `{"op":"frobnicate"}` + "\n", 0, 1},
		{"abort cancels", good(1) + good(2) + `{"op":"abort","seq":2}` + "\n", 1, 0},
		{"blank lines", "\n\n" + good(1), 1, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := parseJournal([]byte(tc.data))
			if len(p.Entries) != tc.entries || len(p.Problems) != tc.problems {
				t.Errorf("parseJournal = %d entries, problems %q; want %d entries, %d problems", len(p.Entries), p.Problems, tc.entries, tc.problems)
			}
		})
	}
}

func TestReplayLeavesForeignEntriesAlone(t *testing.T) {
	c := journalConfig(t)
	inBand := rule{Family: 4, Priority: 9001, Action: actLookup, Table: 2022}
	outside := rule{Family: 4, Priority: 100, Action: actLookup, Table: 2022}
	otherTable := route{Family: 4, Table: 254, To: defaultPrefix(4), Type: rtUnreachable}
	tests := []struct {
		name  string
		netns string
		want  int // removed
	}{
		{"same namespace: only the in-band rule", "1:1", 1},
		{"another namespace: nothing", "9:9", 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			k := newFakeKernel(t)
			for _, ru := range []rule{inBand, outside} {
				ru.Proto = ProtoTungate
				k.rules = append(k.rules, ru)
			}
			ot := otherTable
			ot.Proto = ProtoTungate
			k.routes = append(k.routes, ot)
			writeJournal(t, c.Journal, []record{
				{Op: wal.OpBegin, NetNS: tc.netns, Table: 2022, First: 9000, Last: 9003},
				{Op: wal.OpAdd, Seq: 1, Route: &otherTable},
				{Op: wal.OpAdd, Seq: 2, Rule: &outside},
				{Op: wal.OpAdd, Seq: 3, Rule: &inBand},
			}, "")
			j, err := openJournal(c.Journal)
			if err != nil {
				t.Fatal(err)
			}
			defer j.Close()
			c2 := c
			c2.Priority = 20000 // keep the sweep away
			log, _ := testLogger(t)
			n, err := cleanLocked(c2, k, j, log)
			if err != nil || n != tc.want {
				t.Fatalf("cleanLocked = %d, %v; want %d", n, err, tc.want)
			}
		})
	}
}

func TestSweepAndConflicts(t *testing.T) {
	c := journalConfig(t)
	k := newFakeKernel(t)
	// A leftover of ours (no journal), a foreign rule in the band, a
	// tagged rule of another table, and someone's route in our table.
	k.rules = []rule{
		{Family: 6, Priority: 9002, Action: actLookup, Table: 2022, Proto: ProtoTungate},
		{Family: 4, Priority: 9001, Action: actLookup, Table: 100, Proto: 4},
		{Family: 4, Priority: 9002, Action: actLookup, Table: 77, Proto: ProtoTungate},
	}
	log, _ := testLogger(t)
	_, err := install(c, k, log)
	if err == nil || !strings.Contains(err.Error(), "route.priority") || !strings.Contains(err.Error(), "lookup 100") {
		t.Fatalf("install over a foreign rule in the band: %v, want a route.priority error naming it", err)
	}
	if len(k.rules) != 2 || k.rules[0].Table != 100 || k.rules[1].Table != 77 {
		t.Errorf("after the refused install:\n%s\nwant only the two foreign rules", k.state())
	}
	k.rules = nil
	k.routes = []route{{Family: 6, Table: 2022, To: prefixes("2001:db8::/32")[0], Type: rtDev, Dev: "wg0", Proto: 4}}
	_, err = install(c, k, log)
	if err == nil || !strings.Contains(err.Error(), "route.table") {
		t.Fatalf("install into a table with foreign routes: %v, want a route.table error", err)
	}
	k.routes = nil
	r, err := install(c, k, log)
	if err != nil {
		t.Fatalf("install: %v", err)
	}
	r.Close()
}
