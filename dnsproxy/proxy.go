package dnsproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/tungate/tungate/outbound"
)

// EDNS(0) payload sizes.
const (
	// ednsSize is what we advertise, to upstreams and in our answers (the
	// DNS flag day 2020 value).
	ednsSize = 1232
	// maxUDPAnswer caps what we send a client that advertises more.
	maxUDPAnswer = 4096
)

// ErrNoSuchHost is returned (wrapped) by Resolve for a name that does not
// exist or has no address.
var ErrNoSuchHost = errors.New("no such host")

// errClosed is returned by Exchange and Resolve after Close.
var errClosed = errors.New("dnsproxy: closed")

// Proxy is the DNS server of the hijack path.
//
// Lifecycle: New returns a running proxy; Close stops it (idempotent): it
// refuses new work, cancels upstream queries in flight, closes the
// connections handed to ServeTCP, waits for every goroutine it started and
// closes the fake-ip store. Every method is safe for concurrent use.
type Proxy struct {
	cfg       Config
	log       *slog.Logger
	failures  *failureLog
	upstreams []*upstream
	bootstrap []*upstream
	preferred atomic.Int32 // index of the upstream that answered last

	cache   *answerCache
	names   *addrNames  // address → name of real answers
	fake    *fakeIPPool // nil in real mode
	exclude *nameMatcher
	fakeTTL uint32
	budget  time.Duration // for one query from the wire, all attempts
	now     func() time.Time

	stats counters

	flightMu sync.Mutex
	flights  map[cacheKey]*flight

	ctx       context.Context // cancelled by Close
	cancel    context.CancelFunc
	lifeMu    sync.Mutex
	closed    bool
	conns     map[net.Conn]struct{} // served by ServeTCP
	wg        sync.WaitGroup
	udpSlots  chan struct{} // bounds HandleUDP work in flight
	closeOnce sync.Once
	closeErr  error
}

// flight is one upstream query that identical questions wait for.
type flight struct {
	done chan struct{}
	msg  *dns.Msg
	err  error
}

// maxUDPInFlight bounds the HandleUDP queries being answered at once;
// beyond it datagrams are dropped (and counted), as a full socket would.
const maxUDPInFlight = 2048

