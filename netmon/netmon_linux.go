//go:build linux

package netmon

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// How the Linux Monitor works: it subscribes to rtnetlink's link, route
// and address groups, and whenever something relevant arrives it reads
// the links and the main table again, whole. Reading beats applying each
// notification: the kernel removes routes without a word when a link goes
// down or an address goes (IPv4 flushes them silently), and a reading
// taken after the notification always includes it. A burst of
// notifications (a link deleted takes its addresses and routes along) is
// read once. Main tables are small; a reading takes well under a
// millisecond.

const (
	// netlinkTimeout bounds every netlink request.
	netlinkTimeout = 10 * time.Second
	// rcvBuf is the receive buffer asked for the notification sockets, so
	// that a burst (many links created at once) does not overflow them.
	rcvBuf = 1 << 20
	// retryDelay is the pause before reading again after a failed
	// reading, and before subscribing again after a lost subscription.
	retryDelay = 250 * time.Millisecond
	// maxDrain bounds the notifications taken before a reading.
	maxDrain = 4096
)

// follow reads the kernel's state and starts following it; stop ends
// that and waits for every goroutine behind it.
func (m *Monitor) follow() (stop func(), err error) {
	k, err := openKernel()
	if err != nil {
		return nil, err
	}
	// Subscribed before the first reading: whatever changes after the
	// reading is notified.
	sub, err := subscribe(k.ns)
	if err != nil {
		k.close()
		return nil, fmt.Errorf("netmon: subscribe to route changes: %w", err)
	}
	t, err := k.read()
	if err != nil {
		sub.close()
		k.close()
		return nil, fmt.Errorf("netmon: %w", err)
	}
	m.apply(t)
	stopc, done := make(chan struct{}), make(chan struct{})
	go m.run(k, sub, stopc, done)
	return func() {
		close(stopc)
		<-done
	}, nil
}

// run follows the kernel until stopc closes, then closes done. It owns k
// and sub.
func (m *Monitor) run(k *kernel, sub *subscription, stopc <-chan struct{}, done chan<- struct{}) {
	var (
		retry  *time.Timer
		retryC <-chan time.Time
		failed bool // the last reading or subscription failed
	)
	defer func() {
		if retry != nil {
			retry.Stop()
		}
		if sub != nil {
			sub.close()
		}
		k.close()
		close(done)
	}()
	arm := func() {
		if retry == nil {
			retry = time.NewTimer(retryDelay)
		} else {
			retry.Reset(retryDelay)
		}
		retryC = retry.C
	}
	fail := func(what string, err error) {
		if !failed {
			m.log.Warn(what+"; retrying", "err", err)
		}
		failed = true
		arm()
	}
	for {
		var (
			links  <-chan netlink.LinkUpdate
			routes <-chan netlink.RouteUpdate
			addrs  <-chan netlink.AddrUpdate
			lost   bool
		)
		if sub != nil {
			links, routes, addrs = sub.links, sub.routes, sub.addrs
		}
		select {
		case <-stopc:
			return
		case <-retryC:
			retryC = nil
		case u, ok := <-routes:
			if ok && !relevantRoute(u) {
				continue
			}
			lost = !ok
		case _, ok := <-links:
			lost = !ok
		case _, ok := <-addrs:
			lost = !ok
		}
		if sub != nil && (lost || sub.drain()) {
			// Notifications were lost (a receive error, ENOBUFS):
			// subscribe again and read everything.
			err := sub.err()
			sub.close()
			sub = nil
			fail("route change notifications stopped", err)
			continue
		}
		if sub == nil {
			s, err := subscribe(k.ns)
			if err != nil {
				fail("subscribe to route changes", err)
				continue
			}
			sub = s
		}
		t, err := k.read()
		if err != nil {
			fail("read routes", err)
			continue
		}
		if failed {
			m.log.Info("following route changes again")
			failed = false
		}
		m.apply(t)
	}
}

// relevantRoute reports whether a route notification can change what the
// Monitor reports: main-table routes only, not cached clones.
func relevantRoute(u netlink.RouteUpdate) bool {
	return u.Table == unix.RT_TABLE_MAIN && u.Flags&unix.RTM_F_CLONED == 0
}

// kernel reads one network namespace's links and main table.
type kernel struct {
	ns netns.NsHandle
	h  *netlink.Handle
}

// openKernel opens the network namespace of the calling thread.
func openKernel() (*kernel, error) {
	runtime.LockOSThread()
	ns, err := netns.Get()
	runtime.UnlockOSThread()
	if err != nil {
		return nil, fmt.Errorf("netmon: network namespace: %w", err)
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("netmon: netlink: %w", err)
	}
	if err := h.SetSocketTimeout(netlinkTimeout); err != nil {
		h.Close()
		ns.Close()
		return nil, fmt.Errorf("netmon: netlink: %w", err)
	}
	return &kernel{ns: ns, h: h}, nil
}

func (k *kernel) close() {
	k.h.Close()
	k.ns.Close()
}

// read returns the current table, reading again when the kernel says a
// dump was interrupted by a change.
func (k *kernel) read() (*table, error) {
	var err error
	for range 5 {
		var t *table
		if t, err = k.readOnce(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return t, err
		}
	}
	return nil, err
}

