package forwarder

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tungate/tungate/outbound"
)

// UDPReply sends a datagram to the app at to, with from as its source
// address. It must not block on the network.
type UDPReply func(payload []byte, from, to netip.AddrPort) error

// UDPConfig tunes the NAT table.
type UDPConfig struct {
	// IdleTimeout removes a mapping with no datagram in either direction
	// for this long.
	IdleTimeout time.Duration
	// DNSIdleTimeout replaces IdleTimeout for mappings opened towards
	// port 53, whose exchanges are one question and one answer.
	DNSIdleTimeout time.Duration
	// MaxSessions caps the number of mappings; datagrams that would open
	// one more are dropped and counted.
	MaxSessions int
	// Symmetric keys mappings by (source, destination) and accepts replies
	// only from that destination, instead of endpoint-independent
	// ("full cone") mapping by source alone.
	Symmetric bool
	// Names, when set, gives the domain behind a destination address
	// (fake-ip), for datagrams a mapping sends after its first.
	Names func(netip.Addr) (string, bool)
	// Tracker, when set, tracks every mapping.
	Tracker *Tracker
}

// pendingMax bounds the datagrams held for a mapping whose upstream session
// is still opening (a proxy handshake, say); past it they are dropped.
const pendingMax = 32

// udpBufSize holds the largest UDP payload.
const udpBufSize = 65535

// UDPTable is the UDP NAT table: one upstream session per app source
// address ("endpoint-independent mapping"), through which the app can reach
// any destination and from which a datagram from any remote comes back to
// the app with that remote as its source.
//
// Lifecycle: NewUDPTable → Handle (from the packet path) → Close.
type UDPTable struct {
	cfg   UDPConfig
	route Route
	reply UDPReply
	log   *slog.Logger
	fails *causeLog

	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	sessions map[udpKey]*udpSession
	closed   bool
	wg       sync.WaitGroup

	// dirty lists the sessions holding datagrams for the next Flush.
	dirtyMu sync.Mutex
	dirty   []*udpSession

	stats UDPStats
}

// UDPStats counts UDP mappings and datagrams since NewUDPTable.
type UDPStats struct {
	Opened, Expired, Failed, RefusedOverCap atomic.Uint64
	// RefusedByOutbound counts datagrams refused because their outbound
	// carries no UDP (reject, http).
	RefusedByOutbound               atomic.Uint64
	Active                          atomic.Int64
	PacketsUp, PacketsDown, Dropped atomic.Uint64
	// BytesUp and BytesDown count UDP payload bytes sent upstream and
	// delivered to apps.
	BytesUp, BytesDown atomic.Uint64
}

type udpKey struct {
	src, dst netip.AddrPort // dst only in symmetric mode
}

// NewUDPTable returns an empty table. reply is how datagrams reach the app.
func NewUDPTable(cfg UDPConfig, route Route, reply UDPReply, log *slog.Logger) (*UDPTable, error) {
	if route == nil || reply == nil {
		return nil, errors.New("forwarder: NewUDPTable needs a route and a reply function")
	}
	if cfg.IdleTimeout <= 0 || cfg.DNSIdleTimeout <= 0 || cfg.MaxSessions <= 0 {
		return nil, errors.New("forwarder: udp timeouts and max sessions must be positive")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t := &UDPTable{
		cfg: cfg, route: route, reply: reply, log: log,
		fails:    newCauseLog(log, time.Minute),
		ctx:      ctx,
		cancel:   cancel,
		sessions: make(map[udpKey]*udpSession),
	}
	t.wg.Add(1)
	go t.expireLoop()
	return t, nil
}

// Stats returns the live counters.
func (t *UDPTable) Stats() *UDPStats { return &t.stats }

// Len returns the number of live mappings.
func (t *UDPTable) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.sessions)
}

