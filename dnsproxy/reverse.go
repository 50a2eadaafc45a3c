package dnsproxy

import (
	"container/list"
	"net/netip"
	"sync"

	"github.com/miekg/dns"
)

// addrNames remembers, for real answers, which name each address was given
// for (the last answer wins), bounded, least recently used out first.
type addrNames struct {
	mu  sync.Mutex
	max int
	m   map[netip.Addr]*list.Element // of *addrName
	lru list.List
}

type addrName struct {
	addr netip.Addr
	name string
}

func newAddrNames(max int) *addrNames {
	return &addrNames{max: max, m: make(map[netip.Addr]*list.Element)}
}

// record remembers every A and AAAA of answer under name (lower-case, no
// trailing dot).
func (a *addrNames) record(name string, answer []dns.RR) {
	var locked bool
	for _, rr := range answer {
		addr := rrAddr(rr)
		if !addr.IsValid() {
			continue
		}
		if !locked {
			a.mu.Lock()
			defer a.mu.Unlock()
			locked = true
		}
		if el, ok := a.m[addr]; ok {
			el.Value.(*addrName).name = name
			a.lru.MoveToFront(el)
			continue
		}
		a.m[addr] = a.lru.PushFront(&addrName{addr, name})
		if len(a.m) > a.max {
			old := a.lru.Remove(a.lru.Back()).(*addrName)
			delete(a.m, old.addr)
		}
	}
}

func (a *addrNames) lookup(addr netip.Addr) (string, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	el, ok := a.m[addr]
	if !ok {
		return "", false
	}
	a.lru.MoveToFront(el)
	return el.Value.(*addrName).name, true
}
