package outbound

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DirectConfig configures a Direct outbound.
type DirectConfig struct {
	Name string
	// Interface binds every socket to this interface (SO_BINDTODEVICE on
	// Linux, IP_BOUND_IF on macOS); "" leaves the choice to InterfaceFor,
	// or to the routing table.
	Interface string
	// InterfaceFor, used when Interface is "", names the interface to
	// bind each new socket to, given the destination it is opened for
	// (the host's default interface, or the one its main routing table
	// sends that destination out of); it is asked at every dial, so a
	// default-route change moves new flows at once. "" binds none: the
	// fwmark alone keeps such a socket out of the TUN. The sockets it
	// bound are tracked until they close, so that AbortInterface can end
	// them. It must be fast and safe for concurrent use.
	InterfaceFor func(dst netip.Addr) string
	// FWMark is set as SO_MARK on every socket (Linux) so that policy routing
	// can keep tungate's own traffic out of the TUN; 0 sets none.
	FWMark uint32
	// KeepAlive is the TCP keepalive period of upstream connections; 0 uses
	// the Go default, negative disables it.
	KeepAlive time.Duration
	// Resolver, when set, turns placeholder (fake-ip) destinations that
	// carry a domain into real addresses.
	Resolver Resolver
	// Dialing, when set, is told the real destination of every socket
	// before it connects (done once the connect returned) or, for a UDP
	// session, before its first datagram (done when it closes): the loop
	// detector then asks the kernel only about flows to those.
	Dialing func(dst netip.AddrPort) (done func())
}

// Resolver resolves the names behind placeholder addresses.
type Resolver interface {
	// IsFake reports whether addr is a placeholder that only stands for
	// a name.
	IsFake(addr netip.Addr) bool
	// Resolve returns real addresses for name, of the family asked for
	// first.
	Resolve(ctx context.Context, name string, ipv6 bool) ([]netip.Addr, error)
}

// Direct dials upstreams from this host, bypassing the TUN.
type Direct struct {
	cfg    DirectConfig
	log    *slog.Logger
	dialer net.Dialer
	listen net.ListenConfig
	// follow: sockets are bound by InterfaceFor and tracked in bound.
	follow bool
	bound  boundSockets
}

// NewDirect returns a direct outbound. It fails when the options cannot be
// honoured on this OS.
func NewDirect(cfg DirectConfig, log *slog.Logger) (*Direct, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	control, err := socketControl(cfg.Interface, cfg.FWMark)
	if err != nil {
		return nil, fmt.Errorf("direct outbound %q: %w", cfg.Name, err)
	}
	d := &Direct{cfg: cfg, log: log, follow: cfg.Interface == "" && cfg.InterfaceFor != nil}
	d.dialer = net.Dialer{Control: control, KeepAlive: cfg.KeepAlive}
	d.listen = net.ListenConfig{Control: control}
	return d, nil
}

// bindFor returns the interface a socket to dst is bound to ("" for
// none) and the socket control that binds and marks it.
func (d *Direct) bindFor(dst netip.Addr) (string, func(network, address string, c syscall.RawConn) error, error) {
	if !d.follow {
		return "", d.dialer.Control, nil
	}
	iface := d.cfg.InterfaceFor(dst.Unmap())
	if iface == "" {
		return "", d.dialer.Control, nil
	}
	control, err := socketControl(iface, d.cfg.FWMark)
	if err != nil {
		return "", nil, err
	}
	return iface, control, nil
}

// AbortInterface ends every live flow whose socket InterfaceFor bound to
// iface, for IPv6 (v6) or IPv4 sockets: TCP connections are reset (the
// relay then resets the app's side), UDP sessions closed. It returns how
// many it ended. Call it when iface can no longer carry that family (it
// was deleted, set down, or lost its routes): those flows are dead, and
// without it the apps would wait for TCP's timeouts.
func (d *Direct) AbortInterface(iface string, v6 bool) int {
	socks := d.bound.take(iface, v6)
	for _, s := range socks {
		s.end()
	}
	return len(socks)
}

// Name implements Dialer.
func (d *Direct) Name() string { return d.cfg.Name }

// DialTCP implements Dialer.
func (d *Direct) DialTCP(ctx context.Context, dst Target) (TCPConn, error) {
	addrs, err := d.realAddrs(ctx, dst)
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		iface, control, berr := d.bindFor(a)
		if berr != nil {
			err = berr
			break
		}
		dialer := d.dialer
		dialer.Control = control
		to := netip.AddrPortFrom(a, dst.Addr.Port())
		done := d.dialing(to)
		var c net.Conn
		c, err = dialer.DialContext(ctx, "tcp", to.String())
		done()
		if err == nil {
			tc := directTCP{c.(*net.TCPConn)}
			if iface == "" {
				return tc, nil
			}
			b := &boundTCP{directTCP: tc, set: &d.bound, iface: iface, v6: a.Unmap().Is6()}
			d.bound.add(b)
			return b, nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		err = refused{err}
	}
	return nil, fmt.Errorf("%s: dial %s: %w", d.cfg.Name, dst, err)
}