// Handle takes one datagram from the app, and keeps payload (the caller
// must not reuse it). A datagram for a session whose upstream sends in
// batches is held until Flush (or until a batch is full), so the caller
// must call Flush once it has no more datagrams at hand. It never blocks
// on an upstream:
// a new mapping opens its upstream session in the background and holds
// the first datagrams until it is ready. It returns false when the
// datagram is refused because its outbound carries no UDP (the app should
// get ICMP port unreachable).
func (t *UDPTable) Handle(src, dst netip.AddrPort, payload []byte) bool {
	key := udpKey{src: src}
	if t.cfg.Symmetric {
		key.dst = dst
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return false
	}
	s := t.sessions[key]
	t.mu.Unlock()
	if s == nil {
		var refused bool
		if s, refused = t.open(key, src, dst); refused {
			return false
		}
		if s == nil {
			return true // over the cap, or closed: dropped and counted
		}
	}
	s.send(dst, payload)
	return true
}

// open makes the mapping for a datagram that has none. The route step
// runs outside the table's lock (it may look the flow's name up, or ask
// the kernel about a looping socket), so a slow one holds up only this
// datagram. It returns nil when the mapping cannot be made (the cap, a
// closed table, a retired outbound), and refused when the outbound
// carries no UDP.
func (t *UDPTable) open(key udpKey, src, dst netip.AddrPort) (s *udpSession, refused bool) {
	if t.Len() >= t.cfg.MaxSessions {
		t.stats.RefusedOverCap.Add(1)
		return nil, false
	}
	flow := Flow{Network: "udp", Inbound: "tun", Src: src, Dst: dst}
	d := t.route(&flow)
	release := func() {
		if flow.Release != nil {
			flow.Release()
		}
	}
	if c, ok := d.(outbound.UDPCarrier); ok && !c.CarriesUDP() {
		release()
		t.stats.RefusedByOutbound.Add(1)
		return nil, true
	}
	idle := t.cfg.IdleTimeout
	if dst.Port() == 53 {
		idle = t.cfg.DNSIdleTimeout
	}
	s = &udpSession{table: t, key: key, src: src, dst: dst, domain: flow.Domain, release: flow.Release, dialer: d, idle: idle, tracked: &Conn{}}
	s.ctx, s.cancel = context.WithCancel(t.ctx)
	s.touch()
	t.mu.Lock()
	switch other := t.sessions[key]; {
	case t.closed:
		t.mu.Unlock()
		s.cancel()
		release()
		return nil, false
	case other != nil:
		// Another datagram of this source made the mapping meanwhile.
		t.mu.Unlock()
		s.cancel()
		release()
		return other, false
	case len(t.sessions) >= t.cfg.MaxSessions:
		t.mu.Unlock()
		s.cancel()
		release()
		t.stats.RefusedOverCap.Add(1)
		return nil, false
	}
	if tr := t.cfg.Tracker; tr != nil {
		if s.tracked = tr.track(&flow, d, s.close); s.tracked == nil {
			t.mu.Unlock()
			s.cancel()
			release()
			t.stats.Dropped.Add(1)
			return nil, false
		}
	}
	t.sessions[key] = s
	t.stats.Opened.Add(1)
	t.stats.Active.Add(1)
	t.wg.Add(1)
	t.mu.Unlock()
	go s.open()
	return s, false
}

// remove deletes s from the table if it is still the entry for its key.
func (t *UDPTable) remove(s *udpSession) {
	t.mu.Lock()
	mine := t.sessions[s.key] == s
	if mine {
		delete(t.sessions, s.key)
		t.stats.Active.Add(-1)
	}
	t.mu.Unlock()
	// Outside the table's lock: the tracker's OnEnd may log.
	if mine && t.cfg.Tracker != nil {
		t.cfg.Tracker.untrack(s.tracked)
	}
}

// expireLoop closes mappings idle past their timeout. One goroutine for
// the whole table, checking at a quarter of the shortest timeout.
func (t *UDPTable) expireLoop() {
	defer t.wg.Done()
	every := min(t.cfg.IdleTimeout, t.cfg.DNSIdleTimeout) / 4
	every = max(every, 50*time.Millisecond)
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-t.ctx.Done():
			return
		case <-tick.C:
		}
		now := time.Now().UnixNano()
		var idle []*udpSession
		t.mu.Lock()
		for _, s := range t.sessions {
			if now-s.last.Load() >= int64(s.idle) {
				idle = append(idle, s)
			}
		}
		t.mu.Unlock()
		for _, s := range idle {
			t.stats.Expired.Add(1)
			s.close()
		}
	}
}

