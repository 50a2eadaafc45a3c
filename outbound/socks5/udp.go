package socks5

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"

	"github.com/tungate/tungate/outbound"
)

// association is one UDP ASSOCIATE: a control connection to the proxy and
// a UDP socket that talks to the proxy's relay. It implements
// outbound.PacketConn.
//
// Lifecycle: open (associate) → ended, by whichever comes first: Close,
// or the control connection ending (the proxy closed it, or it broke).
// Ending closes both the control connection and the UDP socket, so a
// pending ReadPacket returns an error; Close also waits for the goroutine
// that watches the control connection.
type association struct {
	d     *Dialer
	ctrl  outbound.TCPConn
	pc    outbound.PacketConn
	relay netip.AddrPort

	wmu  sync.Mutex
	wbuf []byte // header and payload of the datagram being sent

	endOnce sync.Once
	ended   chan struct{} // closed when the association has ended
	cause   error         // why it ended; set before ended is closed
	watched chan struct{} // closed when watch returns
}

var _ outbound.PacketConn = (*association)(nil)

// associate opens an association: the control connection and UDP
// ASSOCIATE, then a UDP socket towards the relay the proxy named.
func (d *Dialer) associate(ctx context.Context) (*association, error) {
	// The client's own UDP address is not known before the relay's (the
	// base dialer picks the socket by the relay's family), so the
	// request carries the unspecified address, as RFC 1928 allows.
	unspec := netip.IPv4Unspecified()
	if d.server.Addr().Is6() {
		unspec = netip.IPv6Unspecified()
	}
	ctrl, bound, err := d.open(ctx, cmdUDPAssociate, outbound.Target{Addr: netip.AddrPortFrom(unspec, 0)})
	if err != nil {
		return nil, err
	}
	relay, err := d.relayAddr(bound)
	if err != nil {
		ctrl.Close()
		return nil, err
	}
	pc, err := d.base.ListenUDP(ctx, outbound.Target{Addr: relay})
	if err != nil {
		ctrl.Close()
		return nil, fmt.Errorf("udp socket for relay %s: %w", relay, err)
	}
	a := &association{
		d: d, ctrl: ctrl, pc: pc, relay: relay,
		wbuf:    make([]byte, 0, udpHeaderMax+1500),
		ended:   make(chan struct{}),
		watched: make(chan struct{}),
	}
	go a.watch()
	return a, nil
}

// relayAddr turns the ASSOCIATE reply's bound address into the relay's:
// an unspecified address means the proxy's own.
func (d *Dialer) relayAddr(bound socksAddr) (netip.AddrPort, error) {
	if bound.name != "" {
		return netip.AddrPort{}, fmt.Errorf("relay address is a name (%s); only addresses are supported", bound)
	}
	if bound.port == 0 {
		return netip.AddrPort{}, fmt.Errorf("relay address %s has port 0", bound)
	}
	ip := bound.ip
	if ip.IsUnspecified() {
		ip = d.server.Addr()
	}
	return netip.AddrPortFrom(ip, bound.port), nil
}

// watch reads the control connection until it ends, then ends the
// association: RFC 1928 ties the association's life to it.
func (a *association) watch() {
	defer close(a.watched)
	var buf [64]byte
	for {
		_, err := a.ctrl.Read(buf[:])
		if err == nil {
			continue // nothing is expected; ignore it
		}
		if err == io.EOF {
			err = errors.New("proxy closed the control connection")
		} else {
			err = fmt.Errorf("control connection: %w", err)
		}
		a.end(err)
		a.d.log.Debug("udp association ended", "outbound", a.d.cfg.Name, "relay", a.relay, "cause", a.cause)
		return
	}
}

// end ends the association once, recording why.
func (a *association) end(cause error) {
	a.endOnce.Do(func() {
		a.cause = cause
		close(a.ended)
		a.ctrl.Close()
		a.pc.Close()
	})
}

// ReadPacket implements outbound.PacketConn. It returns the payload of the
// next datagram from the relay, and the remote named in its header as the
// source. Datagrams that cannot be delivered are dropped and counted.
func (a *association) ReadPacket(b []byte) (int, netip.AddrPort, error) {
	st := &a.d.stats
	for {
		n, from, err := a.pc.ReadPacket(b)
		if err != nil {
			select {
			case <-a.ended:
				return 0, netip.AddrPort{}, fmt.Errorf("socks5 %s: udp association ended: %w", a.d.cfg.Name, a.cause)
			default:
				return 0, netip.AddrPort{}, err
			}
		}
		if netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) != a.relay {
			st.dropMalformed.Add(1)
			continue
		}
		src, off, err := parseUDPHeader(b[:n])
		switch err {
		case nil:
			return copy(b, b[off:n]), src, nil
		case errFragment:
			st.dropFragment.Add(1)
		case errNameSource:
			st.dropName.Add(1)
		default:
			st.dropMalformed.Add(1)
		}
	}
}

// WritePacket implements outbound.PacketConn: it sends b to dst through
// the relay, naming dst by its domain when known.
func (a *association) WritePacket(b []byte, dst outbound.Target) error {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	buf, err := appendUDPHeader(a.wbuf[:0], dst)
	if err != nil {
		return fmt.Errorf("socks5 %s: udp to %s: %w", a.d.cfg.Name, dst, err)
	}
	buf = append(buf, b...)
	a.wbuf = buf
	return a.pc.WritePacket(buf, outbound.Target{Addr: a.relay})
}

// Close implements outbound.PacketConn: it ends the association (closing
// the control connection and the UDP socket) and waits for the goroutine
// watching the control connection. It is idempotent.
func (a *association) Close() error {
	a.end(net.ErrClosed)
	<-a.watched
	return nil
}
