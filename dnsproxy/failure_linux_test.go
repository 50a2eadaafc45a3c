//go:build linux

package dnsproxy

import (
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/outbound"
)

// TestUpstreamPortUnreachableFailsOverAtOnce: through the real direct
// outbound, a first upstream whose port is closed (loopback answers ICMP
// port unreachable) costs no timeout: the second answers well within the
// 3 s one attempt may take. The refusal is logged at WARN once, naming the
// upstream and the cause; the next ones within the minute go to DEBUG and
// are counted in the WARN line after it.
func TestUpstreamPortUnreachableFailsOverAtOnce(t *testing.T) {
	s := newTestServer(t)
	dead := "udp://" + closedPort(t, "udp")
	direct, err := outbound.NewDirect(outbound.DirectConfig{Name: "direct"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recordHandler{}
	p, err := New(Config{
		Upstreams: []string{dead, "udp://" + s.udpAddr.String()},
		Timeout:   DefaultTimeout,
	}, direct, slog.New(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	clock := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	p.failures.now = clock.Now

	ask := func(name string) time.Duration {
		t.Helper()
		p.preferred.Store(0) // start with the dead one every time
		start := time.Now()
		r := exchange(t, p, name, dns.TypeA)
		took := time.Since(start)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
			t.Fatalf("%s: %s %v, want the second upstream's answer", name, dns.RcodeToString[r.Rcode], r.Answer)
		}
		return took
	}
	took := ask("a.test.")
	t.Logf("failover past a refusing upstream took %v", took)
	if took > 500*time.Millisecond {
		t.Errorf("failover took %v, want it at once (< 500ms), not after the %v timeout", took, DefaultTimeout)
	}
	ask("b.test.")
	ask("c.test.")

	warns := failureRecords(rec, slog.LevelWarn)
	if len(warns) != 1 {
		t.Fatalf("WARN lines %q, want exactly one within the minute", warns)
	}
	if want := "upstream=" + dead + " cause=refused"; !strings.Contains(warns[0], want) || !strings.Contains(warns[0], "connection refused") {
		t.Errorf("WARN line %q, want it to hold %q and the error", warns[0], want)
	}
	if debugs := failureRecords(rec, slog.LevelDebug); len(debugs) != 2 {
		t.Errorf("DEBUG lines %q, want the 2 later refusals", debugs)
	}

	clock.Advance(failureWindow)
	ask("example.test.")
	warns = failureRecords(rec, slog.LevelWarn)
	if len(warns) != 2 || !strings.HasPrefix(warns[1], "dns upstream failed (2 more since)") {
		t.Errorf("WARN lines %q, want a second one a minute later counting the 2 in between", warns)
	}
	if st := p.Stats(); st.Upstreams[0].Errors != 4 || st.Upstreams[1].Queries != 4 {
		t.Errorf("stats %+v, want 4 failed attempts at the dead upstream and 4 answers from the live one", st.Upstreams)
	}
}
