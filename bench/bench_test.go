//go:build linux

package bench

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// rounds is how many times every figure is measured on each path.
const rounds = 3

// resultsDir is where latest.md and latest.json go (relative to this
// package's directory, where `go test` runs).
const resultsDir = "results"

// noFile is the RLIMIT_NOFILE the benchmark needs: the memory figure holds
// memFlows client sockets in this process (the server ends are in a helper
// process, see helper_test.go), and tungate, which inherits the limit,
// memFlows upstream sockets.
const noFile = memFlows + 2048

// budget bounds the measurements: a figure whose turn comes after it is
// reported as not measured instead of running on (a stalled run costs each
// measurement its own timeout).
const budget = 9 * time.Minute

// raceEnabled is set by race_test.go under -race.
var raceEnabled bool

// bench is one benchmark run: the lab, the gateway, the servers in wan
// and the figures measured so far.
type bench struct {
	t      *testing.T
	lab    *netlab.Lab
	gw     *gateway
	iperf3 string

	echoPort    uint16 // TCP echo (netlab.TCPEcho)
	oneShotPort uint16 // one request, one answer, server closes

	deadline time.Time // start + budget
	figs     *figures
	cps      [2][]cpsResult // by path: the details behind the cps figure
	dns      dnsState
}

// bulkCase is one iperf3 TCP figure.
type bulkCase struct {
	key      string
	streams  int
	download bool
}

var bulkCases = []bulkCase{
	{"tcp_1_up", 1, false},
	{"tcp_1_down", 1, true},
	{"tcp_4_up", 4, false},
	{"tcp_4_down", 4, true},
}

// udpCase is one iperf3 UDP figure: datagrams of size bytes offered at
// rate (iperf3 -b, payload bits per second).
type udpCase struct {
	key  string
	size int
	rate string
	bps  float64
}

var udpCases = []udpCase{
	{"udp_64", 64, "50M", 50e6},
	{"udp_1400", 1400, "1G", 1e9},
}

const naNoProcess = "n/a (the kernel path has no process)"

func declareFigures() *figures {
	fs := newFigures()
	for _, c := range bulkCases {
		dir := "upload, app→wan"
		if c.download {
			dir = "download, wan→app (iperf3 -R)"
		}
		plural := "s"
		if c.streams == 1 {
			plural = ""
		}
		fs.both(c.key, fmt.Sprintf("TCP throughput, %d stream%s, %s", c.streams, plural, dir), "Gbit/s", 2)
	}
	fs.both("rr_p50", "TCP 1-byte request/response round trip, p50", "µs", 1)
	fs.both("rr_p99", "TCP 1-byte request/response round trip, p99", "µs", 1)
	fs.tungateOnly("rr_added_p50", "latency added by tungate, p50 (tungate − kernel)", "µs", 1, "—").Note = "median of the per-round differences"
	fs.tungateOnly("rr_added_p99", "latency added by tungate, p99 (tungate − kernel)", "µs", 1, "—").Note = "median of the per-round differences"
	fs.both("cps", "new TCP connections per second (sequential: connect, 1-byte request and answer, server closes, client closes)", "conn/s", 0)
	fs.both("cps_connect_p50", "new TCP connections: connect time p50", "µs", 0)
	for _, c := range udpCases {
		offered := c.bps / float64(8*c.size)
		fs.both(c.key+"_dps", fmt.Sprintf("UDP %d B datagrams received per second (offered %s bit/s = %.0f/s)", c.size, c.rate, offered), "datagrams/s", 0)
		fs.both(c.key+"_loss", fmt.Sprintf("UDP %d B loss at %s bit/s offered", c.size, c.rate), "%", 2).noRatio = true
	}
	// DNS (dns_test.go): tungate's hijack path against asking dnsmasq
	// directly, which answers from its own records.
	fs.both("dns_cached_qps", fmt.Sprintf("DNS queries per second through the hijack path, cached (%d names; kernel: straight to dnsmasq, answering from its own records)", dnsHot), "queries/s", 0)
	fs.both("dns_cached_lost", fmt.Sprintf("DNS queries unanswered within %v, cached", dnsQueryTimeout), "% of sent", 3).noRatio = true
	fs.both("dns_uncached_qps", "DNS queries per second through the hijack path, uncached (every name new, forwarded to dnsmasq; kernel: straight to dnsmasq, answering from its own records)", "queries/s", 0)
	fs.both("dns_uncached_lost", fmt.Sprintf("DNS queries unanswered within %v, uncached", dnsQueryTimeout), "% of sent", 3).noRatio = true

	fs.tungateOnly("mem_idle", "tungate resident set (VmRSS), idle", "MiB", 1, naNoProcess)
	fs.tungateOnly("mem_held", fmt.Sprintf("tungate resident set with %d open idle TCP flows", memFlows), "MiB", 1, naNoProcess)
	fs.tungateOnly("mem_per_flow", "tungate resident set per flow, above idle", "KiB", 2, naNoProcess)
	fs.tungateOnly("cpu_per_gb", "tungate CPU (user+system) per GB relayed, 1-stream upload and download", "s/GB", 2, naNoProcess)
	return fs
}