// realAddrs returns the addresses to dial for dst: its own, or, for a
// placeholder, what its name resolves to.
func (d *Direct) realAddrs(ctx context.Context, dst Target) ([]netip.Addr, error) {
	a := dst.Addr.Addr()
	if !d.isFake(a) {
		return []netip.Addr{a}, nil
	}
	if dst.Domain == "" {
		return nil, fmt.Errorf("%s: %s is a fake-ip address with no name behind it (mapping lost?)", d.cfg.Name, dst)
	}
	addrs, err := d.cfg.Resolver.Resolve(ctx, dst.Domain, a.Is6())
	if err != nil {
		return nil, fmt.Errorf("%s: resolve %s: %w", d.cfg.Name, dst.Domain, err)
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("%s: resolve %s: no addresses", d.cfg.Name, dst.Domain)
	}
	return addrs, nil
}

// dialing reports a socket about to open towards dst (see
// DirectConfig.Dialing).
func (d *Direct) dialing(dst netip.AddrPort) (done func()) {
	if d.cfg.Dialing == nil {
		return func() {}
	}
	return d.cfg.Dialing(dst)
}

func (d *Direct) isFake(a netip.Addr) bool {
	return d.cfg.Resolver != nil && d.cfg.Resolver.IsFake(a)
}

// ListenUDP implements Dialer.
func (d *Direct) ListenUDP(ctx context.Context, first Target) (PacketConn, error) {
	network, local := "udp4", "0.0.0.0:0"
	if first.Addr.Addr().Is6() {
		network, local = "udp6", "[::]:0"
	}
	// The first destination's name is resolved here, off the packet path,
	// so that a session to one fake-ip destination never drops a datagram.
	var firstReal netip.Addr
	if d.isFake(first.Addr.Addr()) {
		addrs, err := d.realAddrs(ctx, first)
		if err != nil {
			return nil, err
		}
		firstReal = addrs[0]
	}
	// The session's socket is bound for its first destination; later
	// ones of the same family leave by the same interface.
	to := first.Addr.Addr()
	if firstReal.IsValid() {
		to = firstReal
	}
	iface, control, err := d.bindFor(to)
	if err != nil {
		return nil, fmt.Errorf("%s: udp socket for %s: %w", d.cfg.Name, first, err)
	}
	listen := d.listen
	listen.Control = control
	pc, err := listen.ListenPacket(ctx, network, local)
	if err != nil {
		return nil, fmt.Errorf("%s: udp socket for %s: %w", d.cfg.Name, first, err)
	}
	c := pc.(*net.UDPConn)
	raw, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: udp socket for %s: %w", d.cfg.Name, first, err)
	}
	if err := enableICMPErrors(raw, network == "udp6"); err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: udp socket for %s: %w", d.cfg.Name, first, err)
	}
	u := &directUDP{d: d, conn: c, raw: raw, v6: network == "udp6", iface: iface, dialed: sync.OnceFunc(d.dialing(netip.AddrPortFrom(to, first.Addr.Port())))}
	if firstReal.IsValid() {
		u.mapFake(first.Addr.Addr(), firstReal)
	}
	if iface != "" {
		d.bound.add(u)
	}
	return u, nil
}

// refused marks an upstream refusal while keeping the original error.
type refused struct{ err error }

func (r refused) Error() string        { return r.err.Error() }
func (r refused) Unwrap() []error      { return []error{ErrRefused, r.err} }
func (r refused) Is(target error) bool { return target == ErrRefused }

type directTCP struct{ *net.TCPConn }

// WaitReadable blocks until a Read would not block, without taking a
// buffer: the relay's way of holding no memory for idle flows. MSG_PEEK
// tells whether data is already buffered, since the poller only reports new
// arrivals. A socket error (a RST) is returned here, where the peek
// consumed it.
func (c directTCP) WaitReadable() error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var (
		one     [1]byte
		peekErr error
	)
	if err := raw.Read(func(fd uintptr) bool {
		var ready bool
		ready, peekErr = peekReady(fd, one[:])
		return ready
	}); err != nil {
		return err
	}
	return peekErr
}

// Abort closes the connection with a RST.
func (c directTCP) Abort() error {
	_ = c.SetLinger(0)
	return c.Close()
}

type directUDP struct {
	d     *Direct
	conn  *net.UDPConn
	raw   syscall.RawConn
	v6    bool
	iface string // bound by InterfaceFor and tracked; "" when not
	// dialed ends the session's report to DirectConfig.Dialing, once.
	dialed func()

	// For fake-ip destinations: placeholder → real address, and back, so
	// that replies reach the app from the address it sent to.
	mu        sync.Mutex
	toReal    map[netip.Addr]netip.Addr
	toFake    map[netip.Addr]netip.Addr
	resolving map[netip.Addr]bool
	mapped    atomic.Bool // toFake has an entry: ReadPacket must look

	batch udpBatch // WriteBatch's reusable state, where the system has one
}

