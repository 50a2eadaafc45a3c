//go:build linux

package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// Two loads run in processes of their own: this test binary re-run as
// TestHelperProcess inside a lab namespace, told what to be by the
// arguments after "--".
//
//   - hold: the server ends of the memory figure's connections. The client
//     ends already take memFlows descriptors here, and RLIMIT_NOFILE's hard
//     limit (20,000 on these machines; raising it needs CAP_SYS_RESOURCE,
//     which root in a container may lack) does not fit both.
//   - cps: the connections-per-second client. A process started inside the
//     namespace creates its sockets there with no namespace switch; in this
//     process every blocking call of a loop locked to a namespaced thread
//     costs a thread hand-off, which measured about a third of the kernel
//     path's time per connection.
const (
	holdMaxLife  = 3 * time.Minute        // the hold server exits by itself after this
	holdReport   = 100 * time.Millisecond // how often it reports its count
	holdStartMax = 10 * time.Second
	slowConnect  = time.Second // a connection slower than this waited for SYN retransmits
)

// TestHelperProcess is not a test: see the comment above. Run without
// arguments after "--", it skips.
func TestHelperProcess(t *testing.T) {
	args := flag.Args()
	if len(args) == 0 {
		t.Skip("a helper process of TestBench, run by it inside its lab")
	}
	var err error
	switch args[0] {
	case "hold":
		err = holdMain()
	case "cps":
		err = cpsMain(args[1:])
	default:
		err = fmt.Errorf("unknown helper %q", args[0])
	}
	if err != nil {
		fmt.Printf("helper-error %v\n", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func helperArgs(args ...string) []string {
	return append([]string{"-test.run=^TestHelperProcess$", "-test.count=1", "--"}, args...)
}

// holdMain listens on the wildcard, prints "listening PORT", accepts
// connections and keeps them open without reading, printing "accepted N"
// as N grows, until it is stopped or holdMaxLife passes.
func holdMain() error {
	ln, err := net.Listen("tcp", ":0")
	if err != nil {
		return err
	}
	fmt.Printf("listening %d\n", ln.Addr().(*net.TCPAddr).Port)
	var (
		mu       sync.Mutex
		held     []net.Conn
		accepted atomic.Int64
	)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				fmt.Printf("accept-error %v\n", err)
				time.Sleep(10 * time.Millisecond) // EMFILE and the like: do not spin
				continue
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
			accepted.Add(1)
		}
	}()
	end := time.After(holdMaxLife)
	tick := time.NewTicker(holdReport)
	defer tick.Stop()
	var last int64
	for {
		select {
		case <-end:
			return nil
		case <-tick.C:
			if n := accepted.Load(); n != last {
				fmt.Printf("accepted %d\n", n)
				last = n
			}
		}
	}
}

// holdServer is a running hold helper.
type holdServer struct {
	proc *netlab.Proc
	port uint16
}

// startHoldServer starts the hold server inside ns and waits for its port.
func startHoldServer(t *testing.T, ns *netlab.NS) (*holdServer, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("hold server: %w", err)
	}
	s := &holdServer{proc: ns.Start(t, exe, helperArgs("hold")...)}
	deadline := time.Now().Add(holdStartMax)
	for {
		if v, ok := lastNumber(s.proc.Log(), "listening"); ok {
			s.port = uint16(v)
			return s, nil
		}
		if s.proc.Exited() || time.Now().After(deadline) {
			s.proc.Stop(time.Second)
			return nil, fmt.Errorf("hold server did not start within %v; its output:\n%s", holdStartMax, tailLines(s.proc.Log(), 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// accepted is how many connections the hold server has accepted, as of
// its last report.
func (s *holdServer) accepted() int {
	v, _ := lastNumber(s.proc.Log(), "accepted")
	return int(v)
}

// stop ends the hold server; the kernel closes every connection it held.
func (s *holdServer) stop() { s.proc.Stop(2 * time.Second) }

// lastNumber returns N from the last "<word> N" line of log.
func lastNumber(log, word string) (int64, bool) {
	var (
		v  int64
		ok bool
	)
	sc := bufio.NewScanner(strings.NewReader(log))
	for sc.Scan() {
		if rest, found := strings.CutPrefix(sc.Text(), word+" "); found {
			if n, err := strconv.ParseInt(rest, 10, 64); err == nil {
				v, ok = n, true
			}
		}
	}
	return v, ok
}

// cpsResult is what the cps helper prints, as JSON after "cps-result ".
type cpsResult struct {
	Connections int     `json:"connections"`
	Seconds     float64 `json:"seconds"`
	// Connect times (SYN sent to handshake complete), in µs.
	ConnectP50 float64 `json:"connect_p50_us"`
	ConnectP99 float64 `json:"connect_p99_us"`
	ConnectMax float64 `json:"connect_max_us"`
	// Slow counts connections whose connect took over slowConnect.
	Slow int `json:"slow"`
}

// cpsMain opens connections to addr one after another for the given
// duration: each connects, sends 1 byte, reads the 1-byte answer, waits
// for the server's close and closes.
//
// The server closes first, as an HTTP/1.0 server does: TIME_WAIT then sits
// on the server's side, and a few seconds of sequential connections cannot
// run the client out of ephemeral ports.
func cpsMain(args []string) error {
	if len(args) != 2 {
		return fmt.Errorf("cps wants ADDR DURATION, got %q", args)
	}
	addr := args[0]
	d, err := time.ParseDuration(args[1])
	if err != nil {
		return err
	}
	var (
		buf      [2]byte
		connects []time.Duration
		slow     int
	)
	start := time.Now()
	for time.Since(start) < d {
		t0 := time.Now()
		c, err := net.DialTimeout("tcp", addr, ioTimeout)
		if err != nil {
			return fmt.Errorf("connection %d to %s: %w", len(connects)+1, addr, err)
		}
		ct := time.Since(t0)
		connects = append(connects, ct)
		if ct > slowConnect {
			slow++
		}
		err = oneRequest(c, buf[:])
		c.Close()
		if err != nil {
			return fmt.Errorf("connection %d to %s: %w", len(connects), addr, err)
		}
	}
	elapsed := time.Since(start)
	slices.Sort(connects)
	us := func(q float64) float64 {
		return float64(connects[nearestRank(len(connects), q)]) / float64(time.Microsecond)
	}
	raw, err := json.Marshal(cpsResult{
		Connections: len(connects), Seconds: elapsed.Seconds(),
		ConnectP50: us(0.50), ConnectP99: us(0.99), ConnectMax: us(1), Slow: slow,
	})
	if err != nil {
		return err
	}
	fmt.Printf("cps-result %s\n", raw)
	return nil
}

func oneRequest(c net.Conn, buf []byte) error {
	c.SetDeadline(time.Now().Add(ioTimeout))
	buf[0] = 'q'
	if _, err := c.Write(buf[:1]); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, buf[:1]); err != nil || buf[0] != 'a' {
		return fmt.Errorf("read answer: %q, %v", buf[:1], err)
	}
	if m, err := c.Read(buf); m != 0 || err != io.EOF {
		return fmt.Errorf("after the answer: %d bytes, %v; want the server's EOF", m, err)
	}
	return nil
}

// connsPerSecond runs the cps helper in app against the one-shot server
// over path p.
func (b *bench) connsPerSecond(p path) (cpsResult, error) {
	exe, err := os.Executable()
	if err != nil {
		return cpsResult{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), cpsDuration+30*time.Second)
	defer cancel()
	out, err := b.lab.App.Run(ctx, exe, helperArgs("cps", p.addr(b.oneShotPort), cpsDuration.String())...)
	if err != nil {
		return cpsResult{}, err
	}
	for line := range strings.SplitSeq(string(out), "\n") {
		if rest, ok := strings.CutPrefix(line, "cps-result "); ok {
			var r cpsResult
			if err := json.Unmarshal([]byte(rest), &r); err != nil {
				return cpsResult{}, fmt.Errorf("cps helper: %q: %w", line, err)
			}
			if r.Connections == 0 || r.Seconds <= 0 {
				return cpsResult{}, fmt.Errorf("cps helper: no connection made: %q", line)
			}
			return r, nil
		}
	}
	return cpsResult{}, fmt.Errorf("cps helper printed no result:\n%s", out)
}