func (k *kernel) readOnce() (*table, error) {
	nls, err := k.h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	links := make([]link, 0, len(nls))
	for _, l := range nls {
		links = append(links, linkOf(l))
	}
	var routes []route
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		nrs, err := k.h.RouteListFiltered(fam, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if errors.Is(err, unix.EAFNOSUPPORT) {
			continue // a kernel without IPv6
		}
		if err != nil {
			return nil, fmt.Errorf("list %s routes: %w", family(fam == netlink.FAMILY_V6), err)
		}
		for _, r := range nrs {
			if rt, ok := routeOf(r); ok {
				routes = append(routes, rt)
			}
		}
	}
	return newTable(links, routes), nil
}

// linkOf converts a netlink link.
func linkOf(l netlink.Link) link {
	a := l.Attrs()
	return link{index: a.Index, name: a.Name, up: a.Flags&net.FlagUp != 0}
}

// routeOf converts a main-table netlink route; false for one that never
// matches a flow of tungate's (a TOS route, a cached clone, not IP).
func routeOf(r netlink.Route) (route, bool) {
	if r.Tos != 0 || r.Flags&unix.RTM_F_CLONED != 0 {
		return route{}, false
	}
	var dst netip.Prefix
	switch {
	case r.Dst != nil:
		a, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			return route{}, false
		}
		a = a.Unmap()
		ones, _ := r.Dst.Mask.Size()
		if dst = netip.PrefixFrom(a, ones); !dst.IsValid() {
			return route{}, false
		}
	case r.Family == netlink.FAMILY_V4:
		dst = netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	case r.Family == netlink.FAMILY_V6:
		dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	default:
		return route{}, false
	}
	rt := route{dst: dst, metric: r.Priority}
	// The kernel always says unicast; a route built by hand may leave
	// the type unset, which the kernel takes as unicast.
	if r.Type != unix.RTN_UNSPEC && r.Type != unix.RTN_UNICAST {
		rt.kind = kindBlock
	}
	if len(r.MultiPath) > 0 {
		for _, nh := range r.MultiPath {
			if nh.LinkIndex > 0 && nh.Flags&unix.RTNH_F_DEAD == 0 {
				rt.links = append(rt.links, nh.LinkIndex)
			}
		}
	} else if r.LinkIndex > 0 && r.Flags&unix.RTNH_F_DEAD == 0 {
		rt.links = []int{r.LinkIndex}
	}
	return rt, true
}

// subscription is one set of rtnetlink notification sockets (links,
// routes, addresses). The library's goroutines behind it end, closing
// their channels, once done is closed and whatever they hold is taken.
type subscription struct {
	done    chan struct{}
	links   chan netlink.LinkUpdate
	routes  chan netlink.RouteUpdate
	addrs   chan netlink.AddrUpdate
	lastErr atomic.Pointer[error]
}

// subscribe opens notification sockets in ns.
func subscribe(ns netns.NsHandle) (*subscription, error) {
	s := &subscription{done: make(chan struct{})}
	onErr := func(err error) { s.lastErr.Store(&err) }
	links := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(links, s.done, netlink.LinkSubscribeOptions{
		Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: rcvBuf,
	}); err != nil {
		s.close()
		return nil, fmt.Errorf("links: %w", err)
	}
	s.links = links
	routes := make(chan netlink.RouteUpdate, 64)
	if err := netlink.RouteSubscribeWithOptions(routes, s.done, netlink.RouteSubscribeOptions{
		Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: rcvBuf,
	}); err != nil {
		s.close()
		return nil, fmt.Errorf("routes: %w", err)
	}
	s.routes = routes
	addrs := make(chan netlink.AddrUpdate, 64)
	if err := netlink.AddrSubscribeWithOptions(addrs, s.done, netlink.AddrSubscribeOptions{
		Namespace: &ns, ErrorCallback: onErr, ReceiveBufferSize: rcvBuf,
	}); err != nil {
		s.close()
		return nil, fmt.Errorf("addresses: %w", err)
	}
	s.addrs = addrs
	return s, nil
}

// err returns the last error a notification socket reported, if any.
func (s *subscription) err() error {
	if p := s.lastErr.Load(); p != nil {
		return *p
	}
	return nil
}

// drain takes the notifications already queued (a reading follows that
// covers them all) and reports whether a channel closed: notifications
// were lost.
func (s *subscription) drain() (lost bool) {
	for range maxDrain {
		select {
		case _, ok := <-s.links:
			if !ok {
				return true
			}
		case _, ok := <-s.routes:
			if !ok {
				return true
			}
		case _, ok := <-s.addrs:
			if !ok {
				return true
			}
		default:
			return false
		}
	}
	return false
}

// close closes the sockets and waits for the library's goroutines to
// close the channels, taking what they still send.
func (s *subscription) close() {
	close(s.done)
	links, routes, addrs := s.links, s.routes, s.addrs
	for links != nil || routes != nil || addrs != nil {
		select {
		case _, ok := <-links:
			if !ok {
				links = nil
			}
		case _, ok := <-routes:
			if !ok {
				routes = nil
			}
		case _, ok := <-addrs:
			if !ok {
				addrs = nil
			}
		}
	}
}