// Close closes every mapping and waits for their goroutines.
func (t *UDPTable) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	all := make([]*udpSession, 0, len(t.sessions))
	for _, s := range t.sessions {
		all = append(all, s)
	}
	t.mu.Unlock()
	t.cancel()
	for _, s := range all {
		s.close()
	}
	t.wg.Wait()
	return nil
}

// udpSession is one mapping: an app source and its upstream session.
type udpSession struct {
	table    *UDPTable
	key      udpKey
	src, dst netip.AddrPort // dst: the first destination
	domain   string         // dst's name, when Route knew it
	release  func()
	dialer   outbound.Dialer
	idle     time.Duration
	last     atomic.Int64
	tracked  *Conn // the tracker's entry (a detached one when untracked)
	// remotes counts the distinct remotes that answered (up to
	// maxRemotesCounted), for /nat; only readLoop writes seen.
	remotes atomic.Int32
	seen    map[netip.AddrPort]struct{}

	// opened mirrors conn != nil && !closed, for send to read without
	// the lock per datagram.
	opened atomic.Bool

	// ctx bounds the opening of the upstream session; close cancels it,
	// so an expired mapping does not leave a hung handshake behind.
	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	conn    outbound.PacketConn
	pending []outDatagram
	closed  bool
	// sendq feeds the sender goroutine of an upstream that does not send
	// in batches; made only for one, once it is open.
	sendq chan outDatagram

	// With a BatchWriter upstream there is no sender goroutine: batch
	// holds datagrams until Flush sends them in one call, from the
	// caller's goroutine. sendMu keeps batches in order.
	bw     outbound.BatchWriter
	batch  []outbound.Datagram // under mu
	dirty  bool                // under mu: s is on the table's dirty list
	sendMu sync.Mutex
	spare  []outbound.Datagram // under sendMu: the other batch array
}

type outDatagram struct {
	dst     netip.AddrPort
	payload []byte
}

// sendQueueLen bounds the datagrams waiting for a session's sender: a
// burst of a few hundred, at most a few MiB per session.
const sendQueueLen = 256

func (s *udpSession) touch() { s.last.Store(time.Now().UnixNano()) }

func (s *udpSession) open() {
	defer s.table.wg.Done()
	t := s.table
	conn, err := s.dialer.ListenUDP(s.ctx, outbound.Target{Addr: s.dst, Domain: s.domain})
	s.mu.Lock()
	if err != nil || s.closed {
		wasClosed := s.closed
		pending := len(s.pending)
		s.pending = nil
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		if conn != nil {
			conn.Close()
		}
		t.stats.Dropped.Add(uint64(pending))
		if err != nil && !wasClosed {
			t.stats.Failed.Add(1)
			t.fails.warn(s.dialer.Name(), err, "udp session failed", "outbound", s.dialer.Name(), "src", s.src, "dst", s.dst, "err", err)
		}
		t.remove(s)
		if !wasClosed && s.release != nil {
			s.release()
		}
		return
	}
	s.conn = conn
	s.bw, _ = conn.(outbound.BatchWriter)
	if s.bw == nil {
		s.sendq = make(chan outDatagram, sendQueueLen)
	}
	// The held datagrams go out before opened is set, so none sent later
	// overtakes them; WritePacket does not block.
	for _, p := range s.pending {
		s.write(p.dst, p.payload)
	}
	s.pending = nil
	s.opened.Store(true)
	s.mu.Unlock()
	if s.bw == nil {
		t.wg.Add(1)
		go s.sendLoop()
	}
	t.log.Debug("udp mapping", "outbound", s.dialer.Name(), "src", s.src, "dst", s.dst)
	s.readLoop()
}

// send forwards one datagram from the app, or holds it while the upstream
// session opens.
func (s *udpSession) send(dst netip.AddrPort, payload []byte) {
	s.touch()
	if s.opened.Load() {
		s.enqueue(dst, payload)
		return
	}
	s.mu.Lock()
	switch {
	case s.closed: // the open failed, or the session closed
		s.mu.Unlock()
		s.table.stats.Dropped.Add(1)
	case s.conn != nil: // opened a moment ago
		s.mu.Unlock()
		s.enqueue(dst, payload)
	case len(s.pending) < pendingMax:
		s.pending = append(s.pending, outDatagram{dst: dst, payload: payload})
		s.mu.Unlock()
	default:
		s.mu.Unlock()
		s.table.stats.Dropped.Add(1)
	}
}