// New validates cfg, opens and replays the fake-ip store and returns a
// running proxy whose upstream connections all go through dialer. log may be
// nil.
func New(cfg Config, dialer outbound.Dialer, log *slog.Logger) (*Proxy, error) {
	if dialer == nil {
		return nil, errors.New("dnsproxy: nil dialer")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("dnsproxy: %w", err)
	}
	if len(cfg.Upstreams) == 0 {
		ups, err := SystemUpstreams(resolvConf)
		if err != nil {
			return nil, fmt.Errorf("dnsproxy: no upstreams configured: %w", err)
		}
		cfg.Upstreams = ups
	}
	p := &Proxy{
		cfg:      cfg,
		log:      log,
		failures: newFailureLog(log, failureWindow),
		cache:    newAnswerCache(cfg.CacheSize),
		names:    newAddrNames(max(4*cfg.CacheSize, 4096)),
		exclude:  newNameMatcher(cfg.FakeExclude),
		fakeTTL:  uint32(max(1, (cfg.FakeTTL+time.Second-1)/time.Second)),
		budget:   cfg.Timeout * time.Duration(len(cfg.Upstreams)+2),
		now:      time.Now,
		flights:  make(map[cacheKey]*flight),
		conns:    make(map[net.Conn]struct{}),
		udpSlots: make(chan struct{}, maxUDPInFlight),
	}
	var errs []error
	for _, s := range cfg.Upstreams {
		spec, err := ParseUpstream(s)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !spec.Addr.IsValid() && len(cfg.Bootstrap) == 0 {
			errs = append(errs, fmt.Errorf("upstream %q: host %q is a name: give bootstrap servers (IP) to resolve it", s, spec.Host))
			continue
		}
		u := newUpstream(spec, s, dialer, cfg.Timeout, cfg.TLSConfig)
		u.resolve = p.bootstrapResolve
		p.upstreams = append(p.upstreams, u)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("dnsproxy: %w", err)
	}
	for _, b := range cfg.Bootstrap {
		b = netip.AddrPortFrom(b.Addr().Unmap(), b.Port())
		spec := Upstream{Scheme: SchemeUDP, Host: b.Addr().String(), Port: b.Port(), Addr: b}
		p.bootstrap = append(p.bootstrap, newUpstream(spec, spec.String(), dialer, cfg.Timeout, nil))
	}
	if !carriesUDP(dialer) {
		var udp []string
		for _, u := range slices.Concat(p.upstreams, p.bootstrap) {
			if u.spec.Scheme == SchemeUDP {
				udp = append(udp, u.name)
			}
		}
		if len(udp) > 0 {
			log.Info("dns outbound carries no UDP: asking udp:// upstreams over TCP", "outbound", dialer.Name(), "upstreams", udp)
		}
	}
	if cfg.Mode == ModeFakeIP {
		p.fake = newFakeIPPool(cfg.FakeRange4, cfg.FakeRange6, log)
		if cfg.Store != "" {
			store, err := openFakeIPStore(cfg.Store, p.fake, log)
			if err != nil {
				return nil, fmt.Errorf("dnsproxy: %w", err)
			}
			p.fake.store = store
		}
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p, nil
}

// Close stops the proxy; see Proxy. It returns the error of closing the
// store, if any, every time it is called.
func (p *Proxy) Close() error {
	p.closeOnce.Do(func() {
		p.lifeMu.Lock()
		p.closed = true
		conns := make([]net.Conn, 0, len(p.conns))
		for c := range p.conns {
			conns = append(conns, c)
		}
		p.lifeMu.Unlock()
		p.cancel()
		for _, c := range conns {
			c.Close()
		}
		p.wg.Wait()
		for _, u := range slices.Concat(p.upstreams, p.bootstrap) {
			u.close()
		}
		if p.fake != nil {
			p.fake.mu.Lock()
			if p.fake.store != nil {
				p.closeErr = p.fake.store.close()
				p.fake.store = nil
			}
			p.fake.mu.Unlock()
		}
	})
	return p.closeErr
}

// goAsync runs fn on a goroutine that Close waits for; false after Close.
func (p *Proxy) goAsync(fn func()) bool {
	p.lifeMu.Lock()
	defer p.lifeMu.Unlock()
	if p.closed {
		return false
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		fn()
	}()
	return true
}

// Exchange answers q: fake addresses (fake-ip mode), then the cache, then
// the upstreams (one query for identical questions in flight). The answer
// carries q's ID and question. Malformed queries (a response, QDCOUNT != 1)
// get FORMERR, opcodes other than QUERY and the ANY type get NOTIMP
// (RFC 8482 allows either a minimal answer or a refusal; NOTIMP is what the
// big public resolvers send), EDNS versions other than 0 get BADVERS. The
// error is non-nil only when no answer could be had (every upstream failed,
// the fake-ip pool is exhausted, ctx ended, the proxy is closed); the wire
// paths then answer SERVFAIL.
func (p *Proxy) Exchange(ctx context.Context, q *dns.Msg) (*dns.Msg, error) {
	p.stats.queries.Add(1)
	if q == nil {
		return nil, errors.New("dnsproxy: nil query")
	}
	if q.Response || len(q.Question) != 1 {
		p.stats.formErr.Add(1)
		return replyTo(q, dns.RcodeFormatError), nil
	}
	if q.Opcode != dns.OpcodeQuery {
		return replyTo(q, dns.RcodeNotImplemented), nil
	}
	opt := q.IsEdns0()
	if opt != nil && opt.Version() != 0 {
		return replyTo(q, dns.RcodeBadVers), nil
	}
	question := q.Question[0]
	if question.Qtype == dns.TypeANY {
		return replyTo(q, dns.RcodeNotImplemented), nil
	}
	name := dns.CanonicalName(question.Name)
	bare := strings.TrimSuffix(name, ".")
	if p.fake != nil && question.Qclass == dns.ClassINET && bare != "" {
		switch question.Qtype {
		case dns.TypeA, dns.TypeAAAA:
			if !p.exclude.match(bare) {
				if !validFakeName(bare) {
					p.stats.formErr.Add(1)
					return replyTo(q, dns.RcodeFormatError), nil
				}
				return p.fakeAnswer(q, bare, question.Qtype == dns.TypeAAAA)
			}
		case dns.TypePTR:
			if addr, ok := parseReverseName(name); ok && p.fake.contains(addr) {
				return p.fakePTR(q, addr), nil
			}
		}
	}
	key := cacheKey{name: name, qtype: question.Qtype, qclass: question.Qclass, do: opt != nil && opt.Do()}
	msg, age, stale, err := p.resolve(ctx, key, q.CheckingDisabled)
	if err != nil {
		return nil, err
	}
	if msg.Rcode == dns.RcodeSuccess && (key.qtype == dns.TypeA || key.qtype == dns.TypeAAAA) {
		p.names.record(bare, msg.Answer)
	}
	return p.fromCache(q, key, msg, age, stale), nil
}

// replyTo returns an empty answer to q with rcode, with an OPT record when
// q has one.
func replyTo(q *dns.Msg, rcode int) *dns.Msg {
	r := &dns.Msg{MsgHdr: dns.MsgHdr{
		Id:                 q.Id,
		Response:           true,
		Opcode:             q.Opcode,
		RecursionDesired:   q.RecursionDesired,
		RecursionAvailable: true,
		CheckingDisabled:   q.CheckingDisabled,
		Rcode:              rcode,
	}}
	if len(q.Question) > 0 {
		r.Question = []dns.Question{q.Question[0]}
	}
	if opt := q.IsEdns0(); opt != nil {
		r.SetEdns0(ednsSize, opt.Do())
	}
	return r
}

func (p *Proxy) fakeAnswer(q *dns.Msg, name string, v6 bool) (*dns.Msg, error) {
	r := replyTo(q, dns.RcodeSuccess)
	if !p.fake.enabled(v6) {
		return r, nil // NODATA: that family has no range
	}
	addr, err := p.fake.assign(name, v6)
	if err != nil {
		return nil, err
	}
	hdr := dns.RR_Header{Name: q.Question[0].Name, Class: dns.ClassINET, Ttl: p.fakeTTL}
	if v6 {
		hdr.Rrtype = dns.TypeAAAA
		r.Answer = []dns.RR{&dns.AAAA{Hdr: hdr, AAAA: addr.AsSlice()}}
	} else {
		hdr.Rrtype = dns.TypeA
		r.Answer = []dns.RR{&dns.A{Hdr: hdr, A: addr.AsSlice()}}
	}
	return r, nil
}

// fakePTR answers a PTR query for a fake address: the mapped name, or
// NXDOMAIN when the address is not mapped.
func (p *Proxy) fakePTR(q *dns.Msg, addr netip.Addr) *dns.Msg {
	name, ok := p.fake.lookup(addr)
	if !ok {
		return replyTo(q, dns.RcodeNameError)
	}
	r := replyTo(q, dns.RcodeSuccess)
	r.Answer = []dns.RR{&dns.PTR{
		Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypePTR, Class: dns.ClassINET, Ttl: p.fakeTTL},
		Ptr: dns.Fqdn(name),
	}}
	return r
}

