package netstack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// forwardUDP is the stack's UDP transport handler: every datagram the app
// sends arrives here (gVisor has already reassembled fragments), without
// creating an endpoint per 4-tuple. Replies do not go back through gVisor
// endpoints either (see WriteUDP), which is what lets a reply come from any
// remote address.
func (s *Stack) forwardUDP(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
	hdr := header.UDP(pkt.TransportHeader().Slice())
	netHdr := pkt.Network()
	lengthValid, csumValid := header.UDPValid(hdr,
		func() uint16 { return pkt.Data().Checksum() },
		uint16(pkt.Data().Size()), pkt.NetworkProtocolNumber,
		netHdr.SourceAddress(), netHdr.DestinationAddress(), pkt.RXChecksumValidated)
	if !lengthValid || !csumValid {
		// Unhandled: gVisor validates again, drops and counts it.
		return false
	}
	if s.closed.Load() || s.link.refusing.Load() {
		s.udpRefused.Add(1)
		return false
	}
	src := netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort)
	if !s.handler.HandleUDP(src, dst, pkt.Data().AsRange().ToSlice()) {
		s.udpRefused.Add(1)
		return false
	}
	return true
}

// ErrTooBig is returned by WriteUDP for a datagram that cannot be sent even
// fragmented.
var ErrTooBig = errors.New("netstack: udp datagram too big")

const udpTTL = 64

// WriteUDP sends payload to the app at to, from the address from, which can
// be any remote address (the app sees it as the datagram's source). A
// datagram larger than the MTU is fragmented. It never blocks on the
// network beyond the device's out-queue.
func (s *Stack) WriteUDP(payload []byte, from, to netip.AddrPort) error {
	// A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
	if !from.Addr().IsValid() || !to.Addr().IsValid() {
		return fmt.Errorf("netstack: udp %s → %s: invalid address", from, to)
	}
	if from.Addr().Is4() != to.Addr().Is4() {
		return fmt.Errorf("netstack: udp %s → %s: address families differ", from, to)
	}
	udpLen := header.UDPMinimumSize + len(payload)
	// IPv4 has no jumbograms: the reassembled packet, header included,
	// must fit its 16-bit total length.
	maxUDP := 0xffff
	if from.Addr().Is4() {
		maxUDP -= header.IPv4MinimumSize
	}
	if udpLen > maxUDP {
		s.udpTooBig.Add(1)
		return ErrTooBig
	}
	src, dst := toTCPIP(from.Addr()), toTCPIP(to.Addr())

	// The UDP header and payload, checksummed once, then cut into
	// fragments if needed.
	seg := make([]byte, udpLen)
	u := header.UDP(seg)
	u.Encode(&header.UDPFields{SrcPort: from.Port(), DstPort: to.Port(), Length: uint16(udpLen)})
	copy(seg[header.UDPMinimumSize:], payload)
	xsum := header.PseudoHeaderChecksum(udp.ProtocolNumber, src, dst, uint16(udpLen))
	xsum = checksum.Checksum(seg, xsum)
	sum := ^xsum
	if sum == 0 {
		sum = 0xffff // zero means "no checksum" (RFC 768); IPv6 forbids it
	}
	u.SetChecksum(sum)

	if from.Addr().Is4() {
		return s.writeIPv4(seg, src, dst)
	}
	return s.writeIPv6(seg, src, dst)
}

func (s *Stack) writeIPv4(seg []byte, src, dst tcpip.Address) error {
	mtu := int(s.link.MTU())
	maxData := (mtu - header.IPv4MinimumSize) &^ 7
	id := uint16(s.udpID.Add(1))
	for off := 0; off < len(seg) || off == 0; {
		n := min(len(seg)-off, maxData)
		more := off+n < len(seg)
		pkt := make([]byte, header.IPv4MinimumSize+n)
		ip := header.IPv4(pkt)
		flags := uint8(0)
		if more {
			flags = header.IPv4FlagMoreFragments
		}
		ip.Encode(&header.IPv4Fields{
			TotalLength:    uint16(len(pkt)),
			ID:             id,
			Flags:          flags,
			FragmentOffset: uint16(off),
			TTL:            udpTTL,
			Protocol:       uint8(udp.ProtocolNumber),
			SrcAddr:        src,
			DstAddr:        dst,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		copy(pkt[header.IPv4MinimumSize:], seg[off:off+n])
		if err := s.writeRaw(ipv4.ProtocolNumber, pkt); err != nil {
			return err
		}
		off += n
		if !more {
			break
		}
	}
	return nil
}

func (s *Stack) writeIPv6(seg []byte, src, dst tcpip.Address) error {
	mtu := int(s.link.MTU())
	if header.IPv6MinimumSize+len(seg) <= mtu {
		pkt := make([]byte, header.IPv6MinimumSize+len(seg))
		header.IPv6(pkt).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(len(seg)),
			TransportProtocol: udp.ProtocolNumber,
			HopLimit:          udpTTL,
			SrcAddr:           src,
			DstAddr:           dst,
		})
		copy(pkt[header.IPv6MinimumSize:], seg)
		return s.writeRaw(ipv6.ProtocolNumber, pkt)
	}
	// Fragment extension header (RFC 8200 §4.5): the UDP header and
	// payload are the fragmentable part.
	maxData := (mtu - header.IPv6MinimumSize - header.IPv6FragmentHeaderSize) &^ 7
	id := s.udpID.Add(1)
	for off := 0; off < len(seg); {
		n := min(len(seg)-off, maxData)
		more := off+n < len(seg)
		pkt := make([]byte, header.IPv6MinimumSize+header.IPv6FragmentHeaderSize+n)
		header.IPv6(pkt).Encode(&header.IPv6Fields{
			PayloadLength:     uint16(header.IPv6FragmentHeaderSize + n),
			TransportProtocol: header.IPv6FragmentHeader,
			HopLimit:          udpTTL,
			SrcAddr:           src,
			DstAddr:           dst,
		})
		fh := pkt[header.IPv6MinimumSize:]
		fh[0] = uint8(udp.ProtocolNumber)
		fh[1] = 0
		offFlags := uint16(off)
		if more {
			offFlags |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], offFlags)
		binary.BigEndian.PutUint32(fh[4:], id)
		copy(pkt[header.IPv6MinimumSize+header.IPv6FragmentHeaderSize:], seg[off:off+n])
		if err := s.writeRaw(ipv6.ProtocolNumber, pkt); err != nil {
			return err
		}
		off += n
	}
	return nil
}

func (s *Stack) writeRaw(proto tcpip.NetworkProtocolNumber, pkt []byte) error {
	if err := s.stack.WriteRawPacket(nicID, proto, buffer.MakeWithData(pkt)); err != nil {
		return fmt.Errorf("netstack: write udp: %w", translate(err))
	}
	return nil
}
