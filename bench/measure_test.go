//go:build linux

package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// Loads. Every one is bounded in time or count and stops by itself.
const (
	iperfPort     = 5201
	iperfSeconds  = 5
	iperfTimeout  = iperfSeconds*time.Second + 25*time.Second
	rrWarmup      = 500
	rrCount       = 5000
	rrTimeout     = 30 * time.Second
	cpsDuration   = 3 * time.Second
	memFlows      = 10000
	memBatch      = 1000
	memDialers    = 16
	memSettle     = 2 * time.Second
	ioTimeout     = 5 * time.Second
	flowsDrainMax = 30 * time.Second
)

// path is where a measurement's traffic goes: over the veth (kernel) or
// into tungate's TUN.
type path int

const (
	kernelPath path = iota
	tungatePath
)

func (p path) String() string {
	if p == kernelPath {
		return "kernel"
	}
	return "tungate"
}

// dst is the remote address the path's clients connect to; the servers
// listen on the wildcard and serve both.
func (p path) dst() netip.Addr {
	if p == kernelPath {
		return netlab.Remote4(kernelRemote)
	}
	return netlab.Remote4(tungateRemote)
}

func (p path) addr(port uint16) string { return netip.AddrPortFrom(p.dst(), port).String() }

// iperfSum is the part of iperf3's JSON report the benchmark reads:
// end.sum_received, the receiver's view (for -R that is the client).
type iperfSum struct {
	Seconds       float64 `json:"seconds"`
	Bytes         float64 `json:"bytes"`
	BitsPerSecond float64 `json:"bits_per_second"`
	Packets       float64 `json:"packets"`      // UDP
	LostPackets   float64 `json:"lost_packets"` // UDP
	LostPercent   float64 `json:"lost_percent"` // UDP
}

type iperfReport struct {
	Error string `json:"error"`
	End   struct {
		SumReceived *iperfSum `json:"sum_received"`
	} `json:"end"`
}

// iperf runs `iperf3 -c <dst> -J -t 5 args...` in app against the path's
// iperf3 server in wan and returns end.sum_received. A busy server (still
// closing the previous test) is retried; anything else is an error.
func (b *bench) iperf(p path, args ...string) (iperfSum, error) {
	argv := append([]string{"-c", p.dst().String(), "-p", strconv.Itoa(iperfPort), "-J",
		"-t", strconv.Itoa(iperfSeconds), "--connect-timeout", "5000"}, args...)
	var lastErr error
	for attempt := range 3 {
		if attempt > 0 {
			time.Sleep(time.Second)
		}
		ctx, cancel := context.WithTimeout(context.Background(), iperfTimeout)
		out, runErr := b.lab.App.Run(ctx, b.iperf3, argv...)
		cancel()
		var rep iperfReport
		// -J puts everything on stdout; a stray warning on stderr may
		// precede it in the combined output.
		i := bytes.IndexByte(out, '{')
		if i < 0 {
			return iperfSum{}, fmt.Errorf("iperf3 %s: no JSON report: %v", strings.Join(argv, " "), runErr)
		}
		if err := json.NewDecoder(bytes.NewReader(out[i:])).Decode(&rep); err != nil {
			return iperfSum{}, fmt.Errorf("iperf3 %s: report: %v (run: %v)", strings.Join(argv, " "), err, runErr)
		}
		if rep.Error != "" {
			lastErr = fmt.Errorf("iperf3 %s: %s", strings.Join(argv, " "), rep.Error)
			if strings.Contains(rep.Error, "busy") {
				continue
			}
			return iperfSum{}, lastErr
		}
		if runErr != nil {
			return iperfSum{}, runErr
		}
		s := rep.End.SumReceived
		if s == nil || s.Seconds <= 0 {
			return iperfSum{}, fmt.Errorf("iperf3 %s: no end.sum_received in the report", strings.Join(argv, " "))
		}
		return *s, nil
	}
	return iperfSum{}, lastErr
}

// tcpBulk is the received throughput in Gbit/s of a 5 s iperf3 TCP test
// with the given number of streams; download (wan→app) is iperf3 -R.
func (b *bench) tcpBulk(p path, streams int, download bool) (float64, error) {
	args := []string{"-P", strconv.Itoa(streams)}
	if download {
		args = append(args, "-R")
	}
	s, err := b.iperf(p, args...)
	if err != nil {
		return 0, err
	}
	return s.BitsPerSecond / 1e9, nil
}

// udpRate offers UDP datagrams of size bytes at rate (iperf3 -b) for 5 s
// and returns the datagrams per second the server received and the loss
// percentage it counted.
func (b *bench) udpRate(p path, size int, rate string) (dps, loss float64, err error) {
	s, err := b.iperf(p, "-u", "-l", strconv.Itoa(size), "-b", rate)
	if err != nil {
		return 0, 0, err
	}
	return (s.Packets - s.LostPackets) / s.Seconds, s.LostPercent, nil
}

