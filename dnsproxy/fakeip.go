package dnsproxy

import (
	"container/list"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync"
)

// maxFakeAddrs caps the addresses used from one range, which bounds the
// memory of the pool (and of its store) however large the range is.
const maxFakeAddrs = 1 << 17

// fakeIPPool hands out fake addresses for names, sequentially through each
// range and then by recycling the least recently used mapping that no live
// flow has pinned. With a store, every new mapping is written to the store
// before it is returned.
type fakeIPPool struct {
	mu     sync.Mutex
	v4, v6 *fakeRange // nil when that family is disabled
	store  *fakeIPStore
	log    *slog.Logger
	// storeFailed keeps a failing store from logging once per query.
	storeFailed bool
}

// fakeRange is the pool of one address family.
type fakeRange struct {
	prefix netip.Prefix
	first  netip.Addr // prefix address + 1
	size   uint64     // usable addresses from first
	next   uint64     // offset of the next never-used address
	byName map[string]*fakeEntry
	byAddr map[netip.Addr]*fakeEntry
	lru    list.List // unpinned entries, most recent first
}

// fakeEntry maps one name to one address. elem is nil while pinned.
type fakeEntry struct {
	name string
	addr netip.Addr
	pins int
	elem *list.Element
}

func newFakeIPPool(r4, r6 netip.Prefix, log *slog.Logger) *fakeIPPool {
	return &fakeIPPool{v4: newFakeRange(r4), v6: newFakeRange(r6), log: log}
}

func newFakeRange(p netip.Prefix) *fakeRange {
	if !p.IsValid() {
		return nil
	}
	p = p.Masked()
	size := uint64(maxFakeAddrs)
	if hostBits := p.Addr().BitLen() - p.Bits(); hostBits < 18 {
		size = min(size, uint64(1)<<hostBits-2) // without the first and last address
	}
	return &fakeRange{
		prefix: p,
		first:  p.Addr().Next(),
		size:   size,
		byName: make(map[string]*fakeEntry),
		byAddr: make(map[netip.Addr]*fakeEntry),
	}
}

func (p *fakeIPPool) rangeOf(addr netip.Addr) *fakeRange {
	switch {
	case addr.Is4() && p.v4 != nil && p.v4.prefix.Contains(addr):
		return p.v4
	case addr.Is6() && p.v6 != nil && p.v6.prefix.Contains(addr):
		return p.v6
	}
	return nil
}

// contains reports whether addr is inside one of the ranges.
func (p *fakeIPPool) contains(addr netip.Addr) bool { return p.rangeOf(addr) != nil }

// enabled reports whether the family has a range.
func (p *fakeIPPool) enabled(v6 bool) bool {
	if v6 {
		return p.v6 != nil
	}
	return p.v4 != nil
}

