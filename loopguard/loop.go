package loopguard

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Config describes tungate's own outbound sockets to a Detector.
type Config struct {
	// Marks are the fwmarks tungate's outbound sockets carry (zeros are
	// ignored).
	Marks []uint32
	// Unmarked says that some outbound sockets carry no mark (an outbound
	// with fwmark 0, or a dialer that sets none). A socket without a mark
	// is then checked against this process's open files, which costs a
	// scan of /proc/self/fd.
	Unmarked bool
	// Tracked says that every upstream socket tungate opens is reported
	// through Dialing, with the destination it really connects or sends
	// to (after fake-ip resolution; the proxy's address for a proxied
	// flow). Loop then asks the kernel only about flows to a destination
	// being dialled at that moment and clears every other flow with a
	// map lookup. Untracked, every flow costs one sock_diag query (a few
	// microseconds).
	Tracked bool
	// Excluded are the marks that tungate's own rules keep out of the TUN
	// (nil without route.auto); Priority is route.priority and Tun the
	// TUN's name. They make the log line's advice precise, and Tun is
	// also where a socket bound to the TUN is looked for.
	Excluded []uint32
	Priority int
	Tun      string
}

// Detector recognises flows that tungate's own outbound sockets sent
// into the TUN — a routing loop, from a mark the rules do not exclude or an
// outbound bound to the TUN — so that the caller can refuse them at once
// instead of dialling again (each dial would come back as a new flow).
//
// The kernel is asked (sock_diag: one exact lookup by addresses and ports
// on the TUN, no dump) which local socket, if any, sent the flow and what
// fwmark that socket carries: one of tungate's marks means a loop. A flow
// from another host (tungate as a LAN gateway) has no local socket; an
// app's socket has the app's mark or none. An unmarked socket counts as
// tungate's only when Config.Unmarked is set and the socket is one of
// this process's files.
//
// With Config.Tracked the kernel is asked only about flows to a
// destination that tungate is dialling at that moment (Dialing): a
// looping flow always goes to one, because the connect that produced it
// has not returned (the forwarder finishes the app's handshake only after
// its own dial) or its UDP session is open. Every other flow is then
// cleared by a map lookup.
//
// A Detector is safe for concurrent use.
type Detector struct {
	cfg   Config
	log   *slog.Logger
	marks map[uint32]bool
	// find returns the local socket that sent src→dst (errNoSocket if
	// none); owns reports whether a socket inode is this process's.
	find func(network string, src, dst netip.AddrPort) (sockInfo, error)
	owns func(inode uint32) bool

	mu      sync.Mutex
	pending map[netip.AddrPort]int

	loops   atomic.Uint64
	logMu   sync.Mutex
	logged  time.Time
	unsaid  uint64 // loops since the last log line
	closeFn func() error
}

// sockInfo is what the kernel says of a local socket.
type sockInfo struct {
	Mark    uint32
	HasMark bool // the kernel reported the mark (it needs CAP_NET_ADMIN)
	Inode   uint32
}

var errNoSocket = errors.New("no local socket")

// loopLogEvery spaces the log lines about repeated loops.
const loopLogEvery = time.Minute

// newLoopDetector is New with the kernel lookups given.
func newLoopDetector(cfg Config, log *slog.Logger, find func(string, netip.AddrPort, netip.AddrPort) (sockInfo, error), owns func(uint32) bool) *Detector {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &Detector{
		cfg:     cfg,
		log:     log,
		marks:   map[uint32]bool{},
		find:    find,
		owns:    owns,
		pending: map[netip.AddrPort]int{},
	}
	for _, m := range cfg.Marks {
		if m != 0 {
			d.marks[m] = true
		}
	}
	return d
}

func normalize(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// Dialing records that tungate is about to open an upstream socket
// towards dst: a TCP connect, or a UDP session whose first datagram goes
// there. Call done once the connect has returned, or the session has
// closed; done may be called more than once.
func (d *Detector) Dialing(dst netip.AddrPort) (done func()) {
	dst = normalize(dst)
	d.mu.Lock()
	d.pending[dst]++
	d.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			d.mu.Lock()
			if d.pending[dst]--; d.pending[dst] <= 0 {
				delete(d.pending, dst)
			}
			d.mu.Unlock()
		})
	}
}

