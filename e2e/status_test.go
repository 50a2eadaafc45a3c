//go:build linux

package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/api"
	"github.com/tungate/tungate/internal/netlab"
)

// TestStatus runs `tungate status` inside the app namespace against a
// tungate whose API has a secret, while a download through it is under
// way: the table and the JSON name the flow's destination, rule and
// outbound and count its bytes; a wrong secret and an API nobody serves
// are one-line errors and a non-zero exit.
func TestStatus(t *testing.T) {
	lab := netlab.New(t)
	const secret = "status-s3cret"
	cfg := baseConfig()
	cfg["api"] = map[string]any{"listen": apiAddr, "secret": secret}
	g := startGateway(t, lab, cfg)
	const seed = 0x57a7
	dst := remote4(1, 5001)
	bulkServer(t, lab.Wan, dst, seed)
	wantSum, _ := hashOf(stream(seed))

	// A download under way: read part of the stream, then stop reading,
	// so that the flow stays open (the server blocks on a full window)
	// while status looks at it.
	const part = 8 << 20
	c := dialApp(t, lab, dst)
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	if _, err := c.Write([]byte{'D'}); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.CopyN(h, c, part); err != nil {
		t.Fatalf("download, first %d bytes: %v", part, err)
	}

	out := lab.App.MustRun(t, tungateBin, "status", "--once", "--config", g.config)
	t.Logf("tungate status --once:\n%s", out)
	var row []string
	for line := range strings.Lines(out) {
		if f := strings.Fields(line); len(f) > 0 && f[0] == "tcp" && strings.Contains(line, dst) {
			row = f
		}
	}
	// tcp 10.233.1.1:5001 final direct <up> <unit> <down> <unit>
	if len(row) != 8 || row[1] != dst || row[2] != "final" || row[3] != "direct" {
		t.Fatalf("status --once has no row \"tcp %s final direct …\":\n%s", dst, out)
	}
	if down := iecValue(t, row[6], row[7]); down < part {
		t.Errorf("status --once shows %s %s down for the flow, want ≥ the %d bytes the app read", row[6], row[7], part)
	}
	if !strings.Contains(out, "direct  Direct") {
		t.Errorf("status --once does not list the direct outbound:\n%s", out)
	}

	raw := lab.App.MustRun(t, tungateBin, "status", "--json", "--config", g.config)
	var snap api.Snapshot
	dec := json.NewDecoder(strings.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&snap); err != nil {
		t.Fatalf("status --json does not decode into api.Snapshot: %v\n%s", err, raw)
	}
	want := netip.MustParseAddrPort(dst)
	var flow *api.Connection
	for i, c := range snap.Connections {
		if c.Metadata.DestinationIP == want.Addr().String() && c.Metadata.DestinationPort == strconv.Itoa(int(want.Port())) {
			flow = &snap.Connections[i]
		}
	}
	if flow == nil {
		t.Fatalf("status --json has no connection to %s:\n%s", dst, raw)
	}
	if flow.Metadata.Network != "tcp" || flow.Rule != "final" || len(flow.Chains) != 1 || flow.Chains[0] != "direct" ||
		flow.Download < part || snap.DownloadTotal < flow.Download {
		t.Errorf("status --json: the flow to %s is %+v (download total %d); want tcp, final, [direct], ≥ %d bytes down", dst, *flow, snap.DownloadTotal, part)
	}
	// Clash's ports are JSON strings (api.Snapshot would take nothing else;
	// this says so in the test).
	if !strings.Contains(raw, `"destinationPort": "5001"`) {
		t.Errorf("status --json: destinationPort is not the string \"5001\":\n%s", raw)
	}

	// The live view, ended by SIGINT as Ctrl-C would, while the app reads
	// 1 MiB every 100 ms: frames a blank line apart (the output is a pipe,
	// not a terminal), the later ones with the download's rate, and exit
	// status 0.
	stop := make(chan struct{})
	read := make(chan int64, 1)
	go func() {
		var n int64
		defer func() { read <- n }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			m, err := io.CopyN(h, c, 1<<20)
			n += m
			if err != nil {
				return
			}
		}
	}()
	live, err := lab.App.Run(t.Context(), "timeout", "--preserve-status", "-s", "INT", "2.5", tungateBin, "status", "--config", g.config)
	close(stop)
	n := part + <-read
	if err != nil {
		t.Fatalf("status until SIGINT: %v", err)
	}
	t.Logf("tungate status, 2.5 s:\n%s", live)
	frames := strings.Split(string(live), "\n\nup ")
	if len(frames) < 2 || bytes.ContainsRune(live, 0x1b) || !strings.HasPrefix(string(live), "total up ") {
		t.Errorf("status for 2.5 s printed %d frame(s) with rates, want ≥ 2 after a first without, and no terminal codes:\n%s", len(frames)-1, live)
	}
	for i, f := range frames[1:] {
		if header, _, _ := strings.Cut(f, "\n"); strings.Contains(header, "down 0 B/s") {
			t.Errorf("frame %d shows no download rate while the app reads 10 MiB/s: up %s", i+2, header)
		}
	}

	// The rest of the download arrives intact: status disturbed nothing.
	m, err := io.Copy(h, c)
	if n += m; err != nil || n != bulkSize {
		t.Fatalf("download: %d bytes then %v, want %d", n, err, bulkSize)
	}
	if got := [32]byte(h.Sum(nil)); got != wantSum {
		t.Fatalf("download hashes %x, want %x", got, wantSum)
	}

	t.Run("wrong secret", func(t *testing.T) {
		bad := baseConfig()
		bad["api"] = map[string]any{"listen": apiAddr, "secret": "not-" + secret}
		out, err := runStatus(lab, "--once", "--config", writeYAML(t, bad))
		if err == nil || strings.TrimSpace(string(out)) != "tungate: the API refused the secret (api.secret)" {
			t.Errorf("status with a wrong secret: %v, output %q; want a non-zero exit and the refusal alone", err, out)
		}
	})
	t.Run("nobody listening", func(t *testing.T) {
		gone := baseConfig()
		gone["api"] = map[string]any{"listen": "127.0.0.1:9091"}
		out, err := runStatus(lab, "--once", "--config", writeYAML(t, gone))
		msg := strings.TrimSpace(string(out))
		if err == nil || strings.Count(msg, "\n") != 0 ||
			!strings.HasPrefix(msg, "tungate: cannot reach tungate's API at 127.0.0.1:9091: ") || !strings.Contains(msg, "connection refused") {
			t.Errorf("status with nobody at api.listen: %v, output %q; want a non-zero exit and one line", err, out)
		}
	})
}

// runStatus runs `tungate status args…` in the app namespace and returns
// what it printed and how it exited.
func runStatus(lab *netlab.Lab, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return lab.App.Run(ctx, tungateBin, append([]string{"status"}, args...)...)
}

// iecValue reads a size as status prints it ("3.5", "MiB") back in bytes.
func iecValue(t *testing.T, num, unit string) float64 {
	t.Helper()
	scale := map[string]float64{"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[unit]
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || scale == 0 {
		t.Fatalf("not a size: %q %q", num, unit)
	}
	return v * scale
}
