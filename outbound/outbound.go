package outbound

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
)

// Target is where a flow wants to go. Addr is always set (for fake-ip flows
// it is the fake address); Domain is set when the flow's name is known, so
// that an outbound able to resolve names (or to hand them to a proxy) can use
// it instead of Addr.
type Target struct {
	Addr   netip.AddrPort
	Domain string
}

func (t Target) String() string {
	if t.Domain != "" {
		return net.JoinHostPort(t.Domain, fmt.Sprint(t.Addr.Port()))
	}
	return t.Addr.String()
}

// Dialer is the contract every outbound implements.
//
// DialTCP returns a connection to dst or an error; an error whose cause is a
// refusal by the upstream (ECONNREFUSED, a proxy's refusal, a reject rule)
// satisfies errors.Is(err, ErrRefused) so that the caller can answer the app
// with a RST. ctx bounds the dial.
//
// ListenUDP opens one UDP packet session for one app source address: the
// session can send to any destination and receives from any remote, which is
// what endpoint-independent ("full cone") mapping needs. first is the
// destination of the datagram that opened the session.
type Dialer interface {
	Name() string
	DialTCP(ctx context.Context, dst Target) (TCPConn, error)
	ListenUDP(ctx context.Context, first Target) (PacketConn, error)
}

// TCPConn is an upstream TCP connection. CloseWrite sends FIN while the other
// direction keeps flowing; Abort closes with a RST.
type TCPConn interface {
	net.Conn
	CloseWrite() error
	Abort() error
}

// PacketConn is one UDP session towards the upstream.
//
// ReadPacket blocks until a datagram from any remote arrives and returns the
// remote's address as the source. Where the outbound learns of them (direct,
// on Linux), an ICMP error answering one of the session's datagrams is
// returned as an *UnreachableError whose From is also returned as the
// source; the session stays usable and the caller may read on. Any other
// error ends the session. WritePacket sends b to dst without
// blocking on the network (a full socket buffer drops, as UDP does). Close
// unblocks a pending ReadPacket.
type PacketConn interface {
	ReadPacket(b []byte) (n int, from netip.AddrPort, err error)
	WritePacket(b []byte, dst Target) error
	Close() error
}

// Datagram is one datagram of a batch.
type Datagram struct {
	Payload []byte
	Dst     Target
}

// BatchWriter is implemented by packet conns that can send several
// datagrams in one system call. WriteBatch sends ds in order and returns
// how many went out; the others were dropped (a full socket buffer, an
// unreachable destination), and err says why the first of them was. Like
// WritePacket it never waits.
type BatchWriter interface {
	WriteBatch(ds []Datagram) (sent int, err error)
}

// UDPCarrier is implemented by outbounds that can say up front whether
// they carry UDP at all (reject, an HTTP proxy, SOCKS5 with udp: false),
// so that a datagram routed to one is refused at once, with ICMP port
// unreachable, instead of opening a session that can only fail.
type UDPCarrier interface {
	CarriesUDP() bool
}

// UnreachableError is returned by PacketConn.ReadPacket when a datagram the
// session sent to From was answered with an ICMP error (port, host or
// network unreachable). A port unreachable satisfies
// errors.Is(err, ErrRefused).
type UnreachableError struct {
	From netip.AddrPort
	Err  error // the errno: syscall.ECONNREFUSED for a closed port
}

func (e *UnreachableError) Error() string { return fmt.Sprintf("%s: %v", e.From, e.Err) }
func (e *UnreachableError) Unwrap() error { return e.Err }

// Is makes a port unreachable match ErrRefused.
func (e *UnreachableError) Is(target error) bool {
	return target == ErrRefused && errors.Is(e.Err, syscall.ECONNREFUSED)
}

// ErrRefused marks a dial that the upstream (or a reject outbound) refused,
// as opposed to one that timed out or could not route.
var ErrRefused = errors.New("connection refused")