// fromCache builds the answer to q from a cached (shared, read-only) upstream
// answer of age: TTLs lowered by the age, or 1 when stale; owner names equal
// to the question written as the client wrote them. key is q's cache key.
func (p *Proxy) fromCache(q *dns.Msg, key cacheKey, msg *dns.Msg, age time.Duration, stale bool) *dns.Msg {
	r := replyTo(q, msg.Rcode)
	r.AuthenticatedData = msg.AuthenticatedData && (q.AuthenticatedData || key.do)
	name := key.name
	elapsed := uint32(min(age/time.Second, 1<<31))
	qname := q.Question[0].Name
	copyRRs := func(rrs []dns.RR) []dns.RR {
		if len(rrs) == 0 {
			return nil
		}
		out := make([]dns.RR, len(rrs))
		for i, rr := range rrs {
			c := dns.Copy(rr)
			h := c.Header()
			switch {
			case stale:
				h.Ttl = 1
			case h.Ttl > elapsed:
				h.Ttl -= elapsed
			default:
				h.Ttl = 0
			}
			if h.Name != qname && len(h.Name) == len(name) && strings.EqualFold(h.Name, name) {
				h.Name = qname
			}
			out[i] = c
		}
		return out
	}
	r.Answer = copyRRs(msg.Answer)
	r.Ns = copyRRs(msg.Ns)
	extra := copyRRs(msg.Extra)
	r.Extra = append(extra, r.Extra...) // our OPT, if any, last
	return r
}

