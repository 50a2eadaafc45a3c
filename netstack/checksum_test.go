package netstack

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	src4, dst4 = netip.MustParseAddr("172.19.0.1"), netip.MustParseAddr("10.233.1.5")
	src6, dst6 = netip.MustParseAddr("fdfe:dcba:9876::1"), netip.MustParseAddr("fd00:233:1::5")
)

// udpSeg builds a UDP header and payload with a correct checksum.
func udpSeg(src, dst netip.Addr, payload string) []byte {
	seg := make([]byte, header.UDPMinimumSize+len(payload))
	header.UDP(seg).Encode(&header.UDPFields{SrcPort: 1000, DstPort: 53, Length: uint16(len(seg))})
	copy(seg[header.UDPMinimumSize:], payload)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, toTCPIP(src), toTCPIP(dst), uint16(len(seg)))
	header.UDP(seg).SetChecksum(^checksum.Checksum(seg, xsum))
	return seg
}

func ipv4Pkt(proto tcpip.TransportProtocolNumber, seg []byte, flags uint8, fragOff uint16) []byte {
	b := make([]byte, header.IPv4MinimumSize+len(seg))
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{TotalLength: uint16(len(b)), TTL: 64, Protocol: uint8(proto), SrcAddr: toTCPIP(src4), DstAddr: toTCPIP(dst4), Flags: flags, FragmentOffset: fragOff})
	ip.SetChecksum(^ip.CalculateChecksum())
	copy(b[header.IPv4MinimumSize:], seg)
	return b
}

// ipv6Pkt prefixes seg with exts (each a complete extension header whose
// first byte is patched to the next header) and an IPv6 header.
func ipv6Pkt(proto tcpip.TransportProtocolNumber, seg []byte, exts ...[]byte) []byte {
	var rest []byte
	next := uint8(proto)
	for i := len(exts) - 1; i >= 0; i-- {
		e := append([]byte(nil), exts[i]...)
		e[0] = next
		next = exts[i][0]
		rest = append(e, rest...)
	}
	rest = append(rest, seg...)
	b := make([]byte, header.IPv6MinimumSize+len(rest))
	header.IPv6(b).Encode(&header.IPv6Fields{PayloadLength: uint16(len(rest)), TransportProtocol: tcpip.TransportProtocolNumber(next), HopLimit: 64, SrcAddr: toTCPIP(src6), DstAddr: toTCPIP(dst6)})
	copy(b[header.IPv6MinimumSize:], rest)
	return b
}

func flip(b []byte, i int) []byte {
	c := append([]byte(nil), b...)
	c[i] ^= 0x5a
	return c
}

func TestChecksumsValid(t *testing.T) {
	u4 := udpSeg(src4, dst4, "hello")
	u6 := udpSeg(src6, dst6, "hello")
	noSum4 := append([]byte(nil), u4...)
	header.UDP(noSum4).SetChecksum(0)
	hopByHop := []byte{byte(header.IPv6HopByHopOptionsExtHdrIdentifier), 0, 1, 4, 0, 0, 0, 0}    // PadN
	destOpts := []byte{byte(header.IPv6DestinationOptionsExtHdrIdentifier), 0, 1, 4, 0, 0, 0, 0} // PadN
	fragHdr := []byte{byte(header.IPv6FragmentExtHdrIdentifier), 0, 0, 1, 0, 0, 0, 7}            // offset 0, M=1
	icmp := []byte{8, 0, 0, 0, 0, 1, 0, 1, 'p', 'i', 'n', 'g'}
	header.ICMPv4(icmp).SetChecksum(^checksum.Checksum(icmp, 0))

	for _, tc := range []struct {
		name string
		pkt  []byte
		want bool
	}{
		{"ipv4 udp good", ipv4Pkt(header.UDPProtocolNumber, u4, 0, 0), true},
		{"ipv4 udp bad payload", flip(ipv4Pkt(header.UDPProtocolNumber, u4, 0, 0), header.IPv4MinimumSize+9), false},
		{"ipv4 bad header checksum", flip(ipv4Pkt(header.UDPProtocolNumber, u4, 0, 0), 8), false},
		{"ipv4 udp without checksum", ipv4Pkt(header.UDPProtocolNumber, noSum4, 0, 0), true},
		{"ipv4 first fragment: transport not checkable", flip(ipv4Pkt(header.UDPProtocolNumber, u4, header.IPv4FlagMoreFragments, 0), header.IPv4MinimumSize+9), true},
		{"ipv4 icmp good", ipv4Pkt(header.ICMPv4ProtocolNumber, icmp, 0, 0), true},
		{"ipv4 icmp bad", flip(ipv4Pkt(header.ICMPv4ProtocolNumber, icmp, 0, 0), header.IPv4MinimumSize+9), false},
		{"ipv6 udp good", ipv6Pkt(header.UDPProtocolNumber, u6), true},
		{"ipv6 udp bad", flip(ipv6Pkt(header.UDPProtocolNumber, u6), header.IPv6MinimumSize+9), false},
		{"ipv6 ext headers good", ipv6Pkt(header.UDPProtocolNumber, u6, hopByHop, destOpts), true},
		{"ipv6 ext headers bad", flip(ipv6Pkt(header.UDPProtocolNumber, u6, hopByHop, destOpts), header.IPv6MinimumSize+16+9), false},
		{"ipv6 fragment: transport not checkable", flip(ipv6Pkt(header.UDPProtocolNumber, u6, fragHdr), header.IPv6MinimumSize+8+9), true},
		{"truncated ipv4 left to gVisor", ipv4Pkt(header.UDPProtocolNumber, u4, 0, 0)[:10], true},
		{"garbage version left to gVisor", []byte{0x70, 1, 2, 3}, true},
	} {
		if got := checksumsValid(tc.pkt); got != tc.want {
			t.Errorf("%s: checksumsValid = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// FuzzChecksumsValid: whatever a device hands over, checking it never
// panics or reads out of bounds.
func FuzzChecksumsValid(f *testing.F) {
	f.Add(ipv4Pkt(header.UDPProtocolNumber, udpSeg(src4, dst4, "x"), 0, 0))
	f.Add(ipv6Pkt(header.UDPProtocolNumber, udpSeg(src6, dst6, "x"), []byte{0, 0, 1, 4, 0, 0, 0, 0}))
	f.Add([]byte{0x45, 0, 0, 20})
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 0, 64})
	f.Fuzz(func(t *testing.T, b []byte) {
		checksumsValid(b)
	})
}
