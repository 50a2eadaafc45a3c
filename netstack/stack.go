package netstack

import (
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// Handler receives the flows the stack terminates.
//
// HandleTCP is called on a goroutine of its own for every new connection
// (SYN); it must end by calling exactly one of r.Accept or r.Refuse, and
// until it does the app's SYN stays unanswered and counts against
// Config.MaxInFlight.
//
// HandleUDP is called on the packet path for every datagram the app sends;
// it must not block. payload is a fresh copy the handler may keep.
// Returning false refuses the datagram: the app gets ICMP port unreachable.
type Handler interface {
	HandleTCP(r *TCPRequest)
	HandleUDP(src, dst netip.AddrPort, payload []byte) bool
}

// UDPFlusher is implemented by handlers that hold the datagrams of a burst
// to send them together. FlushUDP is called, on the goroutine that calls
// HandleUDP, whenever the device has no more packets waiting (or after
// every packet, for a device that cannot tell).
type UDPFlusher interface {
	FlushUDP()
}

// Config tunes the stack.
type Config struct {
	// MTU of the device; gVisor derives its MSS from it.
	MTU int
	// MaxInFlight bounds the connections whose upstream is still being
	// dialled; further SYNs are dropped and counted (the app retransmits).
	MaxInFlight int
	// Keepalive is the idle time before TCP keepalive probes on the app
	// side; 0 turns keepalive off.
	Keepalive time.Duration
}

// nicID is the one NIC the stack has.
const nicID tcpip.NICID = 1

// Stack is a gVisor stack bound to a device.
//
// Lifecycle: New → Start → Close. Close stops the device goroutines and the
// stack; it is idempotent.
type Stack struct {
	cfg     Config
	log     *slog.Logger
	stack   *stack.Stack
	link    *linkEndpoint
	handler Handler
	closed  atomic.Bool

	closeOnce sync.Once

	tcpAccepted atomic.Uint64 // gVisor counts only listener accepts
	udpRefused  atomic.Uint64
	udpTooBig   atomic.Uint64
	udpID       atomic.Uint32 // IPv4/IPv6 fragment identification
}

// New builds the stack over dev and installs the TCP and UDP forwarders that
// call h. Nothing moves until Start.
func New(dev Device, h Handler, cfg Config, log *slog.Logger) (*Stack, error) {
	if dev == nil || h == nil {
		return nil, fmt.Errorf("netstack: New needs a device and a handler")
	}
	if cfg.MTU < 576 || cfg.MTU > maxPacket {
		return nil, fmt.Errorf("netstack: mtu %d out of range", cfg.MTU)
	}
	if cfg.MaxInFlight <= 0 {
		return nil, fmt.Errorf("netstack: max in-flight must be positive, got %d", cfg.MaxInFlight)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Stack{
		cfg:     cfg,
		log:     log,
		handler: h,
		stack: stack.New(stack.Options{
			NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
			TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
			// Every destination is remote to us: nothing is delivered
			// locally except what the forwarders take.
			HandleLocal: false,
		}),
	}
	s.link = newLinkEndpoint(dev, uint32(cfg.MTU), log)
	s.link.fastUDP = s.fastUDP
	if f, ok := h.(UDPFlusher); ok {
		s.link.flush = f.FlushUDP
	}
	if err := s.setup(); err != nil {
		s.stack.Close()
		return nil, err
	}
	return s, nil
}

func (s *Stack) setup() error {
	opts := []struct {
		name string
		opt  tcpip.SettableTransportProtocolOption
	}{
		// SACK is off by default in gVisor; without it a single loss
		// on the app leg stalls a window's worth of data.
		{"sack", ptr(tcpip.TCPSACKEnabled(true))},
		// RACK/TLP in gVisor retransmits spuriously on a path with
		// near-zero RTT like a TUN (google/gvisor#9778); plain
		// SACK-based recovery is steadier.
		{"recovery", ptr(tcpip.TCPRecovery(0))},
		// Reno: gVisor's cubic gains nothing on a sub-millisecond
		// local leg and has had window arithmetic bugs.
		{"congestion control", ptr(tcpip.CongestionControlOption("reno"))},
		// Let the receive window grow with the flow instead of
		// capping every connection at the default buffer.
		{"moderate receive buffer", ptr(tcpip.TCPModerateReceiveBufferOption(true))},
		// Receive buffers from 4 KiB (idle flows stay small) to 4 MiB
		// (enough for a bulk flow at multi-Gbit/s on a local leg).
		{"receive buffer", &tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 128 << 10, Max: 4 << 20}},
		// Send buffers: the same range, for the download direction.
		{"send buffer", &tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 128 << 10, Max: 4 << 20}},
		// No TIME_WAIT: when the upstream closes first our endpoint is
		// the active closer, and the app's kernel may reuse the port at
		// once. gVisor hands a SYN arriving in TIME_WAIT only to a
		// listener, which the forwarder does not have, so the SYN would
		// be dropped until TIME_WAIT ends (seen as multi-second connect
		// stalls in make bench). Old duplicates, what TIME_WAIT guards
		// against, cannot linger on a TUN.
		{"time-wait timeout", ptr(tcpip.TCPTimeWaitTimeoutOption(0))},
		// Delayed ACKs stay on (the default) but Nagle is off per
		// endpoint in TCPRequest.Accept; nothing to set here.
	}
	for _, o := range opts {
		if err := s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, o.opt); err != nil {
			return fmt.Errorf("netstack: set tcp %s: %w", o.name, translate(err))
		}
	}

	// Transport handlers go in before the NIC exists, so that no packet
	// can reach a stack without them.
	fwd := tcp.NewForwarder(s.stack, 0, s.cfg.MaxInFlight, s.forwardTCP)
	s.stack.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	s.stack.SetTransportProtocolHandler(udp.ProtocolNumber, s.forwardUDP)

	if err := s.stack.CreateNIC(nicID, s.link); err != nil {
		return fmt.Errorf("netstack: create NIC: %w", translate(err))
	}
	// Promiscuous: accept packets for every destination address, since
	// the TUN carries traffic for the whole Internet.
	if err := s.stack.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("netstack: promiscuous mode: %w", translate(err))
	}
	// Spoofing: answer from the destination address the app used.
	if err := s.stack.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("netstack: spoofing: %w", translate(err))
	}
	s.stack.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	return nil
}