func (d *Detector) dialing(dst netip.AddrPort) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.pending[dst] > 0
}

// Loop reports whether the new flow src→dst (network "tcp" or "udp") that
// arrived in the TUN was sent by one of tungate's own sockets. The first
// time it logs one line saying so and how to fix it; later loops are
// counted and logged at most once a minute. It costs at most one netlink
// round trip (see Detector).
func (d *Detector) Loop(network string, src, dst netip.AddrPort) bool {
	if d == nil || d.find == nil {
		return false
	}
	src, dst = normalize(src), normalize(dst)
	if d.cfg.Tracked && !d.dialing(dst) {
		return false
	}
	info, err := d.find(network, src, dst)
	if err != nil {
		if !errors.Is(err, errNoSocket) {
			d.log.Debug("loop check: socket lookup failed", "network", network, "src", src, "dst", dst, "err", err)
		}
		return false
	}
	switch {
	case info.HasMark && d.marks[info.Mark]:
	case (!info.HasMark || info.Mark == 0) && d.cfg.Unmarked && d.owns != nil && d.owns(info.Inode):
	default:
		return false
	}
	d.loops.Add(1)
	d.report(network, src, dst, info)
	return true
}

// Loops returns how many flows Loop has recognised.
func (d *Detector) Loops() uint64 {
	if d == nil {
		return 0
	}
	return d.loops.Load()
}

// Close releases the detector's netlink socket.
func (d *Detector) Close() error {
	if d == nil || d.closeFn == nil {
		return nil
	}
	return d.closeFn()
}

func (d *Detector) report(network string, src, dst netip.AddrPort, info sockInfo) {
	d.logMu.Lock()
	defer d.logMu.Unlock()
	now := time.Now()
	mark := "none"
	if info.HasMark && info.Mark != 0 {
		mark = fmt.Sprintf("%#x", info.Mark)
	}
	if d.logged.IsZero() {
		d.logged = now
		d.log.Error("routing loop: a flow from tungate's own outbound socket came back into the TUN; refused it",
			"network", network, "src", src, "dst", dst, "socket_fwmark", mark, "fix", d.advice(info))
		return
	}
	d.unsaid++
	if now.Sub(d.logged) >= loopLogEvery {
		d.log.Warn("routing loop: more flows from tungate's own sockets refused", "count", d.unsaid, "last_dst", dst, "fix", d.advice(info))
		d.logged, d.unsaid = now, 0
	}
}

// advice says how to fix the loop, from what is known of the socket.
func (d *Detector) advice(info sockInfo) string {
	tun := d.cfg.Tun
	if tun == "" {
		tun = "the TUN"
	}
	excluded := make([]string, 0, len(d.cfg.Excluded))
	for _, m := range d.cfg.Excluded {
		excluded = append(excluded, fmt.Sprintf("%#x", m))
	}
	switch {
	case !info.HasMark || info.Mark == 0:
		if len(excluded) > 0 {
			return fmt.Sprintf("the socket carries no fwmark, so no rule can tell it from an app's: give the outbound a fwmark that route.auto excludes (%s) or bind it to the physical interface (outbounds[].interface)", strings.Join(excluded, ", "))
		}
		return "the socket carries no fwmark, so no rule can tell it from an app's: give the outbound a fwmark (outbounds[].fwmark) and keep that mark out of the TUN, or bind it to the physical interface (outbounds[].interface)"
	case slices.Contains(d.cfg.Excluded, info.Mark):
		return fmt.Sprintf("tungate's rules exclude fwmark %#x, so something else sends it into %s: look for an ip rule before priority %d that catches marked traffic, and check that the outbound's interface is not %s", info.Mark, tun, d.cfg.Priority, tun)
	case len(excluded) > 0:
		return fmt.Sprintf("tungate's rules exclude fwmark %s, not %#x: give the outbound one of those marks", strings.Join(excluded, ", "), info.Mark)
	default:
		return fmt.Sprintf("nothing keeps fwmark %#x out of %s: add `ip rule add fwmark %#x lookup main` before the rules that send traffic into %s, or use route.auto", info.Mark, tun, info.Mark, tun)
	}
}