// enqueue holds a datagram for the next Flush when the upstream sends in
// batches; otherwise it hands it to the session's sender goroutine, so that
// the packet path goes on reading the TUN while the upstream send runs on
// another core. A full queue drops, as a full socket buffer would.
func (s *udpSession) enqueue(dst netip.AddrPort, payload []byte) {
	if s.bw != nil {
		s.hold(dst, payload)
		return
	}
	select {
	case s.sendq <- outDatagram{dst: dst, payload: payload}:
	default:
		s.table.stats.Dropped.Add(1)
	}
}

// sendBatchMax bounds a session's held datagrams: a full batch is sent at
// once, without waiting for Flush. 64 is what one sendmmsg of UDP_SEGMENT
// runs carries; smaller batches (8) made no difference to loss or CPU in
// make bench's UDP figures.
const sendBatchMax = 64

// hold adds a datagram to the session's batch, sending the batch when it is
// full and otherwise listing the session for Flush.
func (s *udpSession) hold(dst netip.AddrPort, payload []byte) {
	d := outbound.Datagram{Payload: payload, Dst: s.target(dst)}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.table.stats.Dropped.Add(1)
		return
	}
	s.batch = append(s.batch, d)
	full := len(s.batch) >= sendBatchMax
	listed := s.dirty
	if !full {
		// Not when full: the session would be marked listed without
		// being on the list (a Flush may have just taken it off), and
		// no later datagram would list it again.
		s.dirty = true
	}
	s.mu.Unlock()
	if full {
		s.sendBatch()
		return
	}
	if !listed {
		t := s.table
		t.dirtyMu.Lock()
		t.dirty = append(t.dirty, s)
		t.dirtyMu.Unlock()
	}
}

// sendBatch sends the session's held datagrams in one BatchWriter call,
// which never waits: what the socket cannot take is dropped and counted.
func (s *udpSession) sendBatch() {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	s.mu.Lock()
	batch := s.batch
	s.batch = s.spare[:0]
	s.mu.Unlock()
	if len(batch) == 0 {
		s.spare = batch
		return
	}
	sent, err := s.bw.WriteBatch(batch)
	st := &s.table.stats
	st.PacketsUp.Add(uint64(sent))
	var bytes uint64
	for _, d := range batch[:sent] {
		bytes += uint64(len(d.Payload))
	}
	s.tracked.up.Add(bytes)
	st.BytesUp.Add(bytes)
	if dropped := len(batch) - sent; dropped > 0 {
		st.Dropped.Add(uint64(dropped))
		s.table.log.Debug("udp send", "outbound", s.dialer.Name(), "src", s.src, "dropped", dropped, "err", err)
	}
	clear(batch) // the payloads are garbage now
	s.spare = batch[:0]
}

// Flush sends the datagrams Handle held. The packet path calls it whenever
// the TUN has nothing more to read, so a burst leaves in as few system
// calls as it arrived in, and a lone datagram leaves at once.
func (t *UDPTable) Flush() {
	t.dirtyMu.Lock()
	dirty := t.dirty
	t.dirty = nil
	t.dirtyMu.Unlock()
	for _, s := range dirty {
		s.mu.Lock()
		s.dirty = false
		s.mu.Unlock()
		s.sendBatch()
	}
	clear(dirty)
	t.dirtyMu.Lock()
	if t.dirty == nil {
		t.dirty = dirty[:0] // reuse the array
	}
	t.dirtyMu.Unlock()
}

// sendLoop writes queued datagrams upstream until the session closes.
func (s *udpSession) sendLoop() {
	defer s.table.wg.Done()
	for {
		select {
		case d := <-s.sendq:
			s.write(d.dst, d.payload)
		case <-s.ctx.Done():
			s.table.stats.Dropped.Add(uint64(len(s.sendq))) // never sent
			return
		}
	}
}

// target is dst with the name behind it, when known.
func (s *udpSession) target(dst netip.AddrPort) outbound.Target {
	target := outbound.Target{Addr: dst}
	if dst == s.dst {
		target.Domain = s.domain
	} else if names := s.table.cfg.Names; names != nil {
		target.Domain, _ = names(dst.Addr())
	}
	return target
}