func ptr[T any](v T) *T { return &v }

// Start starts moving packets between the device and the stack. isClosed
// tells a device error that means "closed" from a transient one.
func (s *Stack) Start(isClosed func(error) bool) {
	s.link.start(isClosed)
}

// Close stops taking new flows, stops the device goroutines (the device must
// already be closed, so that a blocked read returns) and destroys the stack,
// aborting any endpoint still open.
func (s *Stack) Close() {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		s.link.close()
		s.stack.Close()
		for _, ep := range s.stack.CleanupEndpoints() {
			ep.Abort()
		}
		s.stack.Wait()
	})
}

// StopAccepting makes new flows be refused from now on, while open ones
// keep working: the first step of a graceful shutdown.
func (s *Stack) StopAccepting() { s.closed.Store(true) }

// Stats are the stack's counters since New.
type Stats struct {
	PacketsIn, PacketsOut uint64
	// SYNsDroppedInFlight counts SYNs dropped because MaxInFlight dials
	// were already under way.
	SYNsDroppedInFlight uint64
	// Malformed counts packets dropped as malformed (bad IP version, bad
	// headers or checksums).
	Malformed       uint64
	TUNReadErrors   uint64
	TUNWriteErrors  uint64
	UDPRefused      uint64
	UDPReplyTooBig  uint64
	TCPResetsSent   uint64
	TCPEstablished  uint64
	TCPCurrentConns uint64
}

// Stats returns the current counters.
func (s *Stack) Stats() Stats {
	st := s.stack.Stats()
	return Stats{
		PacketsIn:           s.link.packetsIn.Load(),
		PacketsOut:          s.link.packetsOut.Load(),
		SYNsDroppedInFlight: st.TCP.ForwardMaxInFlightDrop.Value(),
		// Bad UDP is counted once, by the NIC; TCP segments that reach
		// an endpoint are counted by TCP instead.
		Malformed: s.link.badVersion.Load() + s.link.badFrame.Load() + st.IP.MalformedPacketsReceived.Value() +
			st.NICs.MalformedL4RcvdPackets.Value() + st.TCP.ChecksumErrors.Value() +
			st.TCP.InvalidSegmentsReceived.Value(),
		TUNReadErrors:   s.link.readErrors.Load(),
		TUNWriteErrors:  s.link.writeErrors.Load(),
		UDPRefused:      s.udpRefused.Load(),
		UDPReplyTooBig:  s.udpTooBig.Load(),
		TCPResetsSent:   st.TCP.ResetsSent.Value(),
		TCPEstablished:  s.tcpAccepted.Load(),
		TCPCurrentConns: st.TCP.CurrentConnected.Value(),
	}
}

func addrFrom(a tcpip.Address) netip.Addr {
	if a.Len() == 4 {
		return netip.AddrFrom4(a.As4())
	}
	return netip.AddrFrom16(a.As16())
}

func toTCPIP(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// Flush waits until the packets queued for the device have been written,
// or timeout passes.
func (s *Stack) Flush(timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for s.link.settled.Load() < s.link.enqueued.Load() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}