// TestBench is the benchmark harness behind `make bench`: see the package
// comment and TESTING.md's "Benchmarks".
func TestBench(t *testing.T) {
	if os.Getenv("TUNGATE_BENCH") != "1" {
		t.Skip("benchmark harness: run it with `make bench` (TUNGATE_BENCH=1)")
	}
	if raceEnabled {
		t.Fatal("the benchmark must not run under -race: gVisor spins under the detector and every figure would measure it")
	}
	// A machine that cannot host the lab is a failure here, never a skip.
	t.Setenv("TUNGATE_E2E", "1")
	offload := os.Getenv("TUNGATE_BENCH_OFFLOAD")
	if offload == "" {
		offload = "auto"
	}
	if offload != "auto" && offload != "off" {
		t.Fatalf("TUNGATE_BENCH_OFFLOAD=%q: want auto or off", offload)
	}
	binary := tungateBinary(t)
	// Before anything starts, so that tungate and iperf3 inherit it.
	noFileErr := raiseNoFile(noFile)

	lab := netlab.New(t)
	b := &bench{t: t, lab: lab, iperf3: netlab.RequireBinary(t, "iperf3"), figs: declareFigures()}
	b.dns.totals = map[string]*[2]dnsResult{}
	for _, c := range dnsCases {
		b.dns.totals[c.key] = new([2]dnsResult)
	}
	// One iperf3 server per path, identical but for the address it binds:
	// a UDP test's server socket is connect()ed to the client, and bound to
	// the wildcard it would take the veth's address as its own and miss
	// every datagram sent to a remote address on lo.
	for _, p := range []path{kernelPath, tungatePath} {
		lab.Wan.Start(t, b.iperf3, "-s", "-p", fmt.Sprint(iperfPort), "-B", p.dst().String())
		lab.Wan.WaitListen(t, "tcp", p.addr(iperfPort), 10*time.Second)
	}
	// The Go servers listen on the wildcard and serve both paths.
	b.echoPort = uint16(lab.Wan.TCPEcho(t, ":0").(*net.TCPAddr).Port)
	b.oneShotPort = oneShotServer(t, lab.Wan)
	startDNSServer(t, lab)

	mach := describeMachine(binary, offload)
	b.gw = startGateway(t, lab, binary, offload)
	if err := b.gw.checkRouting(b.echoPort); err != nil {
		t.Fatalf("the two paths are not routed as they should be, nothing can be measured: %v", err)
	}
	t.Logf("lab %s/%s; tungate pid %d; kernel path to %s, tungate path to %s",
		lab.App.Name, lab.Wan.Name, b.gw.pid(), kernelPath.dst(), tungatePath.dst())

	b.deadline = time.Now().Add(budget)
	// Memory first, on a fresh process: the idle figure is tungate before
	// any load, and the 10,000 flows do not inherit the bulk runs' heap.
	start := time.Now()
	if noFileErr != nil {
		for _, k := range []string{"mem_idle", "mem_held", "mem_per_flow"} {
			b.figs.fail(k, "RLIMIT_NOFILE", noFileErr)
		}
	} else {
		b.measureMemory()
	}
	t.Logf("memory: %v", time.Since(start).Round(time.Millisecond))

	for r := range rounds {
		start := time.Now()
		b.round(r)
		t.Logf("round %d of %d: %v", r+1, rounds, time.Since(start).Round(time.Millisecond))
	}

	b.figs.finish()
	b.cpsNote()
	b.dnsNotes()
	b.addedLatency("rr_added_p50", "rr_p50")
	b.addedLatency("rr_added_p99", "rr_p99")
	mach.LoadAvgEnd = loadAvg()
	res := &results{Machine: mach, Figures: b.figs.order, Failed: b.figs.failures()}
	md, err := res.write(resultsDir)
	if err != nil {
		t.Errorf("writing the results: %v", err)
	}
	abs, _ := filepath.Abs(resultsDir)
	t.Logf("results in %s/latest.{md,json}:\n\n%s", abs, md)
	if len(res.Failed) > 0 {
		t.Errorf("could not measure:\n%s", strings.Join(res.Failed, "\n"))
	}
}

