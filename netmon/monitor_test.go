package netmon

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
)

// logRecorder keeps the messages logged at Info and above.
type logRecorder struct {
	mu   sync.Mutex
	msgs []string
}

func (r *logRecorder) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelInfo }
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler           { return r }
func (r *logRecorder) WithGroup(string) slog.Handler                { return r }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	var b strings.Builder
	b.WriteString(rec.Message)
	rec.Attrs(func(a slog.Attr) bool {
		b.WriteString(" " + a.String())
		return true
	})
	r.mu.Lock()
	r.msgs = append(r.msgs, b.String())
	r.mu.Unlock()
	return nil
}

func (r *logRecorder) take() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.msgs
	r.msgs = nil
	return m
}

// TestMonitorApply drives a Monitor through a sequence of kernel states
// as the watch loop would, and checks what subscribers see and what is
// logged.
func TestMonitorApply(t *testing.T) {
	rec := &logRecorder{}
	m := New(Config{Ignore: []string{"tungate0"}}, slog.New(rec))
	var changes []Change
	cancel := m.Subscribe(func(c Change) { changes = append(changes, c) })
	defer cancel()
	step := func(what string, tab *table, wantLog []string, want ...Change) {
		t.Helper()
		changes = nil
		m.apply(tab)
		if !slices.EqualFunc(changes, want, func(a, b Change) bool {
			return a.Old == b.Old && a.New == b.New && slices.Equal(a.Gone, b.Gone)
		}) {
			t.Errorf("%s: changes %+v, want %+v", what, changes, want)
		}
		if got := rec.take(); !slices.Equal(got, wantLog) {
			t.Errorf("%s: logged %q, want %q", what, got, wantLog)
		}
	}

	if got := m.InterfaceFor(netip.MustParseAddr("1.1.1.1")); got != "" {
		t.Errorf("before the first reading: InterfaceFor = %q", got)
	}
	both := State{Default4: "eth0", Default6: "eth0"}
	eth0 := []route{rt("0.0.0.0/0", 100, ixEth0), rt("192.168.0.0/24", 100, ixEth0), rt("::/0", 1024, ixEth0), rt("2001:db8::/64", 256, ixEth0)}
	step("first reading", newTable(testLinks(), eth0),
		[]string{"default interface ipv4=eth0 ipv6=eth0"},
		Change{New: both})
	if got := m.InterfaceFor(netip.MustParseAddr("1.1.1.1")); got != "eth0" {
		t.Errorf("InterfaceFor(1.1.1.1) = %q, want eth0", got)
	}

	step("the same again", newTable(testLinks(), eth0), nil)

	// wlan0 comes up with a better IPv4 default; eth0 keeps its own.
	withWlan := append(slices.Clone(eth0), rt("0.0.0.0/0", 50, ixWlan0), rt("10.1.0.0/24", 50, ixWlan0))
	moved := State{Default4: "wlan0", Default6: "eth0"}
	step("a better default appears", newTable(testLinks(), withWlan),
		[]string{"default interface changed family=ipv4 from=eth0 to=wlan0"},
		Change{Old: both, New: moved})
	if got, want := m.Default(false), "wlan0"; got != want {
		t.Errorf("Default(IPv4) = %q, want %q", got, want)
	}

	// A default into the TUN changes nothing.
	withTun := append(slices.Clone(withWlan), rt("0.0.0.0/0", 0, ixTun), rt("::/0", 0, ixTun))
	step("a default into the TUN", newTable(testLinks(), withTun), nil)

	// eth0 deleted: IPv6 has no default left, both of eth0's families
	// are gone.
	var noEth0 []route
	for _, r := range withTun {
		if !slices.Contains(r.links, ixEth0) {
			noEth0 = append(noEth0, r)
		}
	}
	links := slices.DeleteFunc(testLinks(), func(l link) bool { return l.name == "eth0" })
	step("eth0 deleted", newTable(links, noEth0),
		[]string{"default interface changed family=ipv6 from=eth0 to=none"},
		Change{Old: moved, New: State{Default4: "wlan0"}, Gone: []Gone{{"eth0", false, ReasonDeleted}, {"eth0", true, ReasonDeleted}}})

	// Ignoring wlan0 from now on (as if it were the TUN) re-evaluates at
	// once, and is not reported as gone.
	changes = nil
	m.Ignore("wlan0")
	if len(changes) != 1 || changes[0].New != (State{}) || len(changes[0].Gone) != 0 {
		t.Errorf("Ignore(wlan0): changes %+v, want one to no default and nothing gone", changes)
	}
	rec.take()

	cancel()
	changes = nil
	step("after cancel", newTable(testLinks(), eth0), []string{
		"default interface changed family=ipv4 from=none to=eth0",
		"default interface changed family=ipv6 from=none to=eth0",
	})
	if changes != nil {
		t.Errorf("a cancelled subscriber was called: %+v", changes)
	}
}

func TestMonitorLifecycle(t *testing.T) {
	m := New(Config{}, nil)
	if err := m.Close(); err != nil {
		t.Fatalf("Close before Start: %v", err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := m.Start(); err == nil {
		t.Fatal("Start after Close succeeded")
	}
	if runtime.GOOS != "linux" {
		m := New(Config{}, nil)
		if err := m.Start(); !errors.Is(err, ErrNotSupported) {
			t.Fatalf("Start on %s: %v, want ErrNotSupported", runtime.GOOS, err)
		}
		if got := m.Default(false); got != "" {
			t.Errorf("Default = %q, want none", got)
		}
		m.Close()
	}
}

// TestNoCallbackAfterClose: once Close has returned, nothing reaches a
// subscriber, whatever changes.
func TestNoCallbackAfterClose(t *testing.T) {
	m := New(Config{}, nil)
	calls := 0
	m.Subscribe(func(Change) { calls++ })
	m.apply(newTable(testLinks(), []route{rt("0.0.0.0/0", 0, ixEth0)}))
	if calls != 1 {
		t.Fatalf("%d calls for the first reading, want 1", calls)
	}
	m.Close()
	m.Ignore("eth0")
	m.apply(newTable(testLinks(), nil))
	if calls != 1 {
		t.Errorf("%d calls after Close, want none", calls-1)
	}
	if got := m.Default(false); got != "" {
		t.Errorf("Default after eth0 is ignored = %q, want none", got)
	}
}