// resolve returns the upstream answer to key from the cache or the
// upstreams, with its age and whether it is stale.
func (p *Proxy) resolve(ctx context.Context, key cacheKey, cd bool) (msg *dns.Msg, age time.Duration, stale bool, err error) {
	msg, age, state, refresh := p.cache.get(key, p.now())
	switch state {
	case cacheFresh:
		p.stats.cacheHits.Add(1)
		return msg, age, false, nil
	case cacheStale:
		p.stats.cacheHits.Add(1)
		p.stats.staleHits.Add(1)
		if refresh {
			if _, _, err := p.join(key, cd); err != nil {
				p.cache.refreshFailed(key)
			}
		}
		return msg, age, true, nil
	}
	p.stats.cacheMisses.Add(1)
	f, leader, err := p.join(key, cd)
	if err != nil {
		return nil, 0, false, err
	}
	if !leader {
		p.stats.deduplicated.Add(1)
	}
	select {
	case <-f.done:
		return f.msg, 0, false, f.err
	case <-ctx.Done():
		return nil, 0, false, ctx.Err()
	}
}

// join returns the flight for key, starting it (leader true) if there is
// none.
func (p *Proxy) join(key cacheKey, cd bool) (*flight, bool, error) {
	p.flightMu.Lock()
	defer p.flightMu.Unlock()
	if f, ok := p.flights[key]; ok {
		return f, false, nil
	}
	f := &flight{done: make(chan struct{})}
	if !p.goAsync(func() { p.fly(key, cd, f) }) {
		return nil, false, errClosed
	}
	p.flights[key] = f
	return f, true, nil
}

// fly runs one flight: the upstream query, the cache update, then the
// wake-up of everyone waiting.
func (p *Proxy) fly(key cacheKey, cd bool, f *flight) {
	msg, err := p.queryUpstreams(p.ctx, key, cd)
	cached := false
	if err == nil {
		p.sanitize(key, msg)
		if ttl, ok := cacheTTL(msg); ok {
			p.cache.put(key, msg, ttl, p.now())
			cached = true
		}
	} else if p.ctx.Err() == nil {
		// Each upstream's failure was logged (see failureLog); what the
		// client gets is logged here, with the name.
		p.log.Debug("dns query failed, answering SERVFAIL", "name", key.name, "type", dns.TypeToString[key.qtype], "err", err)
	}
	if !cached {
		p.cache.refreshFailed(key) // a stale entry may try again
	}
	p.flightMu.Lock()
	delete(p.flights, key)
	p.flightMu.Unlock()
	f.msg, f.err = msg, err
	close(f.done)
}

