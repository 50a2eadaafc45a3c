//go:build linux

package e2e

import (
	"bytes"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// parseLogLine parses one line of slog's text format into its keys and
// values (quoted values unquoted).
func parseLogLine(line string) map[string]string {
	out := make(map[string]string)
	for s := strings.TrimSpace(line); s != ""; s = strings.TrimLeft(s, " ") {
		eq := strings.IndexByte(s, '=')
		if eq < 0 {
			break
		}
		key, rest := s[:eq], s[eq+1:]
		var val string
		if strings.HasPrefix(rest, `"`) {
			q, err := strconv.QuotedPrefix(rest)
			if err != nil {
				break
			}
			val, _ = strconv.Unquote(q)
			rest = rest[len(q):]
		} else if sp := strings.IndexByte(rest, ' '); sp >= 0 {
			val, rest = rest[:sp], rest[sp:]
		} else {
			val, rest = rest, ""
		}
		out[key] = val
		s = rest
	}
	return out
}

// flowEnds returns the "flow end" lines of a log whose dst is dst.
func flowEnds(log, dst string) []map[string]string {
	var out []map[string]string
	for _, line := range strings.Split(log, "\n") {
		if f := parseLogLine(line); f["msg"] == "flow end" && f["dst"] == dst {
			out = append(out, f)
		}
	}
	return out
}

// waitFlowEnd waits for exactly one "flow end" line for dst and returns it.
func waitFlowEnd(t *testing.T, p *netlab.Proc, dst string, timeout time.Duration) map[string]string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ends := flowEnds(p.Log(), dst)
		if len(ends) > 1 {
			t.Fatalf("%d flow end lines for %s, want 1:\n%s", len(ends), dst, p.Log())
		}
		if len(ends) == 1 {
			t.Logf("flow end for %s: %v", dst, ends[0])
			return ends[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("no flow end line for %s within %v:\n%s", dst, timeout, p.Log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestFlowLog: with log.flows, a TCP flow's end and a UDP session's end
// each log one info line with what routing chose and the bytes each way.
func TestFlowLog(t *testing.T) {
	lab := netlab.New(t)
	cfg := baseConfig()
	cfg["log"] = map[string]any{"level": "info", "flows": true}
	cfg["stack"] = map[string]any{"udp": map[string]any{"idle_timeout": "1s"}}
	cfg["outbounds"] = []any{
		map[string]any{"name": "direct", "type": "direct", "fwmark": fwmark},
		map[string]any{"name": "echo-out", "type": "direct", "fwmark": fwmark},
	}
	tcpDst := remote4(2, 7)
	cfg["rules"] = []any{map[string]any{"ip_cidr": []string{netlab.Remote4(2).String() + "/32"}, "network": "tcp", "outbound": "echo-out"}}
	g := startGateway(t, lab, cfg)
	defer g.stop()
	lab.Wan.TCPEcho(t, tcpDst)

	// TCP: 1000 bytes each way, ended by FIN both ways.
	msg := bytes.Repeat([]byte("0123456789"), 100)
	echoOnce(t, lab, msg)
	f := waitFlowEnd(t, g.proc, tcpDst, 5*time.Second)
	want := map[string]string{"level": "INFO", "network": "tcp", "inbound": "tun", "rule": "rules[0]", "outbound": "echo-out", "up": "1000", "down": "1000", "domain": ""}
	for k, v := range want {
		if got, ok := f[k]; !ok || got != v {
			t.Errorf("TCP flow end %s = %q, want %q (line %v)", k, got, v, f)
		}
	}
	if src, err := netip.ParseAddrPort(f["src"]); err != nil || !src.Addr().Is4() {
		t.Errorf("TCP flow end src = %q, want the app's address:port", f["src"])
	}
	if d, err := time.ParseDuration(f["duration"]); err != nil || d < 0 || d > 5*time.Second {
		t.Errorf("TCP flow end duration = %q, want a duration under 5s", f["duration"])
	}

	// UDP: one 4-byte datagram echoed to a remote no rule names; the
	// session ends when it has been idle for stack.udp.idle_timeout.
	udpDst := remote4(1, 9)
	lab.Wan.UDPEcho(t, udpDst)
	uc := listenApp(t, lab, "udp4")
	if _, err := uc.WriteToUDPAddrPort([]byte("ping"), netip.MustParseAddrPort(udpDst)); err != nil {
		t.Fatal(err)
	}
	if got, _, err := readFrom(uc, 3*time.Second); err != nil || string(got) != "ping" {
		t.Fatalf("UDP echo: %q, %v", got, err)
	}
	f = waitFlowEnd(t, g.proc, udpDst, 5*time.Second)
	want = map[string]string{"level": "INFO", "network": "udp", "rule": "final", "outbound": "direct", "up": "4", "down": "4"}
	for k, v := range want {
		if got := f[k]; got != v {
			t.Errorf("UDP flow end %s = %q, want %q (line %v)", k, got, v, f)
		}
	}
	if d, err := time.ParseDuration(f["duration"]); err != nil || d < time.Second || d > 5*time.Second {
		t.Errorf("UDP flow end duration = %q, want the idle timeout (1s) or a little more", f["duration"])
	}
}