// round measures every figure once on each path. Even rounds take the
// kernel path first, odd rounds tungate, so that drift over the run does
// not favour one side.
func (b *bench) round(r int) {
	order := []path{kernelPath, tungatePath}
	if r%2 == 1 {
		slices.Reverse(order)
	}
	tag := func(p path) string { return fmt.Sprintf("round %d, %s", r+1, p) }

	var cpu, relayed float64 // tungate's 1-stream runs in this round
	cpuRuns := 0
	var cpuErr error
	for _, c := range bulkCases {
		for _, p := range order {
			var bracket func() error
			if p == tungatePath && c.streams == 1 {
				bracket = b.cpuBracket(&cpu, &relayed, &cpuRuns)
			}
			v, err := measure(b, p, func() (float64, error) { return b.tcpBulk(p, c.streams, c.download) })
			if err != nil {
				b.figs.fail(c.key, tag(p), err)
				if bracket != nil {
					cpuErr = fmt.Errorf("%s run failed", c.key)
				}
				continue
			}
			b.figs.add(c.key, p, v)
			if bracket != nil {
				if err := bracket(); err != nil {
					cpuErr = err
				}
			}
		}
	}
	switch {
	case cpuErr != nil:
		b.figs.fail("cpu_per_gb", tag(tungatePath), cpuErr)
	case cpuRuns == 2 && relayed > 0:
		b.figs.add("cpu_per_gb", tungatePath, cpu/(relayed/1e9))
	default:
		b.figs.fail("cpu_per_gb", tag(tungatePath), fmt.Errorf("%d runs, %v bytes relayed", cpuRuns, relayed))
	}

	for _, p := range order {
		var p99 float64
		p50, err := measure(b, p, func() (p50 float64, err error) {
			p50, p99, err = b.requestResponse(p)
			return p50, err
		})
		if err != nil {
			b.figs.fail("rr_p50", tag(p), err)
			b.figs.fail("rr_p99", tag(p), err)
			continue
		}
		b.figs.add("rr_p50", p, p50)
		b.figs.add("rr_p99", p, p99)
	}

	for _, p := range order {
		var res cpsResult
		v, err := measure(b, p, func() (v float64, err error) {
			res, err = b.connsPerSecond(p)
			return float64(res.Connections) / res.Seconds, err
		})
		if err != nil {
			b.figs.fail("cps", tag(p), err)
			continue
		}
		b.figs.add("cps", p, v)
		b.figs.add("cps_connect_p50", p, res.ConnectP50)
		b.cps[p] = append(b.cps[p], res)
	}

	for _, c := range udpCases {
		for _, p := range order {
			var loss float64
			dps, err := measure(b, p, func() (dps float64, err error) {
				dps, loss, err = b.udpRate(p, c.size, c.rate)
				return dps, err
			})
			if err != nil {
				b.figs.fail(c.key+"_dps", tag(p), err)
				b.figs.fail(c.key+"_loss", tag(p), err)
				continue
			}
			b.figs.add(c.key+"_dps", p, dps)
			b.figs.add(c.key+"_loss", p, loss)
		}
	}

	for _, c := range dnsCases {
		for _, p := range order {
			var res dnsResult
			qps, err := measure(b, p, func() (v float64, err error) {
				res, err = b.dnsRate(p, c)
				return float64(res.Answered) / res.Seconds, err
			})
			if err != nil {
				b.figs.fail(c.key+"_qps", tag(p), err)
				b.figs.fail(c.key+"_lost", tag(p), err)
				continue
			}
			b.figs.add(c.key+"_qps", p, qps)
			b.figs.add(c.key+"_lost", p, 100*float64(res.Lost)/float64(res.sent()))
			b.dns.totals[c.key][p].add(res)
		}
	}
}