// queryUpstreams asks the upstreams in turn, starting with the one that
// answered last, until one gives a usable answer. SERVFAIL, REFUSED, FORMERR
// and NOTIMP move on to the next upstream; when every upstream answers so,
// the last such answer is returned, FORMERR and NOTIMP turned into SERVFAIL
// (they are about our query, not the client's).
func (p *Proxy) queryUpstreams(ctx context.Context, key cacheKey, cd bool) (*dns.Msg, error) {
	uq := &dns.Msg{
		MsgHdr:   dns.MsgHdr{RecursionDesired: true, CheckingDisabled: cd},
		Question: []dns.Question{{Name: key.name, Qtype: key.qtype, Qclass: key.qclass}},
	}
	uq.SetEdns0(ednsSize, key.do)
	n := len(p.upstreams)
	start := int(p.preferred.Load())
	var errs []error
	var failed *dns.Msg
	for i := 0; i < n && ctx.Err() == nil; i++ {
		idx := (start + i) % n
		uq.Id = dns.Id() // fresh per attempt, never the client's
		u := p.upstreams[idx]
		resp, err := u.exchange(ctx, uq)
		if err != nil {
			errs = append(errs, err)
			if ctx.Err() == nil {
				p.failures.failed(u.name, err, 0)
			}
			continue
		}
		switch resp.Rcode {
		case dns.RcodeServerFailure, dns.RcodeRefused:
			p.failures.failed(u.name, nil, resp.Rcode)
			failed = resp
			continue
		case dns.RcodeFormatError, dns.RcodeNotImplemented:
			p.failures.failed(u.name, nil, resp.Rcode)
			resp.Rcode = dns.RcodeServerFailure
			failed = resp
			continue
		}
		p.preferred.Store(int32(idx))
		return resp, nil
	}
	if failed != nil {
		p.log.Debug("dns query failed at every upstream, answering "+dns.RcodeToString[failed.Rcode], "name", key.name, "type", dns.TypeToString[key.qtype])
		return failed, nil
	}
	if ctx.Err() != nil && len(errs) == 0 {
		errs = append(errs, ctx.Err())
	}
	return nil, fmt.Errorf("%s %s: every upstream failed: %w", key.name, dns.TypeToString[key.qtype], errors.Join(errs...))
}

// sanitize prepares an upstream answer for the cache: drops its OPT record
// and, in fake-ip mode for names that get fake answers, removes what would
// let a client reach the real addresses: ipv4hint/ipv6hint of HTTPS and SVCB
// records and A/AAAA records in the additional section.
func (p *Proxy) sanitize(key cacheKey, msg *dns.Msg) {
	fake := p.fake != nil && !p.exclude.match(strings.TrimSuffix(key.name, "."))
	msg.Extra = slices.DeleteFunc(msg.Extra, func(rr dns.RR) bool {
		switch rr.Header().Rrtype {
		case dns.TypeOPT:
			return true
		case dns.TypeA, dns.TypeAAAA:
			return fake
		}
		return false
	})
	if fake {
		stripHints(msg.Answer)
		stripHints(msg.Extra)
	}
}

func stripHints(rrs []dns.RR) {
	for _, rr := range rrs {
		var s *dns.SVCB
		switch rr := rr.(type) {
		case *dns.SVCB:
			s = rr
		case *dns.HTTPS:
			s = &rr.SVCB
		default:
			continue
		}
		s.Value = slices.DeleteFunc(s.Value, func(kv dns.SVCBKeyValue) bool {
			k := kv.Key()
			return k == dns.SVCB_IPV4HINT || k == dns.SVCB_IPV6HINT
		})
	}
}

// bootstrapResolve finds an address for an upstream's hostname through the
// bootstrap servers: an IPv4 address if there is one, else an IPv6 one.
func (p *Proxy) bootstrapResolve(ctx context.Context, host string) (netip.Addr, error) {
	var errs []error
	for _, qtype := range []uint16{dns.TypeA, dns.TypeAAAA} {
		for _, b := range p.bootstrap {
			m := new(dns.Msg).SetQuestion(dns.Fqdn(host), qtype)
			resp, err := b.exchange(ctx, m)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if resp.Rcode != dns.RcodeSuccess {
				errs = append(errs, fmt.Errorf("bootstrap %s: %s", b.name, dns.RcodeToString[resp.Rcode]))
				continue
			}
			if a := firstAddr(resp.Answer, qtype); a.IsValid() {
				return a, nil
			}
			break // answered, without an address of this type
		}
	}
	if len(errs) == 0 {
		errs = append(errs, ErrNoSuchHost)
	}
	return netip.Addr{}, errors.Join(errs...)
}

func firstAddr(rrs []dns.RR, qtype uint16) netip.Addr {
	for _, rr := range rrs {
		if a := rrAddr(rr); a.IsValid() && rr.Header().Rrtype == qtype {
			return a
		}
	}
	return netip.Addr{}
}

