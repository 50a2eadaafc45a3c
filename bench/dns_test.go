//go:build linux

package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

// The DNS figures: a closed-loop UDP load generator in app asks A queries
// for names that dnsmasq in wan answers from its own records (a hosts
// file), over the two paths:
//
//   - tungate: to tungatePath.dst():53, which nothing in wan serves; tungate
//     hijacks it (dns.hijack any:53) and answers from its cache, or asks
//     dnsmasq on Remote4(dnsUpstreamRemote):53 through its upstream path
//     (the direct outbound, a fresh UDP socket per query).
//   - kernel: the same queries to kernelPath.dst():53, where the same
//     dnsmasq listens too, over the veth. There dnsmasq answers every
//     query from its records, so the kernel column of both figures is "ask
//     a real resolver directly".
//
// One dnsmasq serves both addresses, bound to each (--bind-interfaces): a
// wildcard socket would answer from the veth's address, as iperf3 would.
const (
	dnsUpstreamRemote = 5 // dnsmasq's address for tungate's upstream queries
	dnsAnswerRemote   = 7 // the address every name resolves to (never contacted)
	dnsWorkers        = 16
	dnsDuration       = 3 * time.Second
	dnsQueryTimeout   = time.Second // a query not answered within this is lost
	dnsHot            = 100         // names of the cached figure
	// dnsPool is how many distinct names the uncached figure can ask.
	// Through tungate no name is asked twice in the whole run, so the pool
	// must outlast rounds × the uncached rate × dnsDuration; the kernel path
	// cycles through it, without repeats within one window. 600,000 lasts
	// 3 rounds at 66,000 queries/s through tungate (measured: under
	// 20,000) and one window at 200,000/s on the kernel path (measured:
	// under 100,000); dnsmasq reads them in about a second and holds them
	// in about 60 MB.
	dnsPool = 600000
	// dnsCacheSize is tungate's dns.cache.size. It holds the hot names
	// many times over; the uncached figure fills it and then evicts, as a
	// busy resolver's cache would (the hot names are asked again before
	// each cached window).
	dnsCacheSize   = 20000
	dnsStartMax    = 30 * time.Second
	dnsMaxMismatch = 0.01 // of answered: a cached run that missed, or an uncached one that hit, more is not the figure it claims
)

func dnsHotName(i int) string  { return fmt.Sprintf("h%d.test", i) }
func dnsPoolName(i int) string { return fmt.Sprintf("n%d.test", i) }

// dnsCase is one DNS figure.
type dnsCase struct {
	key    string
	cached bool
}

var dnsCases = []dnsCase{
	{"dns_cached", true},
	{"dns_uncached", false},
}

// dnsState is what the DNS figures keep across rounds: where each path's
// uncached names continue, and the totals behind the notes.
type dnsState struct {
	next   [2]atomic.Int64 // by path: the next pool index of the uncached figure
	totals map[string]*[2]dnsResult
}

