package leakcheck

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// recordingTB captures what Check registers and reports, so that the check
// itself can be run and its verdict inspected.
type recordingTB struct {
	testing.TB
	cleanups []func()
	errors   []string
}

func (r *recordingTB) Helper()          {}
func (r *recordingTB) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }
func (r *recordingTB) Errorf(f string, args ...any) {
	r.errors = append(r.errors, fmt.Sprintf(f, args...))
}

func (r *recordingTB) runCleanups() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
	r.cleanups = nil
}

func leakyWorker(stop <-chan struct{}) { <-stop }

func TestCheckReportsLeakedGoroutine(t *testing.T) {
	defer func(w time.Duration) { wait = w }(wait)
	wait = 200 * time.Millisecond

	tb := &recordingTB{TB: t}
	Check(tb)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { defer close(done); leakyWorker(stop) }()
	tb.runCleanups()
	close(stop)
	<-done
	if len(tb.errors) != 1 {
		t.Fatalf("Check with a goroutine left running: got %d errors, want 1", len(tb.errors))
	}
	if !strings.Contains(tb.errors[0], "leakyWorker") {
		t.Errorf("Check's report does not name the leaked goroutine's function:\n%s", tb.errors[0])
	}
}

func TestCheckWaitsForGoroutinesEnding(t *testing.T) {
	tb := &recordingTB{TB: t}
	Check(tb)
	stop := make(chan struct{})
	go leakyWorker(stop)
	time.AfterFunc(100*time.Millisecond, func() { close(stop) })
	tb.runCleanups()
	if len(tb.errors) != 0 {
		t.Errorf("Check with a goroutine that ends within the wait: got errors %q", tb.errors)
	}
}