func rrAddr(rr dns.RR) netip.Addr {
	var a netip.Addr
	switch rr := rr.(type) {
	case *dns.A:
		a, _ = netip.AddrFromSlice(rr.A.To4())
	case *dns.AAAA:
		a, _ = netip.AddrFromSlice(rr.AAAA.To16())
	}
	return a
}

// Domain returns the name behind addr: its fake-ip mapping when addr is a
// fake address, else the name a real answer gave addr for. The name is
// lower-case, without the trailing dot.
func (p *Proxy) Domain(addr netip.Addr) (string, bool) {
	addr = addr.Unmap()
	if p.fake != nil && p.fake.contains(addr) {
		return p.fake.lookup(addr)
	}
	return p.names.lookup(addr)
}

// IsFake reports whether addr is inside the fake ranges (fake-ip mode).
func (p *Proxy) IsFake(addr netip.Addr) bool {
	return p.fake != nil && p.fake.contains(addr.Unmap())
}

// Pin marks a fake address as used by a live flow: its mapping is not
// recycled until the matching Unpin. Calls nest; other addresses are
// ignored.
func (p *Proxy) Pin(addr netip.Addr) {
	if p.fake != nil {
		p.fake.pin(addr.Unmap())
	}
}

// Unpin undoes one Pin.
func (p *Proxy) Unpin(addr netip.Addr) {
	if p.fake != nil {
		p.fake.unpin(addr.Unmap())
	}
}

// Resolve returns the real addresses of name through the cache and the
// upstreams, never fake ones: AAAA records first when ipv6, else A records;
// the other family when the first has none. An IP literal is returned as
// is. A name that does not exist or has no address gives an error wrapping
// ErrNoSuchHost.
func (p *Proxy) Resolve(ctx context.Context, name string, ipv6 bool) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(name); err == nil {
		return []netip.Addr{a.Unmap()}, nil
	}
	fq := dns.CanonicalName(name)
	if _, ok := dns.IsDomainName(fq); !ok || fq == "." {
		return nil, fmt.Errorf("resolve %q: not a domain name", name)
	}
	types := []uint16{dns.TypeA, dns.TypeAAAA}
	if ipv6 {
		types[0], types[1] = types[1], types[0]
	}
	var lastErr error
	for _, qtype := range types {
		msg, _, _, err := p.resolve(ctx, cacheKey{name: fq, qtype: qtype, qclass: dns.ClassINET}, false)
		switch {
		case err != nil:
			lastErr = err
			if ctx.Err() != nil || errors.Is(err, errClosed) {
				return nil, fmt.Errorf("resolve %s: %w", name, err)
			}
			continue
		case msg.Rcode == dns.RcodeNameError:
			return nil, fmt.Errorf("resolve %s: %w", name, ErrNoSuchHost)
		case msg.Rcode != dns.RcodeSuccess:
			lastErr = fmt.Errorf("%s", dns.RcodeToString[msg.Rcode])
			continue
		}
		var addrs []netip.Addr
		for _, rr := range msg.Answer {
			if a := rrAddr(rr); a.IsValid() && rr.Header().Rrtype == qtype {
				addrs = append(addrs, a)
			}
		}
		if len(addrs) > 0 {
			return addrs, nil
		}
	}
	if lastErr != nil {
		return nil, fmt.Errorf("resolve %s: %w", name, lastErr)
	}
	return nil, fmt.Errorf("resolve %s: %w", name, ErrNoSuchHost)
}

// FlushCache drops every cached answer: the next query for each name goes
// upstream. Fake-ip mappings are kept.
func (p *Proxy) FlushCache() { p.cache.flush() }

// FlushFakeIP drops every fake-ip mapping that no live flow pins (and
// rewrites the store), returning how many; an app that still holds a
// dropped address gets no flow through it until it asks again. It fails
// in real mode.
func (p *Proxy) FlushFakeIP() (int, error) {
	if p.fake == nil {
		return 0, errors.New("dns.mode is not fake-ip")
	}
	return p.fake.flush()
}