// startDNSServer writes the hosts file and starts dnsmasq in wan on the
// upstream address and the kernel path's address, and waits until it
// answers the last name of the pool on the kernel path.
func startDNSServer(t *testing.T, lab *netlab.Lab) {
	t.Helper()
	bin := netlab.RequireBinary(t, "dnsmasq")
	hosts := filepath.Join(t.TempDir(), "bench-hosts")
	if err := writeDNSHosts(hosts); err != nil {
		t.Fatalf("dnsmasq hosts file: %v", err)
	}
	upstream := netlab.Remote4(dnsUpstreamRemote)
	lab.Wan.Start(t, bin,
		"--keep-in-foreground", "--no-daemon", "--no-resolv", "--no-hosts",
		"--log-facility=/dev/null", "--pid-file=",
		"--user=root", "--group=root",
		"--listen-address="+upstream.String(), "--listen-address="+kernelPath.dst().String(),
		"--bind-interfaces", "--port=53",
		"--local=/test/", "--local-ttl=3600", "--cache-size=10000",
		"--addn-hosts="+hosts,
	)
	for _, a := range []netip.Addr{upstream, kernelPath.dst()} {
		lab.Wan.WaitListen(t, "udp", netip.AddrPortFrom(a, 53).String(), 10*time.Second)
	}
	// dnsmasq may still be reading the hosts file.
	c, err := lab.App.Dial("udp", kernelPath.addr(53))
	if err != nil {
		t.Fatalf("dnsmasq probe: %v", err)
	}
	defer c.Close()
	deadline := time.Now().Add(dnsStartMax)
	var q []byte
	buf := make([]byte, 1500)
	for id := uint16(1); ; id++ {
		q = appendDNSQuery(q[:0], id, dnsPoolName(dnsPool-1))
		err := dnsExchange(c, q, buf)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("dnsmasq does not answer %s on %s within %v: %v", dnsPoolName(dnsPool-1), kernelPath.addr(53), dnsStartMax, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// writeDNSHosts writes the hot names and the pool, every one resolving
// to Remote4(dnsAnswerRemote).
func writeDNSHosts(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<16)
	a := netlab.Remote4(dnsAnswerRemote).String()
	for i := range dnsHot {
		fmt.Fprintf(w, "%s %s\n", a, dnsHotName(i))
	}
	for i := range dnsPool {
		fmt.Fprintf(w, "%s %s\n", a, dnsPoolName(i))
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// appendDNSQuery appends a query for the A record of name (no trailing
// dot), recursion desired, no EDNS.
func appendDNSQuery(b []byte, id uint16, name string) []byte {
	b = append(b, byte(id>>8), byte(id), 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0)
	for label := range strings.SplitSeq(name, ".") {
		b = append(b, byte(len(label)))
		b = append(b, label...)
	}
	return append(b, 0, 0, 1, 0, 1) // root, type A, class IN
}

// errDNSMismatch is an answer to another query (a late one, after its
// query timed out).
var errDNSMismatch = errors.New("answer to another query")

// badAnswer is an answer to the query that is not the right one.
type badAnswer struct{ error }

// checkDNSAnswer checks that r answers q (ID, QR, the question) with
// NOERROR and an A record of Remote4(dnsAnswerRemote). It returns
// errDNSMismatch for an answer to another query, else a badAnswer.
func checkDNSAnswer(q, r []byte) error {
	if len(r) < 12 || r[0] != q[0] || r[1] != q[1] {
		return errDNSMismatch
	}
	if r[4] != 0 || r[5] != 1 || len(r) < len(q) || !bytes.Equal(r[12:len(q)], q[12:]) {
		return errDNSMismatch
	}
	if err := checkDNSRecords(q, r); err != nil {
		return badAnswer{err}
	}
	return nil
}

// checkDNSRecords checks the header and records of an answer to q.
func checkDNSRecords(q, r []byte) error {
	if r[2]&0x80 == 0 {
		return errors.New("not a response")
	}
	if rcode := r[3] & 0x0f; rcode != 0 {
		return fmt.Errorf("rcode %d", rcode)
	}
	an := int(r[6])<<8 | int(r[7])
	want := netlab.Remote4(dnsAnswerRemote).As4()
	off := len(q)
	for range an {
		// Owner name: labels, ending in a zero byte or a pointer.
		for {
			if off >= len(r) {
				return errors.New("truncated answer")
			}
			l := int(r[off])
			if l == 0 {
				off++
				break
			}
			if l&0xc0 == 0xc0 {
				off += 2
				break
			}
			off += 1 + l
		}
		if off+10 > len(r) {
			return errors.New("truncated answer")
		}
		typ := int(r[off])<<8 | int(r[off+1])
		rdlen := int(r[off+8])<<8 | int(r[off+9])
		off += 10
		if off+rdlen > len(r) {
			return errors.New("truncated answer")
		}
		if typ == 1 && rdlen == 4 && bytes.Equal(r[off:off+4], want[:]) {
			return nil
		}
		off += rdlen
	}
	return fmt.Errorf("no A %s among %d answers", netlab.Remote4(dnsAnswerRemote), an)
}

// dnsResult is one run of the DNS load generator.
type dnsResult struct {
	Answered int     // correct answers
	Lost     int     // queries without an answer within dnsQueryTimeout
	Bad      int     // wrong answers (rcode, records)
	Seconds  float64 // from the first query to the last answer or timeout
	// tungate's counters over the run (tungate path only).
	Queries, Hits, Misses, UpstreamErrors float64
}

func (r *dnsResult) sent() int { return r.Answered + r.Lost + r.Bad }

func (r *dnsResult) add(o dnsResult) {
	r.Answered += o.Answered
	r.Lost += o.Lost
	r.Bad += o.Bad
	r.Seconds += o.Seconds
	r.Queries += o.Queries
	r.Hits += o.Hits
	r.Misses += o.Misses
	r.UpstreamErrors += o.UpstreamErrors
}

// dnsCounters are tungate's DNS counters at one moment.
type dnsCounters struct{ queries, hits, misses, upErrs float64 }

func (g *gateway) dnsCounters() (c dnsCounters, err error) {
	for _, m := range []struct {
		name string
		v    *float64
	}{
		{"tungate_dns_queries_total", &c.queries},
		{"tungate_dns_cache_hits_total", &c.hits},
		{"tungate_dns_cache_misses_total", &c.misses},
		{"tungate_dns_upstream_errors_total", &c.upErrs},
	} {
		if *m.v, err = g.metric(m.name); err != nil {
			return c, err
		}
	}
	return c, nil
}

// dnsRate measures one DNS figure on path p: for the cached figure it
// first asks the dnsHot names once, then dnsWorkers sockets ask them in
// turn for dnsDuration; for the uncached one every query is a pool name
// the path has not been asked in this window (through tungate: in the
// whole run).
func (b *bench) dnsRate(p path, c dnsCase) (dnsResult, error) {
	dst := p.addr(53)
	var next func() (string, bool)
	if c.cached {
		if err := b.dnsWarm(dst); err != nil {
			return dnsResult{}, err
		}
		var i atomic.Int64
		next = func() (string, bool) { return dnsHotName(int(i.Add(1)-1) % dnsHot), true }
	} else {
		cur := &b.dns.next[p]
		next = func() (string, bool) {
			i := cur.Add(1) - 1
			if p == tungatePath {
				return dnsPoolName(int(i)), i < dnsPool
			}
			return dnsPoolName(int(i % dnsPool)), true
		}
	}
	var before dnsCounters
	if p == tungatePath {
		var err error
		if before, err = b.gw.dnsCounters(); err != nil {
			return dnsResult{}, err
		}
	}
	res, err := dnsLoad(b.lab.App, dst, next)
	if err != nil {
		return res, err
	}
	if res.Answered == 0 {
		return res, fmt.Errorf("no query to %s answered (%d lost, %d wrong answers)", dst, res.Lost, res.Bad)
	}
	if p == tungatePath {
		after, err := b.gw.dnsCounters()
		if err != nil {
			return res, err
		}
		res.Queries = after.queries - before.queries
		res.Hits = after.hits - before.hits
		res.Misses = after.misses - before.misses
		res.UpstreamErrors = after.upErrs - before.upErrs
		if res.Queries < float64(res.Answered) {
			return res, fmt.Errorf("%d answers but tungate counted %v queries: the answers did not all come from tungate", res.Answered, res.Queries)
		}
		off := res.Hits // the uncached figure must miss
		if c.cached {
			off = res.Misses
		}
		if off > dnsMaxMismatch*float64(res.Answered) {
			return res, fmt.Errorf("not the figure it claims: %d answered, tungate counted %v cache hits and %v misses", res.Answered, res.Hits, res.Misses)
		}
	}
	return res, nil
}

// dnsWarm asks every hot name once, sequentially, and wants every answer.
func (b *bench) dnsWarm(dst string) error {
	conn, err := b.lab.App.Dial("udp", dst)
	if err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	defer conn.Close()
	var q []byte
	buf := make([]byte, 1500)
	id := uint16(0)
	for i := range dnsHot {
		var err error
		for range 3 { // a lost datagram is retried
			id++
			q = appendDNSQuery(q[:0], id, dnsHotName(i))
			if err = dnsExchange(conn, q, buf); err == nil {
				break
			}
		}
		if err != nil {
			return fmt.Errorf("warm-up, %s to %s: %w", dnsHotName(i), dst, err)
		}
	}
	return nil
}

// dnsExchange sends q on conn and waits up to dnsQueryTimeout for its
// answer, skipping late answers to earlier queries. A wrong answer is a
// badAnswer; a timeout a net.Error whose Timeout() is true.
func dnsExchange(conn net.Conn, q, buf []byte) error {
	conn.SetReadDeadline(time.Now().Add(dnsQueryTimeout))
	if _, err := conn.Write(q); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return err
		}
		if err := checkDNSAnswer(q, buf[:n]); err != errDNSMismatch {
			return err
		}
	}
}

// dnsLoad runs dnsWorkers closed loops for dnsDuration from connected UDP
// sockets created in ns: each sends a query for next()'s name, waits for
// its answer (or dnsQueryTimeout) and sends the next. A worker stops early
// when next has no more names, which is an error: the window was not
// filled.
func dnsLoad(ns *netlab.NS, dst string, next func() (string, bool)) (dnsResult, error) {
	conns := make([]net.Conn, 0, dnsWorkers)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range dnsWorkers {
		c, err := ns.Dial("udp", dst)
		if err != nil {
			return dnsResult{}, fmt.Errorf("dial %s: %w", dst, err)
		}
		conns = append(conns, c)
	}
	var (
		mu        sync.Mutex
		res       dnsResult
		exhausted bool
		netErr    error
		wg        sync.WaitGroup
	)
	start := time.Now()
	end := start.Add(dnsDuration)
	for w, conn := range conns {
		wg.Go(func() {
			var r dnsResult
			var q []byte
			buf := make([]byte, 1500)
			id := uint16(w << 12)
			var err error
			for time.Now().Before(end) {
				name, ok := next()
				if !ok {
					mu.Lock()
					exhausted = true
					mu.Unlock()
					break
				}
				id++
				q = appendDNSQuery(q[:0], id, name)
				err = dnsExchange(conn, q, buf)
				var (
					ne  net.Error
					bad badAnswer
				)
				switch {
				case err == nil:
					r.Answered++
				case errors.As(err, &ne) && ne.Timeout():
					r.Lost++
					err = nil
				case errors.As(err, &bad):
					r.Bad++
					err = nil
				}
				if err != nil { // ECONNREFUSED and the like: nothing serves dst
					break
				}
			}
			mu.Lock()
			res.add(r)
			if err != nil && netErr == nil {
				netErr = err
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	switch {
	case netErr != nil:
		return res, fmt.Errorf("queries to %s: %w", dst, netErr)
	case exhausted:
		return res, fmt.Errorf("the pool of %d names ran out %v into the window: raise dnsPool", dnsPool, time.Since(start).Round(time.Millisecond))
	}
	return res, nil
}

// dnsNotes sums up, per figure, the losses, wrong answers and tungate's
// counters behind the rows.
func (b *bench) dnsNotes() {
	for _, c := range dnsCases {
		t := b.dns.totals[c.key]
		var parts []string
		for _, p := range []path{kernelPath, tungatePath} {
			r := t[p]
			if r.sent() == 0 {
				continue
			}
			s := fmt.Sprintf("%s: %d queries sent, %d answered, %d unanswered within %v, %d wrong answers",
				p, r.sent(), r.Answered, r.Lost, dnsQueryTimeout, r.Bad)
			if p == tungatePath {
				s += fmt.Sprintf(" (tungate counted %.0f cache hits, %.0f misses, %.0f upstream errors)", r.Hits, r.Misses, r.UpstreamErrors)
			}
			parts = append(parts, s)
		}
		note := fmt.Sprintf("%d UDP sockets, closed loop, %v per round; ", dnsWorkers, dnsDuration)
		if c.cached {
			note += fmt.Sprintf("the same %d names, each asked once just before the window; ", dnsHot)
		} else {
			note += fmt.Sprintf("no name asked twice through tungate in the run (the kernel path cycles through the same %d names), tungate's cache (%d answers) full and evicting after the first %d; dnsmasq answers from its records on both paths, so the kernel column does the same work as for cached; ", dnsPool, dnsCacheSize, dnsCacheSize)
		}
		b.figs.get(c.key + "_qps").Note = note + strings.Join(parts, "; ")
	}
}
