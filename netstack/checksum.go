package netstack

import (
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// checksumsValid verifies the checksums of one complete IP packet: the IPv4
// header's, and the TCP, UDP or ICMP one of its payload. It is what gVisor
// would check itself without CapabilityRXChecksumOffload. A fragment has
// only its IP header checked: the transport checksum covers the whole
// datagram, which exists only after reassembly. Packets too malformed to
// parse are passed on for gVisor to count and drop.
func checksumsValid(b []byte) bool {
	switch header.IPVersion(b) {
	case header.IPv4Version:
		if len(b) < header.IPv4MinimumSize {
			return true
		}
		ip := header.IPv4(b)
		hlen := int(ip.HeaderLength())
		tlen := int(ip.TotalLength())
		if hlen < header.IPv4MinimumSize || hlen > len(b) || tlen < hlen || tlen > len(b) {
			return true
		}
		if checksum.Checksum(b[:hlen], 0) != 0xffff {
			return false
		}
		if ip.More() || ip.FragmentOffset() != 0 {
			return true
		}
		return transportValid(tcpip.TransportProtocolNumber(ip.Protocol()), ip.SourceAddress(), ip.DestinationAddress(), b[hlen:tlen], false)
	case header.IPv6Version:
		if len(b) < header.IPv6MinimumSize {
			return true
		}
		ip := header.IPv6(b)
		end := header.IPv6MinimumSize + int(ip.PayloadLength())
		if end > len(b) {
			return true
		}
		proto, off, fragment, ok := ipv6Transport(b[:end])
		if !ok || fragment {
			return true
		}
		return transportValid(proto, ip.SourceAddress(), ip.DestinationAddress(), b[off:end], true)
	}
	return true
}

// ipv6Transport walks the extension headers to the transport header.
func ipv6Transport(b []byte) (proto tcpip.TransportProtocolNumber, off int, fragment, ok bool) {
	next := header.IPv6(b).NextHeader()
	off = header.IPv6MinimumSize
	for {
		switch tcpip.TransportProtocolNumber(next) {
		case tcpip.TransportProtocolNumber(header.IPv6HopByHopOptionsExtHdrIdentifier),
			tcpip.TransportProtocolNumber(header.IPv6RoutingExtHdrIdentifier),
			tcpip.TransportProtocolNumber(header.IPv6DestinationOptionsExtHdrIdentifier):
			if off+8 > len(b) {
				return 0, 0, false, false
			}
			next = b[off]
			off += (int(b[off+1]) + 1) * 8
		case tcpip.TransportProtocolNumber(header.IPv6FragmentExtHdrIdentifier):
			return 0, 0, true, true
		default:
			if off > len(b) {
				return 0, 0, false, false
			}
			return tcpip.TransportProtocolNumber(next), off, false, true
		}
	}
}

func transportValid(proto tcpip.TransportProtocolNumber, src, dst tcpip.Address, seg []byte, v6 bool) bool {
	switch proto {
	case header.TCPProtocolNumber:
		if len(seg) < header.TCPMinimumSize {
			return true
		}
	case header.UDPProtocolNumber:
		if len(seg) < header.UDPMinimumSize {
			return true
		}
		// The checksum covers the datagram its length field gives, not
		// bytes after it (RFC 768), which gVisor ignores as Linux does.
		// A length past the packet is gVisor's to count as malformed.
		n := int(header.UDP(seg).Length())
		if n < header.UDPMinimumSize || n > len(seg) {
			return true
		}
		seg = seg[:n]
		if !v6 && header.UDP(seg).Checksum() == 0 {
			return true // no checksum (RFC 768); IPv6 forbids it
		}
	case header.ICMPv4ProtocolNumber:
		return checksum.Checksum(seg, 0) == 0xffff
	case header.ICMPv6ProtocolNumber:
		if len(seg) < header.ICMPv6MinimumSize {
			return true
		}
	default:
		return true
	}
	xsum := header.PseudoHeaderChecksum(proto, src, dst, uint16(len(seg)))
	return checksum.Checksum(seg, xsum) == 0xffff
}