// assign returns the address mapped to name (lower-case, no trailing dot),
// mapping it first if needed. The family must be enabled.
func (p *fakeIPPool) assign(name string, v6 bool) (netip.Addr, error) {
	r := p.v4
	if v6 {
		r = p.v6
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := r.byName[name]; ok {
		r.touch(e)
		return e.addr, nil
	}
	addr, ok := r.allocate()
	if !ok {
		return netip.Addr{}, fmt.Errorf("fake-ip pool %s exhausted: all %d addresses are pinned by live flows", r.prefix, r.size)
	}
	r.insert(name, addr)
	if p.store != nil {
		err := p.store.append(addr, name)
		switch {
		case err != nil && !p.storeFailed:
			p.storeFailed = true
			p.log.Error("fake-ip store: mapping not saved, it will not survive a restart", "name", name, "addr", addr, "err", err)
		case err == nil:
			p.storeFailed = false
			if p.store.needsCompaction(p.lenLocked()) {
				if err := p.store.rewrite(p.snapshot()); err != nil {
					p.log.Error("fake-ip store: compaction failed", "err", err)
				}
			}
		}
	}
	return addr, nil
}

// lookup returns the name mapped to addr and marks the mapping as used.
func (p *fakeIPPool) lookup(addr netip.Addr) (string, bool) {
	r := p.rangeOf(addr)
	if r == nil {
		return "", false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := r.byAddr[addr]
	if !ok {
		return "", false
	}
	r.touch(e)
	return e.name, true
}

// pin keeps addr's mapping from being recycled until the matching unpin.
// Pinning an unmapped address does nothing.
func (p *fakeIPPool) pin(addr netip.Addr) {
	r := p.rangeOf(addr)
	if r == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := r.byAddr[addr]; ok {
		e.pins++
		if e.elem != nil {
			r.lru.Remove(e.elem)
			e.elem = nil
		}
	}
}

func (p *fakeIPPool) unpin(addr netip.Addr) {
	r := p.rangeOf(addr)
	if r == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := r.byAddr[addr]; ok && e.pins > 0 {
		e.pins--
		if e.pins == 0 {
			e.elem = r.lru.PushFront(e)
		}
	}
}

// len returns the number of mappings.
func (p *fakeIPPool) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lenLocked()
}

func (p *fakeIPPool) lenLocked() int {
	n := 0
	if p.v4 != nil {
		n += len(p.v4.byAddr)
	}
	if p.v6 != nil {
		n += len(p.v6.byAddr)
	}
	return n
}

// replay applies one stored mapping (last write wins); records outside the
// usable ranges are skipped.
func (p *fakeIPPool) replay(addr netip.Addr, name string) bool {
	r := p.rangeOf(addr)
	if r == nil || !r.usable(addr) || !validFakeName(name) {
		return false
	}
	r.insert(name, addr)
	return true
}

// snapshot returns every mapping, least recently used first, so that
// replaying it rebuilds the same order.
func (p *fakeIPPool) snapshot() []fakeMapping {
	var out []fakeMapping
	for _, r := range []*fakeRange{p.v4, p.v6} {
		out = append(out, r.entries()...)
	}
	return out
}

type fakeMapping struct {
	addr netip.Addr
	name string
}

func (r *fakeRange) entries() []fakeMapping {
	if r == nil {
		return nil
	}
	out := make([]fakeMapping, 0, len(r.byAddr))
	for _, e := range r.byAddr {
		if e.elem == nil { // pinned: keep them, order does not matter
			out = append(out, fakeMapping{e.addr, e.name})
		}
	}
	for el := r.lru.Back(); el != nil; el = el.Prev() {
		e := el.Value.(*fakeEntry)
		out = append(out, fakeMapping{e.addr, e.name})
	}
	return out
}

func (r *fakeRange) touch(e *fakeEntry) {
	if e.elem != nil {
		r.lru.MoveToFront(e.elem)
	}
}

// allocate returns the next never-used address, else recycles the least
// recently used unpinned mapping; ok is false when every address is pinned.
func (r *fakeRange) allocate() (netip.Addr, bool) {
	for r.next < r.size {
		a := addrAdd(r.first, r.next)
		r.next++
		if _, used := r.byAddr[a]; !used {
			return a, true
		}
	}
	el := r.lru.Back()
	if el == nil {
		return netip.Addr{}, false
	}
	e := el.Value.(*fakeEntry)
	r.lru.Remove(el)
	delete(r.byName, e.name)
	delete(r.byAddr, e.addr)
	return e.addr, true
}

// insert maps name to addr, dropping whatever either was mapped to before.
func (r *fakeRange) insert(name string, addr netip.Addr) {
	if old, ok := r.byAddr[addr]; ok {
		if old.name == name {
			r.touch(old)
			return
		}
		r.drop(old)
	}
	if old, ok := r.byName[name]; ok {
		r.drop(old)
	}
	e := &fakeEntry{name: name, addr: addr}
	e.elem = r.lru.PushFront(e)
	r.byName[name] = e
	r.byAddr[addr] = e
}

func (r *fakeRange) drop(e *fakeEntry) {
	if e.elem != nil {
		r.lru.Remove(e.elem)
	}
	delete(r.byName, e.name)
	delete(r.byAddr, e.addr)
}

// usable reports whether addr is one the range hands out.
func (r *fakeRange) usable(addr netip.Addr) bool {
	off, ok := addrOffset(r.first, addr)
	return ok && off < r.size
}

// addrAdd returns a+off (same family; wraps silently, callers stay in range).
func addrAdd(a netip.Addr, off uint64) netip.Addr {
	if a.Is4() {
		b := a.As4()
		v := binary.BigEndian.Uint32(b[:]) + uint32(off)
		binary.BigEndian.PutUint32(b[:], v)
		return netip.AddrFrom4(b)
	}
	b := a.As16()
	hi, lo := binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
	nlo := lo + off
	if nlo < lo {
		hi++
	}
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], nlo)
	return netip.AddrFrom16(b)
}