func (s *udpSession) write(dst netip.AddrPort, payload []byte) {
	if err := s.conn.WritePacket(payload, s.target(dst)); err != nil {
		s.table.stats.Dropped.Add(1)
		s.table.log.Debug("udp send", "outbound", s.dialer.Name(), "src", s.src, "dst", dst, "err", err)
		return
	}
	s.table.stats.PacketsUp.Add(1)
	s.table.stats.BytesUp.Add(uint64(len(payload)))
	s.tracked.up.Add(uint64(len(payload)))
}

// readLoop moves datagrams from any remote back to the app, until the
// session is closed.
func (s *udpSession) readLoop() {
	t := s.table
	buf := make([]byte, udpBufSize)
	for {
		n, from, err := s.conn.ReadPacket(buf)
		if err != nil {
			var unreachable *outbound.UnreachableError
			if errors.As(err, &unreachable) {
				// One remote is unreachable; the mapping still serves
				// the others.
				t.log.Debug("udp upstream unreachable", "outbound", s.dialer.Name(), "src", s.src, "err", err)
				continue
			}
			s.close()
			return
		}
		if t.cfg.Symmetric && from != s.dst {
			t.stats.Dropped.Add(1)
			continue
		}
		s.touch()
		if len(s.seen) < maxRemotesCounted {
			if _, ok := s.seen[from]; !ok {
				if s.seen == nil {
					s.seen = make(map[netip.AddrPort]struct{})
				}
				s.seen[from] = struct{}{}
				s.remotes.Store(int32(len(s.seen)))
			}
		}
		if err := t.reply(buf[:n], from, s.src); err != nil {
			t.stats.Dropped.Add(1)
			t.log.Debug("udp reply", "src", from, "dst", s.src, "err", err)
			continue
		}
		t.stats.PacketsDown.Add(1)
		t.stats.BytesDown.Add(uint64(n))
		s.tracked.down.Add(uint64(n))
	}
}

func (s *udpSession) close() {
	s.mu.Lock()
	already := s.closed
	s.closed = true
	s.opened.Store(false) // later datagrams are dropped and counted
	conn := s.conn
	s.table.stats.Dropped.Add(uint64(len(s.batch))) // held, never sent
	clear(s.batch)
	s.batch = s.batch[:0]
	s.mu.Unlock()
	s.cancel()
	s.table.remove(s)
	if already {
		return
	}
	if conn != nil {
		conn.Close()
	}
	if s.release != nil {
		s.release()
	}
}

// maxRemotesCounted bounds the remotes a mapping remembers for /nat.
const maxRemotesCounted = 1024

// Mapping is one NAT table entry, as GET /nat shows it.
type Mapping struct {
	Src      netip.AddrPort
	First    netip.AddrPort // the destination that opened it
	Domain   string
	Outbound string
	// Local is the upstream socket's local address, when the outbound
	// has one of its own (direct); "" otherwise.
	Local string
	// Remotes counts the distinct remotes that answered (at most 1024).
	Remotes  int
	LastSeen time.Time
	ID       uint64 // the tracker's id, 0 when untracked
	Up, Down uint64
}

type localAddresser interface{ LocalAddr() net.Addr }

// Mappings returns the live mappings.
func (t *UDPTable) Mappings() []Mapping {
	t.mu.Lock()
	sessions := make([]*udpSession, 0, len(t.sessions))
	for _, s := range t.sessions {
		sessions = append(sessions, s)
	}
	t.mu.Unlock()
	out := make([]Mapping, 0, len(sessions))
	for _, s := range sessions {
		m := Mapping{
			Src: s.src, First: s.dst, Domain: s.domain, Outbound: s.dialer.Name(),
			Remotes: int(s.remotes.Load()), LastSeen: time.Unix(0, s.last.Load()),
			ID: s.tracked.id, Up: s.tracked.up.Load(), Down: s.tracked.down.Load(),
		}
		s.mu.Lock()
		if la, ok := s.conn.(localAddresser); ok {
			m.Local = la.LocalAddr().String()
		}
		s.mu.Unlock()
		out = append(out, m)
	}
	return out
}