// measure runs fn for path p, first checking that tungate still runs
// when p goes through it.
func measure(b *bench, p path, fn func() (float64, error)) (float64, error) {
	if time.Now().After(b.deadline) {
		return 0, fmt.Errorf("skipped: the run's time budget of %v was spent", budget)
	}
	if p == tungatePath {
		if err := b.gw.alive(); err != nil {
			return 0, err
		}
	}
	v, err := fn()
	if err == nil && p == tungatePath {
		// A run that "worked" while tungate died under it is not a
		// measurement of tungate.
		err = b.gw.alive()
	}
	return v, err
}

// cpuBracket reads tungate's CPU time and relayed bytes now and returns a
// function that reads them again and adds the differences to cpu and
// relayed.
func (b *bench) cpuBracket(cpu, relayed *float64, runs *int) func() error {
	cpu0, err0 := b.gw.cpuSeconds()
	bytes0, err1 := b.gw.relayedBytes()
	return func() error {
		if err0 != nil || err1 != nil {
			return fmt.Errorf("before the run: %v %v", err0, err1)
		}
		cpu1, err := b.gw.cpuSeconds()
		if err != nil {
			return err
		}
		bytes1, err := b.gw.relayedBytes()
		if err != nil {
			return err
		}
		*cpu += cpu1 - cpu0
		*relayed += bytes1 - bytes0
		*runs++
		return nil
	}
}

// measureMemory fills the three memory figures.
func (b *bench) measureMemory() {
	r, err := b.memory()
	if err != nil {
		for _, k := range []string{"mem_idle", "mem_held", "mem_per_flow"} {
			b.figs.fail(k, "memory", err)
		}
		return
	}
	b.figs.add("mem_idle", tungatePath, r.idleKiB/1024)
	b.figs.add("mem_held", tungatePath, r.heldKiB/1024)
	b.figs.add("mem_per_flow", tungatePath, (r.heldKiB-r.idleKiB)/memFlows)
	b.figs.get("mem_held").Note = fmt.Sprintf("go_goroutines %.0f with the flows open", r.goroutines)
}

// cpsNote sums up the connect times behind the cps figure: a connection
// that waits for SYN retransmits costs a whole second or more of the
// window, so a handful of them move the figure a lot.
func (b *bench) cpsNote() {
	var parts []string
	for _, p := range []path{kernelPath, tungatePath} {
		var n, slow int
		var worst float64
		for _, r := range b.cps[p] {
			n += r.Connections
			slow += r.Slow
			worst = max(worst, r.ConnectMax)
		}
		if n == 0 {
			continue
		}
		parts = append(parts, fmt.Sprintf("%s: %d of %d connects took over %v, the slowest %.3f s",
			p, slow, n, slowConnect, worst/1e6))
	}
	b.figs.get("cps").Note = strings.Join(parts, "; ")
}

// addedLatency fills key with the per-round differences tungate − kernel
// of the figure from (after finish).
func (b *bench) addedLatency(key, from string) {
	src, dst := b.figs.get(from), b.figs.get(key)
	n := min(len(src.Kernel.Rounds), len(src.Tungate.Rounds))
	if n == 0 {
		dst.Errors = append(dst.Errors, fmt.Sprintf("no round measured %s on both paths", from))
		return
	}
	if len(src.Kernel.Rounds) != len(src.Tungate.Rounds) {
		dst.Note += fmt.Sprintf("; %s failed in some rounds, pairs may be from different rounds", from)
	}
	for i := range n {
		dst.Tungate.add(src.Tungate.Rounds[i] - src.Kernel.Rounds[i])
	}
	dst.Tungate.finish()
}

// tungateBinary is $TUNGATE_BIN, or tungate built into t's temporary
// directory.
func tungateBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("TUNGATE_BIN"); bin != "" {
		return bin
	}
	bin := filepath.Join(t.TempDir(), "tungate")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/tungate").CombinedOutput(); err != nil {
		t.Fatalf("building tungate: %v\n%s", err, out)
	}
	return bin
}

// raiseNoFile raises this process's RLIMIT_NOFILE soft limit (and the hard
// one, if it must and may) to at least n. Children started afterwards
// inherit it.
func raiseNoFile(n uint64) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("getrlimit: %w", err)
	}
	if lim.Cur >= n {
		return nil
	}
	lim.Cur = n
	lim.Max = max(lim.Max, n)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return fmt.Errorf("setrlimit RLIMIT_NOFILE to %d: %w", n, err)
	}
	return nil
}
