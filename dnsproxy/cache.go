package dnsproxy

import (
	"container/list"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// Cache lifetimes.
const (
	// staleWindow is how long after expiry an answer is still served (with
	// TTL 1) while one background query refreshes it.
	staleWindow = time.Hour
	// maxNegativeTTL caps negative caching (RFC 2308 §5).
	maxNegativeTTL = time.Hour
	// defaultNegativeTTL is used for negative answers without a SOA.
	defaultNegativeTTL = 30 * time.Second
	// maxPositiveTTL caps positive caching (RFC 8767 §4 suggests 7 days).
	maxPositiveTTL = 7 * 24 * time.Hour
)

// cacheKey identifies a cached answer. name is the lower-case FQDN.
type cacheKey struct {
	name   string
	qtype  uint16
	qclass uint16
	do     bool
}

// cacheEntry is one answer as the upstream gave it (without its OPT
// record): msg is shared by every reader and never modified.
type cacheEntry struct {
	key        cacheKey
	msg        *dns.Msg
	stored     time.Time
	ttl        time.Duration
	refreshing bool
	elem       *list.Element
}

// answerCache is a bounded LRU of answers.
type answerCache struct {
	mu      sync.Mutex
	max     int
	entries map[cacheKey]*cacheEntry
	lru     list.List // of *cacheEntry, most recent first
}

func newAnswerCache(max int) *answerCache {
	return &answerCache{max: max, entries: make(map[cacheKey]*cacheEntry)}
}

// cacheState is what get found.
type cacheState int

const (
	cacheMiss cacheState = iota
	cacheFresh
	cacheStale
)

// get looks key up at now. For a fresh or stale hit it returns the answer
// and its age; refresh is true for exactly one caller per stale period,
// which must then refresh the entry (and call refreshFailed if that fails).
func (c *answerCache) get(key cacheKey, now time.Time) (msg *dns.Msg, age time.Duration, state cacheState, refresh bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[key]
	if !ok {
		return nil, 0, cacheMiss, false
	}
	age = now.Sub(e.stored)
	if age < 0 {
		age = 0
	}
	switch {
	case age < e.ttl:
		state = cacheFresh
	case age < e.ttl+staleWindow:
		state = cacheStale
		if !e.refreshing {
			e.refreshing, refresh = true, true
		}
	default:
		c.remove(e)
		return nil, 0, cacheMiss, false
	}
	c.lru.MoveToFront(e.elem)
	return e.msg, age, state, refresh
}

// put stores msg under key for ttl, evicting the least recently used entry
// when full.
func (c *answerCache) put(key cacheKey, msg *dns.Msg, ttl time.Duration, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[key]; ok {
		e.msg, e.stored, e.ttl, e.refreshing = msg, now, ttl, false
		c.lru.MoveToFront(e.elem)
		return
	}
	e := &cacheEntry{key: key, msg: msg, stored: now, ttl: ttl}
	e.elem = c.lru.PushFront(e)
	c.entries[key] = e
	for len(c.entries) > c.max {
		c.remove(c.lru.Back().Value.(*cacheEntry))
	}
}

// refreshFailed lets a later stale hit try the refresh again.
func (c *answerCache) refreshFailed(key cacheKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[key]; ok {
		e.refreshing = false
	}
}

func (c *answerCache) remove(e *cacheEntry) {
	c.lru.Remove(e.elem)
	delete(c.entries, e.key)
}

func (c *answerCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.entries)
}

// cacheTTL returns how long an upstream answer may be cached: the smallest
// answer TTL for a positive answer; for NXDOMAIN and NODATA the smaller of
// the SOA's TTL and MINIMUM (RFC 2308 §5), capped at maxNegativeTTL, or
// defaultNegativeTTL without a SOA. Other rcodes and zero TTLs are not
// cached (ok false).
func cacheTTL(m *dns.Msg) (ttl time.Duration, ok bool) {
	switch {
	case m.Truncated:
		return 0, false
	case m.Rcode == dns.RcodeSuccess && len(m.Answer) > 0:
		minTTL := ^uint32(0)
		for _, rr := range m.Answer {
			minTTL = min(minTTL, rr.Header().Ttl)
		}
		if minTTL == 0 {
			return 0, false
		}
		return min(time.Duration(minTTL)*time.Second, maxPositiveTTL), true
	case m.Rcode == dns.RcodeSuccess || m.Rcode == dns.RcodeNameError:
		for _, rr := range m.Ns {
			if soa, isSOA := rr.(*dns.SOA); isSOA {
				s := min(soa.Hdr.Ttl, soa.Minttl)
				if s == 0 {
					return 0, false
				}
				return min(time.Duration(s)*time.Second, maxNegativeTTL), true
			}
		}
		return defaultNegativeTTL, true
	}
	return 0, false
}

// flush drops every answer.
func (c *answerCache) flush() {
	c.mu.Lock()
	defer c.mu.Unlock()
	clear(c.entries)
	c.lru.Init()
}