// requestResponse runs a 1-byte ping-pong over one TCP connection to the
// echo server: rrWarmup round trips, then rrCount timed ones. It returns
// the p50 and p99 round trip in µs.
func (b *bench) requestResponse(p path) (p50, p99 float64, err error) {
	c, err := b.lab.App.DialTimeout("tcp", p.addr(b.echoPort), ioTimeout)
	if err != nil {
		return 0, 0, fmt.Errorf("dial echo %s: %w", p.addr(b.echoPort), err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(rrTimeout))
	rtts := make([]time.Duration, 0, rrCount)
	var buf [1]byte
	for i := range rrWarmup + rrCount {
		start := time.Now()
		buf[0] = byte(i)
		if _, err := c.Write(buf[:]); err != nil {
			return 0, 0, fmt.Errorf("round trip %d: write: %w", i, err)
		}
		if _, err := io.ReadFull(c, buf[:]); err != nil {
			return 0, 0, fmt.Errorf("round trip %d: read: %w", i, err)
		}
		if buf[0] != byte(i) {
			return 0, 0, fmt.Errorf("round trip %d: echoed %#x, want %#x", i, buf[0], byte(i))
		}
		if i >= rrWarmup {
			rtts = append(rtts, time.Since(start))
		}
	}
	slices.Sort(rtts)
	us := func(q float64) float64 {
		return float64(rtts[nearestRank(len(rtts), q)]) / float64(time.Microsecond)
	}
	return us(0.50), us(0.99), nil
}

// nearestRank is the index of the q quantile of n sorted values.
func nearestRank(n int, q float64) int {
	i := int(q*float64(n)+0.999999) - 1
	return max(0, min(n-1, i))
}

// oneShotServer listens on the wildcard in ns; each connection gets one
// byte read, 'a' written, and is closed. Cleanup closes the listener and
// waits for its goroutines.
func oneShotServer(t *testing.T, ns *netlab.NS) uint16 {
	t.Helper()
	addr := ns.ServeTCP(t, ":0", func(c net.Conn) {
		c.SetDeadline(time.Now().Add(ioTimeout))
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return
		}
		c.Write([]byte{'a'})
	})
	return uint16(addr.(*net.TCPAddr).Port)
}

// memResult is what the memory figure measures.
type memResult struct {
	idleKiB, heldKiB float64
	goroutines       float64
}

// memory opens memFlows idle TCP connections through tungate to a hold
// server in wan, in batches, and reads tungate's resident set once they are
// all open and settled. idleKiB is the resident set before they open.
func (b *bench) memory() (r memResult, err error) {
	if err := b.gw.alive(); err != nil {
		return r, err
	}
	if r.idleKiB, err = b.gw.rssKiB(); err != nil {
		return r, err
	}
	hold, err := startHoldServer(b.t, b.lab.Wan)
	if err != nil {
		return r, err
	}
	addr := tungatePath.addr(hold.port)
	open := make([]net.Conn, 0, memFlows)
	defer func() {
		// The app closes first, so the netstack's side of each flow is the
		// passive closer and leaves no TIME_WAIT behind in tungate.
		for _, c := range open {
			c.Close()
		}
		time.Sleep(500 * time.Millisecond)
		hold.stop()
		if _, derr := b.gw.waitMetric("tungate_tcp_flows_active", flowsDrainMax, "0", func(v float64) bool { return v == 0 }); derr != nil {
			b.t.Logf("memory: after closing the %d connections: %v", len(open), derr)
		}
	}()
	for len(open) < memFlows {
		batch, err := dialBatch(b.lab.App, addr, min(memBatch, memFlows-len(open)))
		open = append(open, batch...)
		if err != nil {
			return r, fmt.Errorf("with %d connections open: %w", len(open), err)
		}
		if err := b.gw.alive(); err != nil {
			return r, err
		}
	}
	if _, err := b.gw.waitMetric("tungate_tcp_flows_active", flowsDrainMax, fmt.Sprint(memFlows), func(v float64) bool { return v >= memFlows }); err != nil {
		return r, err
	}
	deadline := time.Now().Add(flowsDrainMax)
	for hold.accepted() < memFlows {
		if time.Now().After(deadline) {
			return r, fmt.Errorf("the hold server accepted %d of %d connections", hold.accepted(), memFlows)
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(memSettle)
	if r.heldKiB, err = b.gw.rssKiB(); err != nil {
		return r, err
	}
	r.goroutines, _ = b.gw.metric("go_goroutines")
	return r, nil
}

// dialBatch opens n connections to addr from ns with memDialers dialers,
// each dialling its share in sequence on one thread inside ns. It returns
// the connections it opened, and the first error.
func dialBatch(ns *netlab.NS, addr string, n int) ([]net.Conn, error) {
	var (
		mu    sync.Mutex
		conns = make([]net.Conn, 0, n)
		errs  []error
		wg    sync.WaitGroup
	)
	for w := range memDialers {
		share := n / memDialers
		if w < n%memDialers {
			share++
		}
		wg.Go(func() {
			err := ns.Do(func() error {
				for range share {
					c, err := net.DialTimeout("tcp", addr, ioTimeout)
					if err != nil {
						return fmt.Errorf("dial %s: %w", addr, err)
					}
					mu.Lock()
					conns = append(conns, c)
					mu.Unlock()
				}
				return nil
			})
			if err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return conns, errors.Join(errs...)
}
