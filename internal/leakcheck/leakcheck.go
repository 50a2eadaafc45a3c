// Package leakcheck fails a test that leaves goroutines running, in the
// spirit of tailscale's tstest.ResourceCheck: it snapshots the goroutines
// when the test starts and, in t.Cleanup, waits a bounded time for every
// goroutine started since to end, then fails listing the stacks of those
// still running.
//
// It compares goroutine ids, not counts, so a goroutine that ended and
// another that started do not cancel out. It must not be used by tests
// that run in parallel with others (t.Parallel), whose goroutines it would
// count as leaks.
package leakcheck

import (
	"bytes"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// wait is how long Check waits for goroutines to end before failing.
var wait = 5 * time.Second

// Check snapshots the running goroutines and registers a cleanup that fails
// t if goroutines started after this call are still running 5 s later.
// Call it first in a test, so that its cleanup runs after the test's
// others (cleanups run last-registered first).
func Check(t testing.TB) {
	t.Helper()
	before := make(map[uint64]bool)
	for _, g := range goroutines() {
		before[g.id] = true
	}
	t.Cleanup(func() {
		var left []goroutine
		deadline := time.Now().Add(wait)
		for {
			left = left[:0]
			for _, g := range goroutines() {
				if !before[g.id] && !ignored(g.stack) {
					left = append(left, g)
				}
			}
			if len(left) == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if len(left) == 0 {
			return
		}
		var b strings.Builder
		for _, g := range left {
			b.WriteString(g.stack)
			b.WriteString("\n\n")
		}
		t.Errorf("leakcheck: %d goroutine(s) still running %v after the test:\n%s", len(left), wait, b.String())
	})
}

type goroutine struct {
	id    uint64
	stack string
}

// goroutines returns every goroutine but the caller's.
func goroutines() []goroutine {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var gs []goroutine
	for i, block := range bytes.Split(buf, []byte("\n\n")) {
		if i == 0 {
			continue // the caller's own goroutine comes first
		}
		s := string(bytes.TrimSpace(block))
		rest, ok := strings.CutPrefix(s, "goroutine ")
		if !ok {
			continue
		}
		idText, _, _ := strings.Cut(rest, " ")
		id, err := strconv.ParseUint(idText, 10, 64)
		if err != nil {
			continue
		}
		gs = append(gs, goroutine{id: id, stack: s})
	}
	return gs
}

// ignored reports goroutines that the runtime or the testing package start
// on their own and that are not the code under test's to stop.
func ignored(stack string) bool {
	for _, s := range []string{
		"testing.tRunner(",      // a test's own goroutine
		"testing.(*M).",         // the test binary's main loop
		"runtime.goexit0",       // exiting
		"os/signal.signal_recv", // started once, on first signal.Notify
		"runtime.ensureSigM",
	} {
		if strings.Contains(stack, s) {
			return true
		}
	}
	return false
}
