package dnsproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/outbound"
)

// tcpOnlyDialer is an outbound that carries TCP only, as an HTTP proxy
// does: it says so, and fails the test if a UDP session is asked of it.
type tcpOnlyDialer struct {
	loopbackDialer
	t *testing.T
}

var _ outbound.UDPCarrier = (*tcpOnlyDialer)(nil)

func (d *tcpOnlyDialer) Name() string     { return "http-proxy" }
func (d *tcpOnlyDialer) CarriesUDP() bool { return false }

func (d *tcpOnlyDialer) ListenUDP(context.Context, outbound.Target) (outbound.PacketConn, error) {
	d.t.Errorf("ListenUDP on an outbound that carries no UDP")
	return nil, errors.New("no udp here")
}

// TestUpstreamUDPOverTCPWhenOutboundCarriesNoUDP: through an outbound that
// carries no UDP, a udp:// upstream is asked over TCP, and New says so once
// at INFO.
func TestUpstreamUDPOverTCPWhenOutboundCarriesNoUDP(t *testing.T) {
	s := newTestServer(t)
	d := &tcpOnlyDialer{t: t}
	rec := &recordHandler{}
	up := "udp://" + s.udpAddr.String()
	p, err := New(Config{Upstreams: []string{up}}, d, slog.New(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for _, name := range []string{"example.test.", "a.test."} {
		r := exchange(t, p, name, dns.TypeA)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
			t.Fatalf("%s: %s %v, want the upstream's answer", name, dns.RcodeToString[r.Rcode], r.Answer)
		}
	}
	if s.network("tcp") != 2 || s.network("udp") != 0 {
		t.Errorf("server saw tcp=%d udp=%d, want 2 and 0", s.network("tcp"), s.network("udp"))
	}
	if n := d.udpSessions.Load(); n != 0 {
		t.Errorf("%d UDP sessions, want none", n)
	}
	var infos []string
	for _, r := range rec.all() {
		if r.Level == slog.LevelInfo && strings.Contains(r.Message, "carries no UDP") {
			line := r.Message
			r.Attrs(func(a slog.Attr) bool { line += " " + a.String(); return true })
			infos = append(infos, line)
		}
	}
	if len(infos) != 1 || !strings.Contains(infos[0], "outbound=http-proxy") || !strings.Contains(infos[0], up) {
		t.Errorf("INFO lines %q, want one naming the outbound and %s", infos, up)
	}
}

// TestUpstreamServfailLogged: an upstream's SERVFAIL is a failure of that
// upstream (WARN, cause SERVFAIL); the SERVFAIL the client then gets is
// logged at DEBUG with the name.
func TestUpstreamServfailLogged(t *testing.T) {
	s := newTestServer(t)
	rec := &recordHandler{}
	up := "udp://" + s.udpAddr.String()
	p, err := New(Config{Upstreams: []string{up}}, &loopbackDialer{}, slog.New(rec))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if r := exchange(t, p, "servfail.test.", dns.TypeA); r.Rcode != dns.RcodeServerFailure {
		t.Fatalf("rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	warns := failureRecords(rec, slog.LevelWarn)
	if len(warns) != 1 || !strings.Contains(warns[0], "upstream="+up+" cause=SERVFAIL") {
		t.Errorf("WARN lines %q, want one with the upstream and cause SERVFAIL", warns)
	}
	found := false
	for _, r := range rec.all() {
		r.Attrs(func(a slog.Attr) bool {
			if r.Level == slog.LevelDebug && a.Key == "name" && a.Value.String() == "servfail.test." {
				found = true
			}
			return true
		})
	}
	if !found {
		t.Errorf("no DEBUG line with name=servfail.test. for the SERVFAIL answered")
	}
}

// TestFailureLogWindow: one WARN per upstream and cause within the window,
// the rest at DEBUG and counted in the next WARN.
func TestFailureLogWindow(t *testing.T) {
	rec := &recordHandler{}
	f := newFailureLog(slog.New(rec), time.Minute)
	clock := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	f.now = clock.Now
	refused := fmt.Errorf("upstream a: %w", syscall.ECONNREFUSED)
	timeout := fmt.Errorf("upstream a: no answer within 3s: %w", context.DeadlineExceeded)

	f.failed("a", refused, 0) // WARN
	f.failed("a", refused, 0) // DEBUG
	f.failed("a", timeout, 0) // WARN: another cause
	f.failed("b", refused, 0) // WARN: another upstream
	clock.Advance(59 * time.Second)
	f.failed("a", refused, 0) // DEBUG
	clock.Advance(time.Second)
	f.failed("a", refused, 0) // WARN, 2 more since
	f.failed("a", nil, dns.RcodeServerFailure)

	var got []string
	for _, r := range rec.all() {
		line := r.Level.String() + " " + r.Message
		r.Attrs(func(a slog.Attr) bool {
			if a.Key != "err" {
				line += " " + a.String()
			}
			return true
		})
		got = append(got, line)
	}
	want := []string{
		"WARN dns upstream failed upstream=a cause=refused",
		"DEBUG dns upstream failed upstream=a cause=refused",
		"WARN dns upstream failed upstream=a cause=timeout",
		"WARN dns upstream failed upstream=b cause=refused",
		"DEBUG dns upstream failed upstream=a cause=refused",
		"WARN dns upstream failed (2 more since) upstream=a cause=refused",
		"WARN dns upstream failed upstream=a cause=SERVFAIL",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("log:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestFailureCause(t *testing.T) {
	cert := &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}
	tests := []struct {
		err   error
		rcode int
		want  string
	}{
		{fmt.Errorf("x: %w", syscall.ECONNREFUSED), 0, "refused"},
		{fmt.Errorf("receive: %w", &outbound.UnreachableError{From: netip.MustParseAddrPort("10.0.0.1:53"), Err: syscall.ECONNREFUSED}), 0, "refused"},
		{fmt.Errorf("dial: %w", outbound.ErrRefused), 0, "refused"},
		{fmt.Errorf("no answer within 3s: %w", context.DeadlineExceeded), 0, "timeout"},
		{fmt.Errorf("receive: %w", os.ErrDeadlineExceeded), 0, "timeout"},
		{fmt.Errorf("receive: %w", &outbound.UnreachableError{Err: syscall.EHOSTUNREACH}), 0, "unreachable"},
		{fmt.Errorf("dial: %w", syscall.ENETUNREACH), 0, "unreachable"},
		{fmt.Errorf("tls: server certificate rejected: %w", cert), 0, "certificate"},
		{fmt.Errorf("tls handshake: %w", tls.AlertError(40)), 0, "tls"},
		{fmt.Errorf("truncated over udp, then over tcp: %w", errors.New("EOF")), 0, "EOF"},
		{nil, dns.RcodeServerFailure, "SERVFAIL"},
		{nil, dns.RcodeRefused, "REFUSED"},
	}
	for _, tt := range tests {
		if got := failureCause(tt.err, tt.rcode); got != tt.want {
			t.Errorf("failureCause(%v, %d) = %q, want %q", tt.err, tt.rcode, got, tt.want)
		}
	}
}

// failureRecords returns the "dns upstream failed" records at level, each
// as its message and attributes.
func failureRecords(rec *recordHandler, level slog.Level) []string {
	var out []string
	for _, r := range rec.all() {
		if r.Level != level || !strings.HasPrefix(r.Message, "dns upstream failed") {
			continue
		}
		line := r.Message
		r.Attrs(func(a slog.Attr) bool {
			line += " " + a.String()
			return true
		})
		out = append(out, line)
	}
	return out
}
