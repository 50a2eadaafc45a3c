package netstack

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// UDP fast path. A UDP datagram from the app needs nothing from gVisor: no
// endpoint, no state, only the addresses and the payload. Taking the plain
// ones (unicast, unfragmented, no IP options or extension headers, lengths
// and checksums right) straight from the frame to the handler skips the
// PacketBuffer and gVisor's IP layer, which was a third of tungate's CPU
// per datagram in make bench's UDP figures. Anything else goes through
// gVisor as before, which reassembles, counts malformed packets and sends
// ICMP.

// udpVerdict is what the fast path did with a packet.
type udpVerdict uint8

const (
	udpNotMine  udpVerdict = iota // not a plain UDP datagram: gVisor's
	udpHandled                    // given to the handler
	udpRefusing                   // the handler refused it: gVisor answers ICMP
)

// fastUDP offers one IP packet to the fast path. trusted is true when the
// kernel vouched for its checksums (a virtio header's flags).
func (s *Stack) fastUDP(b []byte, trusted bool) udpVerdict {
	var (
		src, dst netip.Addr
		udp      []byte
	)
	switch header.IPVersion(b) {
	case header.IPv4Version:
		if len(b) < header.IPv4MinimumSize+header.UDPMinimumSize {
			return udpNotMine
		}
		ip := header.IPv4(b)
		if ip.HeaderLength() != header.IPv4MinimumSize || int(ip.TotalLength()) != len(b) ||
			ip.Protocol() != uint8(header.UDPProtocolNumber) || ip.More() || ip.FragmentOffset() != 0 {
			return udpNotMine
		}
		if !trusted && checksum.Checksum(b[:header.IPv4MinimumSize], 0) != 0xffff {
			return udpNotMine
		}
		src = netip.AddrFrom4([4]byte(b[12:16]))
		dst = netip.AddrFrom4([4]byte(b[16:20]))
		udp = b[header.IPv4MinimumSize:]
	case header.IPv6Version:
		if len(b) < header.IPv6MinimumSize+header.UDPMinimumSize {
			return udpNotMine
		}
		ip := header.IPv6(b)
		if ip.NextHeader() != uint8(header.UDPProtocolNumber) || header.IPv6MinimumSize+int(ip.PayloadLength()) != len(b) {
			return udpNotMine
		}
		src = netip.AddrFrom16([16]byte(b[8:24]))
		dst = netip.AddrFrom16([16]byte(b[24:40]))
		udp = b[header.IPv6MinimumSize:]
	default:
		return udpNotMine
	}
	if !plainUnicast(src) || !plainUnicast(dst) {
		return udpNotMine
	}
	h := header.UDP(udp)
	if int(h.Length()) != len(udp) || h.SourcePort() == 0 || h.DestinationPort() == 0 {
		return udpNotMine
	}
	if !trusted && (h.Checksum() != 0 || src.Is6()) {
		xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, toTCPIP(src), toTCPIP(dst), uint16(len(udp)))
		if checksum.Checksum(udp, xsum) != 0xffff {
			return udpNotMine
		}
	}
	if s.closed.Load() {
		return udpRefusing
	}
	// The handler keeps the payload; the frame buffer is reused.
	payload := append([]byte(nil), udp[header.UDPMinimumSize:]...)
	if !s.handler.HandleUDP(netip.AddrPortFrom(src, h.SourcePort()), netip.AddrPortFrom(dst, h.DestinationPort()), payload) {
		return udpRefusing
	}
	return udpHandled
}

// plainUnicast is an address gVisor would deliver to the UDP handler
// without special casing: not unspecified, multicast, limited broadcast or
// loopback.
func plainUnicast(a netip.Addr) bool {
	return !a.IsUnspecified() && !a.IsMulticast() && !a.IsLoopback() &&
		a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}
