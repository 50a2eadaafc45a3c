package outbound

import "sync"

// boundSocket is a live upstream socket that DirectConfig.InterfaceFor
// bound to an interface.
type boundSocket interface {
	// bound returns the interface and whether the socket is IPv6.
	bound() (iface string, v6 bool)
	// end ends the flow at once (TCP: RST; UDP: close).
	end()
}

// boundSockets is a Direct's live bound sockets by interface name, so
// that those on an interface that vanished can be ended. A socket is
// added once connected and removed when it closes; each costs one map
// entry and a lock on dial and close, nothing per packet.
type boundSockets struct {
	mu sync.Mutex
	by map[string]map[boundSocket]struct{}
}

func (b *boundSockets) add(s boundSocket) {
	iface, _ := s.bound()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.by == nil {
		b.by = make(map[string]map[boundSocket]struct{})
	}
	set := b.by[iface]
	if set == nil {
		set = make(map[boundSocket]struct{})
		b.by[iface] = set
	}
	set[s] = struct{}{}
}

func (b *boundSockets) remove(s boundSocket) {
	iface, _ := s.bound()
	b.mu.Lock()
	defer b.mu.Unlock()
	set := b.by[iface]
	delete(set, s)
	if len(set) == 0 {
		delete(b.by, iface)
	}
}

// take removes and returns the sockets bound to iface of one family.
func (b *boundSockets) take(iface string, v6 bool) []boundSocket {
	b.mu.Lock()
	defer b.mu.Unlock()
	set := b.by[iface]
	var out []boundSocket
	for s := range set {
		if _, sv6 := s.bound(); sv6 == v6 {
			out = append(out, s)
			delete(set, s)
		}
	}
	if len(set) == 0 {
		delete(b.by, iface)
	}
	return out
}

// count returns how many sockets are tracked (for tests).
func (b *boundSockets) count() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, set := range b.by {
		n += len(set)
	}
	return n
}

// boundTCP is a directTCP that InterfaceFor bound, tracked until it
// closes.
type boundTCP struct {
	directTCP
	set   *boundSockets
	iface string
	v6    bool
}

func (c *boundTCP) bound() (string, bool) { return c.iface, c.v6 }

// end resets the connection: the relay's read fails, and it resets the
// app's side.
func (c *boundTCP) end() { _ = c.directTCP.Abort() }

// Close implements net.Conn.
func (c *boundTCP) Close() error {
	c.set.remove(c)
	return c.directTCP.Close()
}

// Abort closes the connection with a RST.
func (c *boundTCP) Abort() error {
	c.set.remove(c)
	return c.directTCP.Abort()
}