// addrOffset returns a-base when a >= base, same family, and the difference
// fits in 64 bits.
func addrOffset(base, a netip.Addr) (uint64, bool) {
	if base.Is4() != a.Is4() || a.Less(base) {
		return 0, false
	}
	if a.Is4() {
		x, y := base.As4(), a.As4()
		return uint64(binary.BigEndian.Uint32(y[:]) - binary.BigEndian.Uint32(x[:])), true
	}
	x, y := base.As16(), a.As16()
	xh, xl := binary.BigEndian.Uint64(x[:8]), binary.BigEndian.Uint64(x[8:])
	yh, yl := binary.BigEndian.Uint64(y[:8]), binary.BigEndian.Uint64(y[8:])
	if yl < xl {
		yh--
	}
	if yh != xh {
		return 0, false
	}
	return yl - xl, true
}

// validFakeName reports whether a name can be stored: presentation format
// as miekg/dns produces it, so printable ASCII only, no line breaks.
func validFakeName(name string) bool {
	if name == "" || len(name) > 1024 {
		return false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}

// parseReverseName returns the address of an in-addr.arpa or ip6.arpa name
// (lower-case FQDN).
func parseReverseName(name string) (netip.Addr, bool) {
	if s, ok := strings.CutSuffix(name, ".in-addr.arpa."); ok {
		labels := strings.Split(s, ".")
		if len(labels) != 4 {
			return netip.Addr{}, false
		}
		var b [4]byte
		for i, l := range labels {
			if len(l) == 0 || len(l) > 3 || (len(l) > 1 && l[0] == '0') {
				return netip.Addr{}, false
			}
			n, err := strconv.ParseUint(l, 10, 8)
			if err != nil {
				return netip.Addr{}, false
			}
			b[3-i] = byte(n)
		}
		return netip.AddrFrom4(b), true
	}
	if s, ok := strings.CutSuffix(name, ".ip6.arpa."); ok {
		if len(s) != 63 {
			return netip.Addr{}, false
		}
		var b [16]byte
		for i := 0; i < 32; i++ {
			if i > 0 && s[2*i-1] != '.' {
				return netip.Addr{}, false
			}
			n, err := strconv.ParseUint(s[2*i:2*i+1], 16, 8)
			if err != nil {
				return netip.Addr{}, false
			}
			// Nibble i (from the start of the name) is nibble 31-i of
			// the address.
			pos := 31 - i
			if pos%2 == 0 {
				b[pos/2] |= byte(n) << 4
			} else {
				b[pos/2] |= byte(n)
			}
		}
		return netip.AddrFrom16(b), true
	}
	return netip.Addr{}, false
}

// flush drops every mapping no live flow pins and returns how many. The
// dropped addresses are not handed out again before the never-used ones
// run out (an app may still hold one), as with recycling.
func (p *fakeIPPool) flush() (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, r := range []*fakeRange{p.v4, p.v6} {
		if r == nil {
			continue
		}
		for el := r.lru.Front(); el != nil; {
			next := el.Next()
			r.drop(el.Value.(*fakeEntry))
			n++
			el = next
		}
		if r.next >= r.size {
			// Recycling had begun: the scan for unused addresses starts
			// over (allocate skips the pinned ones).
			r.next = 0
		}
	}
	if n > 0 && p.store != nil {
		if err := p.store.rewrite(p.snapshot()); err != nil {
			return n, fmt.Errorf("fake-ip store: %w", err)
		}
	}
	return n, nil
}
