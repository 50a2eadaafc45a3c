package outbound

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"syscall"
	"time"
)

// DirectConfig configures a Direct outbound.
type DirectConfig struct {
	Name string
	// Interface binds every socket to this interface (SO_BINDTODEVICE on
	// Linux, IP_BOUND_IF on macOS); "" leaves the choice to the routing table.
	Interface string
	// FWMark is set as SO_MARK on every socket (Linux) so that policy routing
	// can keep tungate's own traffic out of the TUN; 0 sets none.
	FWMark uint32
	// KeepAlive is the TCP keepalive period of upstream connections; 0 uses
	// the Go default, negative disables it.
	KeepAlive time.Duration
}

// Direct dials upstreams from this host, bypassing the TUN.
type Direct struct {
	cfg    DirectConfig
	log    *slog.Logger
	dialer net.Dialer
	listen net.ListenConfig
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
	d := &Direct{cfg: cfg, log: log}
	d.dialer = net.Dialer{Control: control, KeepAlive: cfg.KeepAlive}
	d.listen = net.ListenConfig{Control: control}
	return d, nil
}

// Name implements Dialer.
func (d *Direct) Name() string { return d.cfg.Name }

// DialTCP implements Dialer.
func (d *Direct) DialTCP(ctx context.Context, dst Target) (TCPConn, error) {
	c, err := d.dialer.DialContext(ctx, "tcp", dst.Addr.String())
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			err = refused{err}
		}
		return nil, fmt.Errorf("%s: dial %s: %w", d.cfg.Name, dst, err)
	}
	return directTCP{c.(*net.TCPConn)}, nil
}

// ListenUDP implements Dialer.
func (d *Direct) ListenUDP(ctx context.Context, first Target) (PacketConn, error) {
	network, local := "udp4", "0.0.0.0:0"
	if first.Addr.Addr().Is6() {
		network, local = "udp6", "[::]:0"
	}
	pc, err := d.listen.ListenPacket(ctx, network, local)
	if err != nil {
		return nil, fmt.Errorf("%s: udp socket for %s: %w", d.cfg.Name, first, err)
	}
	c := pc.(*net.UDPConn)
	raw, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("%s: udp socket for %s: %w", d.cfg.Name, first, err)
	}
	return &directUDP{conn: c, raw: raw, v6: network == "udp6"}, nil
}

// refused marks an upstream refusal while keeping the original error.
type refused struct{ err error }

func (r refused) Error() string        { return r.err.Error() }
func (r refused) Unwrap() []error      { return []error{ErrRefused, r.err} }
func (r refused) Is(target error) bool { return target == ErrRefused }

type directTCP struct{ *net.TCPConn }

// Abort closes the connection with a RST.
func (c directTCP) Abort() error {
	_ = c.SetLinger(0)
	return c.Close()
}

type directUDP struct {
	conn *net.UDPConn
	raw  syscall.RawConn
	v6   bool
}

func (u *directUDP) ReadPacket(b []byte) (int, netip.AddrPort, error) {
	n, from, err := u.conn.ReadFromUDPAddrPort(b)
	return n, netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), err
}

// WritePacket sends without ever parking the caller: when the socket buffer
// is full the datagram is dropped and the error says so, as a kernel would.
func (u *directUDP) WritePacket(b []byte, dst Target) error {
	if dst.Addr.Addr().Is6() != u.v6 {
		return fmt.Errorf("udp to %s: address family differs from the session's", dst)
	}
	var serr error
	err := u.raw.Write(func(fd uintptr) bool {
		serr = sendtoNoWait(fd, b, dst.Addr)
		return true
	})
	if err != nil {
		return err
	}
	return serr
}

func (u *directUDP) Close() error { return u.conn.Close() }