func (u *directUDP) mapFake(fake, realAddr netip.Addr) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.toReal == nil {
		u.toReal = make(map[netip.Addr]netip.Addr)
		u.toFake = make(map[netip.Addr]netip.Addr)
	}
	u.toReal[fake] = realAddr
	u.toFake[realAddr] = fake
	u.mapped.Store(true)
}

// ReadPacket implements PacketConn. A receive that fails on an ICMP error
// (see enableICMPErrors) returns it as an *UnreachableError.
func (u *directUDP) ReadPacket(b []byte) (int, netip.AddrPort, error) {
	n, from, err := u.conn.ReadFromUDPAddrPort(b)
	var unreachable *UnreachableError
	if err != nil {
		var errno syscall.Errno
		if !errors.As(err, &errno) {
			return n, from, err
		}
		dst, icmpErrno, ok := takeICMPErrors(u.raw)
		if !ok {
			return n, from, err
		}
		if icmpErrno == 0 {
			icmpErrno = errno
		}
		from, unreachable = dst, &UnreachableError{Err: icmpErrno}
		err = unreachable
	}
	a := from.Addr().Unmap()
	if u.mapped.Load() {
		u.mu.Lock()
		if fake, ok := u.toFake[a]; ok {
			a = fake
		}
		u.mu.Unlock()
	}
	from = netip.AddrPortFrom(a, from.Port())
	if unreachable != nil {
		unreachable.From = from
	}
	return n, from, err
}

// errResolving is returned for a datagram to a placeholder whose name is
// still being resolved: it is dropped, as a datagram may be.
var errResolving = errors.New("fake-ip destination still resolving; datagram dropped")

// WritePacket sends without ever parking the caller: when the socket buffer
// is full the datagram is dropped and the error says so, as a kernel would.
func (u *directUDP) WritePacket(b []byte, dst Target) error {
	to, err := u.dest(dst)
	if err != nil {
		return err
	}
	return u.sendOne(b, to)
}

// sendOne sends one datagram, without waiting.
//
// A send that failed only because an ICMP error about an earlier datagram
// was pending (the kernel hands it to whichever call comes next) is made
// again, once.
func (u *directUDP) sendOne(b []byte, to netip.AddrPort) error {
	for retried := false; ; retried = true {
		var serr error
		err := u.raw.Write(func(fd uintptr) bool {
			serr = sendtoNoWait(fd, b, to)
			return true
		})
		if err != nil {
			return err
		}
		if serr == nil || retried || !u.tookICMPError() {
			return serr
		}
	}
}

// tookICMPError empties the socket's error queue and reports whether it
// held an ICMP error: a send that just failed did so on that error, not on
// its own datagram.
func (u *directUDP) tookICMPError() bool {
	_, _, ok := takeICMPErrors(u.raw)
	return ok
}

// dest is the address a datagram for dst goes to: dst itself, or the real
// address behind a fake-ip placeholder.
func (u *directUDP) dest(dst Target) (netip.AddrPort, error) {
	if dst.Addr.Addr().Is6() != u.v6 {
		return netip.AddrPort{}, fmt.Errorf("udp to %s: address family differs from the session's", dst)
	}
	to := dst.Addr
	if a := to.Addr(); u.d.isFake(a) {
		u.mu.Lock()
		realAddr, ok := u.toReal[a]
		start := !ok && !u.resolving[a]
		if start {
			if u.resolving == nil {
				u.resolving = make(map[netip.Addr]bool)
			}
			u.resolving[a] = true
		}
		u.mu.Unlock()
		if !ok {
			if start {
				go u.resolve(dst)
			}
			return netip.AddrPort{}, errResolving
		}
		to = netip.AddrPortFrom(realAddr, to.Port())
	}
	return to, nil
}

// resolve maps a placeholder destination in the background; the datagrams
// that follow it go out once it is known.
func (u *directUDP) resolve(dst Target) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := u.d.realAddrs(ctx, dst)
	u.mu.Lock()
	delete(u.resolving, dst.Addr.Addr())
	u.mu.Unlock()
	if err != nil {
		u.d.log.Debug("udp: resolving fake-ip destination", "dst", dst, "err", err)
		return
	}
	u.mapFake(dst.Addr.Addr(), addrs[0])
}

func (u *directUDP) Close() error {
	if u.dialed != nil {
		u.dialed()
	}
	if u.iface != "" {
		u.d.bound.remove(u)
	}
	return u.conn.Close()
}

func (u *directUDP) bound() (string, bool) { return u.iface, u.v6 }

// end closes the socket: the pending ReadPacket fails and the session
// ends.
func (u *directUDP) end() { u.conn.Close() }

// LocalAddr is the session's socket address, for /nat.
func (u *directUDP) LocalAddr() net.Addr { return u.conn.LocalAddr() }
