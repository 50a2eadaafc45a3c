package netstack_test

// Tests of the UDP fast path (udpfast.go): the datagrams it takes reach
// HandleUDP once and byte-exact without gVisor seeing them; everything else
// still goes through gVisor and gets gVisor's treatment (reassembly,
// extension headers, drops and counters); a refusal still draws ICMP.

import (
	"bytes"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/tungate/tungate/netstack"
)

var (
	fastSrc4 = netip.AddrPortFrom(client4, 5555)
	fastDst4 = netip.MustParseAddrPort("10.233.1.5:53")
	fastSrc6 = netip.AddrPortFrom(client6, 5555)
	fastDst6 = netip.MustParseAddrPort("[fd00:233:1::5]:53")
)

// udpSegment is a UDP header and payload from src to dst, with its
// checksum.
func udpSegment(src, dst netip.AddrPort, payload []byte) []byte {
	seg := make([]byte, header.UDPMinimumSize+len(payload))
	header.UDP(seg).Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(len(seg))})
	copy(seg[header.UDPMinimumSize:], payload)
	setUDPChecksum(seg, src.Addr(), dst.Addr(), len(seg))
	return seg
}

// setUDPChecksum sets seg's checksum to the one of its first n bytes, with
// n as the pseudo-header's length, leaving the length field as it is.
func setUDPChecksum(seg []byte, src, dst netip.Addr, n int) {
	u := header.UDP(seg)
	u.SetChecksum(0)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, toTCPIP(src), toTCPIP(dst), uint16(n))
	sum := ^checksum.Checksum(seg[:n], xsum)
	if sum == 0 {
		sum = 0xffff
	}
	u.SetChecksum(sum)
}

// v4Opts are the IPv4 header fields the cases vary.
type v4Opts struct {
	id      uint16
	flags   uint8
	fragOff uint16
	options []byte // raw, a multiple of 4 bytes
	trailer []byte // after the total length: link-layer padding
}

// ipv4Packet wraps data (a UDP segment or a fragment of one) in an IPv4
// header with a correct checksum.
func ipv4Packet(src, dst netip.Addr, data []byte, o v4Opts) []byte {
	hlen := header.IPv4MinimumSize + len(o.options)
	pkt := make([]byte, hlen+len(data), hlen+len(data)+len(o.trailer))
	ip := header.IPv4(pkt)
	ip.Encode(&header.IPv4Fields{
		TotalLength:    uint16(len(pkt)),
		ID:             o.id,
		Flags:          o.flags,
		FragmentOffset: o.fragOff,
		TTL:            64,
		Protocol:       uint8(header.UDPProtocolNumber),
		SrcAddr:        toTCPIP(src),
		DstAddr:        toTCPIP(dst),
	})
	ip.SetHeaderLength(uint8(hlen))
	copy(pkt[header.IPv4MinimumSize:], o.options)
	ip.SetChecksum(^ip.CalculateChecksum())
	copy(pkt[hlen:], data)
	return append(pkt, o.trailer...)
}

// ipv6Packet wraps data (starting with the header next says) in an IPv6
// header; trailer follows the payload length.
func ipv6Packet(src, dst netip.Addr, next uint8, data, trailer []byte) []byte {
	pkt := make([]byte, header.IPv6MinimumSize+len(data), header.IPv6MinimumSize+len(data)+len(trailer))
	header.IPv6(pkt).Encode(&header.IPv6Fields{
		PayloadLength:     uint16(len(data)),
		TransportProtocol: tcpip.TransportProtocolNumber(next),
		HopLimit:          64,
		SrcAddr:           toTCPIP(src),
		DstAddr:           toTCPIP(dst),
	})
	copy(pkt[header.IPv6MinimumSize:], data)
	return append(pkt, trailer...)
}

// fastUDP4 and fastUDP6 are plain datagrams, the fast path's own.
func fastUDP4(src, dst netip.AddrPort, payload []byte) []byte {
	return ipv4Packet(src.Addr(), dst.Addr(), udpSegment(src, dst, payload), v4Opts{id: 1})
}

func fastUDP6(src, dst netip.AddrPort, payload []byte) []byte {
	return ipv6Packet(src.Addr(), dst.Addr(), uint8(header.UDPProtocolNumber), udpSegment(src, dst, payload), nil)
}

// ipv6FragHdr is a fragment extension header in front of UDP.
func ipv6FragHdr(off uint16, more bool, id uint32) []byte {
	h := make([]byte, header.IPv6FragmentHeaderSize)
	h[0] = uint8(header.UDPProtocolNumber)
	offFlags := off // a multiple of 8: the low 3 bits are flags
	if more {
		offFlags |= 1
	}
	h[2], h[3] = byte(offFlags>>8), byte(offFlags)
	h[4], h[5], h[6], h[7] = byte(id>>24), byte(id>>16), byte(id>>8), byte(id)
	return h
}

// payloadFor is a distinct payload of n bytes for a case, so that a
// datagram from one case cannot pass for another's.
func payloadFor(name string, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i*7 + len(name))
	}
	copy(p, name)
	return p
}

// fastCase is one packet (or the fragments of one datagram) from the app.
type fastCase struct {
	name   string
	frames [][]byte
	// want is what HandleUDP must be called with, exactly once; nil:
	// never.
	want *datagram
	// fast: the fast path takes it, and gVisor's IP layer sees nothing.
	// Otherwise gVisor sees every frame, except that linkDrop ones (bad
	// checksums) are dropped by the link before it with a virtio header.
	fast, linkDrop bool
	// Expected rises: Stats().Malformed, and gVisor's counters of packets
	// dropped for their source or destination address.
	malformed, invalidSrc, invalidDst uint64
}

func fastCases() []fastCase {
	var cases []fastCase
	add := func(c fastCase) { cases = append(cases, c) }
	dg := func(src, dst netip.AddrPort, p []byte) *datagram { return &datagram{src, dst, p} }

	// Plain datagrams.
	p := payloadFor("ipv4", 64)
	add(fastCase{name: "ipv4", frames: [][]byte{fastUDP4(fastSrc4, fastDst4, p)}, want: dg(fastSrc4, fastDst4, p), fast: true})
	p = payloadFor("ipv6", 64)
	add(fastCase{name: "ipv6", frames: [][]byte{fastUDP6(fastSrc6, fastDst6, p)}, want: dg(fastSrc6, fastDst6, p), fast: true})
	p = payloadFor("ipv4 empty", 0)
	add(fastCase{name: "ipv4 empty payload", frames: [][]byte{fastUDP4(fastSrc4, fastDst4, p)}, want: dg(fastSrc4, fastDst4, p), fast: true})

	p = payloadFor("ipv4 no checksum", 64)
	seg := udpSegment(fastSrc4, fastDst4, p)
	header.UDP(seg).SetChecksum(0)
	add(fastCase{name: "ipv4 udp checksum 0", frames: [][]byte{ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg, v4Opts{id: 2})},
		want: dg(fastSrc4, fastDst4, p), fast: true})

	// Not plain, but fine: gVisor's, and delivered by it.
	p = payloadFor("ipv4 options", 64)
	nop := []byte{1, 1, 1, 1} // four NOP options: IHL 6
	add(fastCase{name: "ipv4 options (IHL 6)", frames: [][]byte{ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), udpSegment(fastSrc4, fastDst4, p), v4Opts{id: 3, options: nop})},
		want: dg(fastSrc4, fastDst4, p)})

	// Options that read as a UDP header with a right length and checksum
	// if taken for one (NOP NOP NOP NOP, then EOL before the rest): the
	// datagram is still the one after the options.
	p = payloadFor("ipv4 options like udp", 64)
	seg = udpSegment(fastSrc4, fastDst4, p)
	fake := []byte{1, 1, 1, 1, 0, byte(8 + len(seg)), 0, 0} // ports 257 → 257, length
	pkt := ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg, v4Opts{id: 11, options: fake})
	setUDPChecksum(pkt[header.IPv4MinimumSize:], fastSrc4.Addr(), fastDst4.Addr(), len(pkt)-header.IPv4MinimumSize)
	header.IPv4(pkt).SetChecksum(0)
	header.IPv4(pkt).SetChecksum(^header.IPv4(pkt).CalculateChecksum())
	add(fastCase{name: "ipv4 options that read as a udp header", frames: [][]byte{pkt}, want: dg(fastSrc4, fastDst4, p)})

	p = payloadFor("ipv4 fragments", 300)
	seg = udpSegment(fastSrc4, fastDst4, p)
	frag1 := ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg[:160], v4Opts{id: 4, flags: header.IPv4FlagMoreFragments})
	frag2 := ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg[160:], v4Opts{id: 4, fragOff: 160})
	add(fastCase{name: "ipv4 fragments", frames: [][]byte{frag1, frag2}, want: dg(fastSrc4, fastDst4, p)})
	p = payloadFor("ipv4 fragments, last first", 300)
	seg = udpSegment(fastSrc4, fastDst4, p)
	frag1 = ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg[:160], v4Opts{id: 5, flags: header.IPv4FlagMoreFragments})
	frag2 = ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg[160:], v4Opts{id: 5, fragOff: 160})
	add(fastCase{name: "ipv4 fragments, last first", frames: [][]byte{frag2, frag1}, want: dg(fastSrc4, fastDst4, p)})

	// A first fragment that holds a whole UDP datagram by its length and
	// checksum is still only a fragment: gVisor keeps it for a reassembly
	// that never completes.
	frag1 = ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), udpSegment(fastSrc4, fastDst4, payloadFor("ipv4 lone fragment", 64)),
		v4Opts{id: 6, flags: header.IPv4FlagMoreFragments})
	add(fastCase{name: "ipv4 lone first fragment", frames: [][]byte{frag1}})

	p = payloadFor("ipv6 destination options", 64)
	destOpts := []byte{uint8(header.UDPProtocolNumber), 0, 1, 4, 0, 0, 0, 0} // PadN
	add(fastCase{name: "ipv6 destination options",
		frames: [][]byte{ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), uint8(header.IPv6DestinationOptionsExtHdrIdentifier),
			append(destOpts, udpSegment(fastSrc6, fastDst6, p)...), nil)},
		want: dg(fastSrc6, fastDst6, p)})

	// The same trick with a destination-options header: next header UDP,
	// length 0, then a PadN option whose four bytes give a length and a
	// checksum.
	p = payloadFor("ipv6 options like udp", 64)
	seg = udpSegment(fastSrc6, fastDst6, p)
	fake = []byte{uint8(header.UDPProtocolNumber), 0, 1, 4, 0, byte(8 + len(seg)), 0, 0} // ports 4352 → 260, length
	pkt = ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), uint8(header.IPv6DestinationOptionsExtHdrIdentifier), append(fake, seg...), nil)
	setUDPChecksum(pkt[header.IPv6MinimumSize:], fastSrc6.Addr(), fastDst6.Addr(), len(pkt)-header.IPv6MinimumSize)
	add(fastCase{name: "ipv6 destination options that read as a udp header", frames: [][]byte{pkt}, want: dg(fastSrc6, fastDst6, p)})

	p = payloadFor("ipv6 fragments", 300)
	seg = udpSegment(fastSrc6, fastDst6, p)
	frag := uint8(header.IPv6FragmentExtHdrIdentifier)
	add(fastCase{name: "ipv6 fragments", frames: [][]byte{
		ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), frag, append(ipv6FragHdr(0, true, 6), seg[:160]...), nil),
		ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), frag, append(ipv6FragHdr(160, false, 6), seg[160:]...), nil),
	}, want: dg(fastSrc6, fastDst6, p)})

	// Link-layer padding after the IP packet: gVisor trims it.
	p = payloadFor("ipv4 trailer", 64)
	add(fastCase{name: "ipv4 bytes after total length",
		frames: [][]byte{ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), udpSegment(fastSrc4, fastDst4, p), v4Opts{id: 7, trailer: []byte("TRAILING")})},
		want:   dg(fastSrc4, fastDst4, p)})
	p = payloadFor("ipv6 trailer", 64)
	add(fastCase{name: "ipv6 bytes after payload length",
		frames: [][]byte{ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), uint8(header.UDPProtocolNumber), udpSegment(fastSrc6, fastDst6, p), []byte("TRAILING"))},
		want:   dg(fastSrc6, fastDst6, p)})

	// Bad checksums: dropped and counted, never delivered.
	pkt = fastUDP4(fastSrc4, fastDst4, payloadFor("ipv4 bad udp sum", 64))
	u := header.UDP(pkt[header.IPv4MinimumSize:])
	u.SetChecksum(u.Checksum() ^ 0x5555)
	add(fastCase{name: "ipv4 bad udp checksum", frames: [][]byte{pkt}, linkDrop: true, malformed: 1})
	pkt = fastUDP6(fastSrc6, fastDst6, payloadFor("ipv6 bad udp sum", 64))
	u = header.UDP(pkt[header.IPv6MinimumSize:])
	u.SetChecksum(u.Checksum() ^ 0x5555)
	add(fastCase{name: "ipv6 bad udp checksum", frames: [][]byte{pkt}, linkDrop: true, malformed: 1})
	pkt = fastUDP6(fastSrc6, fastDst6, payloadFor("ipv6 zero udp sum", 64))
	header.UDP(pkt[header.IPv6MinimumSize:]).SetChecksum(0) // optional in IPv4 only
	add(fastCase{name: "ipv6 udp checksum 0", frames: [][]byte{pkt}, linkDrop: true, malformed: 1})
	pkt = fastUDP4(fastSrc4, fastDst4, payloadFor("ipv4 bad ip sum", 64))
	header.IPv4(pkt).SetChecksum(header.IPv4(pkt).Checksum() ^ 0x5555)
	add(fastCase{name: "ipv4 bad header checksum", frames: [][]byte{pkt}, linkDrop: true, malformed: 1})

	// UDP length disagreeing with the IP length. Longer: malformed.
	seg = udpSegment(fastSrc4, fastDst4, payloadFor("ipv4 udp len long", 64))
	header.UDP(seg).SetLength(uint16(len(seg) + 10))
	header.UDP(seg).SetChecksum(0) // the length is the only fault
	add(fastCase{name: "ipv4 udp length past the packet", frames: [][]byte{ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg, v4Opts{id: 8})}, malformed: 1})
	seg = udpSegment(fastSrc6, fastDst6, payloadFor("ipv6 udp len long", 64))
	header.UDP(seg).SetLength(uint16(len(seg) + 10))
	setUDPChecksum(seg, fastSrc6.Addr(), fastDst6.Addr(), len(seg))
	add(fastCase{name: "ipv6 udp length past the packet", frames: [][]byte{ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), uint8(header.UDPProtocolNumber), seg, nil)}, malformed: 1})
	// Longer, counting bytes after the IP length (which are not the
	// packet's), with a checksum over them too.
	seg = udpSegment(fastSrc4, fastDst4, payloadFor("ipv4 udp len past total length", 64))
	pkt = ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg[:len(seg)-16], v4Opts{id: 12, trailer: seg[len(seg)-16:]})
	add(fastCase{name: "ipv4 udp length past the total length", frames: [][]byte{pkt}, malformed: 1})
	seg = udpSegment(fastSrc6, fastDst6, payloadFor("ipv6 udp len past payload length", 64))
	pkt = ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), uint8(header.UDPProtocolNumber), seg[:len(seg)-16], seg[len(seg)-16:])
	add(fastCase{name: "ipv6 udp length past the payload length", frames: [][]byte{pkt}, malformed: 1})
	// Shorter: the datagram is what the UDP length says (RFC 768), the
	// rest is ignored, as Linux and gVisor do. Its checksum covers the
	// datagram only.
	p = payloadFor("ipv4 udp len short", 40)
	seg = udpSegment(fastSrc4, fastDst4, append(bytes.Clone(p), "EXTRA BYTES"...))
	header.UDP(seg).SetLength(uint16(header.UDPMinimumSize + len(p)))
	header.UDP(seg).SetChecksum(0)
	add(fastCase{name: "ipv4 udp length short of the packet, no checksum", frames: [][]byte{ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg, v4Opts{id: 9})},
		want: dg(fastSrc4, fastDst4, p)})
	p = payloadFor("ipv4 udp len short sum", 40)
	seg = udpSegment(fastSrc4, fastDst4, append(bytes.Clone(p), "EXTRA BYTES"...))
	header.UDP(seg).SetLength(uint16(header.UDPMinimumSize + len(p)))
	setUDPChecksum(seg, fastSrc4.Addr(), fastDst4.Addr(), header.UDPMinimumSize+len(p))
	add(fastCase{name: "ipv4 udp length short of the packet, checksum", frames: [][]byte{ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), seg, v4Opts{id: 10})},
		want: dg(fastSrc4, fastDst4, p)})
	p = payloadFor("ipv6 udp len short", 40)
	seg = udpSegment(fastSrc6, fastDst6, append(bytes.Clone(p), "EXTRA BYTES"...))
	header.UDP(seg).SetLength(uint16(header.UDPMinimumSize + len(p)))
	setUDPChecksum(seg, fastSrc6.Addr(), fastDst6.Addr(), header.UDPMinimumSize+len(p))
	add(fastCase{name: "ipv6 udp length short of the packet", frames: [][]byte{ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), uint8(header.UDPProtocolNumber), seg, nil)},
		want: dg(fastSrc6, fastDst6, p)})
	// A checksum over the whole IP payload instead is wrong.
	seg = udpSegment(fastSrc6, fastDst6, append(payloadFor("ipv6 udp len short bad", 40), "EXTRA BYTES"...))
	header.UDP(seg).SetLength(uint16(header.UDPMinimumSize + 40))
	setUDPChecksum(seg, fastSrc6.Addr(), fastDst6.Addr(), len(seg))
	add(fastCase{name: "ipv6 udp length short, checksum over the extra bytes", frames: [][]byte{ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), uint8(header.UDPProtocolNumber), seg, nil)},
		linkDrop: true, malformed: 1})

	// Addresses the fast path leaves to gVisor.
	mc4 := netip.MustParseAddrPort("224.0.0.251:5353")
	add(fastCase{name: "ipv4 multicast destination", frames: [][]byte{fastUDP4(fastSrc4, mc4, payloadFor("mc4", 32))}, invalidDst: 1})
	mc6 := netip.MustParseAddrPort("[ff05::1:3]:547")
	add(fastCase{name: "ipv6 multicast destination", frames: [][]byte{fastUDP6(fastSrc6, mc6, payloadFor("mc6", 32))}, invalidDst: 1})
	lo4 := netip.MustParseAddrPort("127.0.0.1:5555")
	add(fastCase{name: "ipv4 loopback source", frames: [][]byte{fastUDP4(lo4, fastDst4, payloadFor("lo4", 32))}, invalidSrc: 1})
	lo6 := netip.MustParseAddrPort("[::1]:5555")
	add(fastCase{name: "ipv6 loopback source", frames: [][]byte{fastUDP6(lo6, fastDst6, payloadFor("lo6", 32))}, invalidSrc: 1})
	// gVisor delivers these to the handler: the fast path leaving them
	// to it changes the path, not the outcome.
	allNodes := netip.MustParseAddrPort("[ff02::1]:5353") // joined by every IPv6 node
	p = payloadFor("all nodes", 32)
	add(fastCase{name: "ipv6 all-nodes multicast destination", frames: [][]byte{fastUDP6(fastSrc6, allNodes, p)}, want: dg(fastSrc6, allNodes, p)})
	any4 := netip.MustParseAddrPort("0.0.0.0:68")
	p = payloadFor("any4", 32)
	add(fastCase{name: "ipv4 unspecified source", frames: [][]byte{fastUDP4(any4, fastDst4, p)}, want: dg(any4, fastDst4, p)})
	any6 := netip.MustParseAddrPort("[::]:546")
	p = payloadFor("any6", 32)
	add(fastCase{name: "ipv6 unspecified source", frames: [][]byte{fastUDP6(any6, fastDst6, p)}, want: dg(any6, fastDst6, p)})
	bcast := netip.MustParseAddrPort("255.255.255.255:67")
	p = payloadFor("bcast", 32)
	add(fastCase{name: "ipv4 limited broadcast destination", frames: [][]byte{fastUDP4(fastSrc4, bcast, p)}, want: dg(fastSrc4, bcast, p)})

	port0 := netip.AddrPortFrom(client4, 0)
	p = payloadFor("sport0", 32)
	add(fastCase{name: "ipv4 source port 0", frames: [][]byte{fastUDP4(port0, fastDst4, p)}, want: dg(port0, fastDst4, p)})
	port0 = netip.AddrPortFrom(fastDst4.Addr(), 0)
	p = payloadFor("dport0", 32)
	add(fastCase{name: "ipv4 destination port 0", frames: [][]byte{fastUDP4(fastSrc4, port0, p)}, want: dg(fastSrc4, port0, p)})
	return cases
}

// TestFastUDPPaths injects raw packets from the app, over a device with
// and without a virtio-net header, and checks for each what reaches
// HandleUDP (once, byte-exact, or not at all), whether gVisor saw it, and
// the counters.
func TestFastUDPPaths(t *testing.T) {
	for _, virtio := range []bool{false, true} {
		t.Run(fmt.Sprintf("virtio=%v", virtio), func(t *testing.T) {
			h := &testHandler{}
			e := newEnvMode(t, defaultConfig(), h, virtio)
			seen := make(chan datagram, 64)
			h.udp = func(src, dst netip.AddrPort, payload []byte) bool {
				// Kept as given, as the handler may: checked after
				// later frames went through the same buffers.
				seen <- datagram{src, dst, payload}
				return true
			}
			probeSrc := netip.AddrPortFrom(client4, 7777)
			probeDst := netip.AddrPortFrom(fastDst4.Addr(), 9)
			for i, c := range fastCases() {
				t.Run(c.name, func(t *testing.T) {
					before, ipBefore := e.s.Stats(), netstack.IPStats(e.s)
					wire := e.tap()
					for _, f := range c.frames {
						if !e.dev.inject(bytes.Clone(f)) {
							t.Fatal("inject: device closed")
						}
					}
					// Frames are handled in order: once the probe
					// is, so was the case.
					probe := fmt.Appendf(nil, "probe %d", i)
					e.dev.inject(fastUDP4(probeSrc, probeDst, probe))
					var got []datagram
					for {
						d := waitDatagram(t, "probe after "+c.name, seen)
						if d.src == probeSrc && d.dst == probeDst && bytes.Equal(d.payload, probe) {
							break
						}
						got = append(got, d)
					}
					switch {
					case c.want == nil && len(got) > 0:
						t.Errorf("HandleUDP called %d times, first with %s → %s %q; want never", len(got), got[0].src, got[0].dst, got[0].payload)
					case c.want != nil && len(got) != 1:
						t.Errorf("HandleUDP called %d times, want once", len(got))
					}
					if c.want != nil && len(got) > 0 {
						d := got[0]
						if d.src != c.want.src || d.dst != c.want.dst {
							t.Errorf("HandleUDP(%s, %s, _), want (%s, %s, _)", d.src, d.dst, c.want.src, c.want.dst)
						}
						if !bytes.Equal(d.payload, c.want.payload) {
							t.Errorf("HandleUDP payload (%d bytes) = %q\nwant (%d bytes) %q", len(d.payload), d.payload, len(c.want.payload), c.want.payload)
						}
					}

					after, ipAfter := e.s.Stats(), netstack.IPStats(e.s)
					wantGVisor := uint64(len(c.frames))
					if c.fast || c.linkDrop && virtio {
						wantGVisor = 0
					}
					if got := ipAfter.Received - ipBefore.Received; got != wantGVisor {
						t.Errorf("gVisor's IP layer received %d packets, want %d", got, wantGVisor)
					}
					wantIn := uint64(len(c.frames)) + 1 // and the probe
					if c.linkDrop && virtio {
						wantIn = 1
					}
					// The fast path counts a packet after the handler
					// returns: the probe's may not be in yet.
					waitUntil(func() bool { return e.s.Stats().PacketsIn-before.PacketsIn >= wantIn })
					if got := e.s.Stats().PacketsIn - before.PacketsIn; got != wantIn {
						t.Errorf("Stats().PacketsIn rose by %d, want %d", got, wantIn)
					}
					if got := after.Malformed - before.Malformed; got != c.malformed {
						t.Errorf("Stats().Malformed rose by %d, want %d", got, c.malformed)
					}
					if got := after.UDPRefused - before.UDPRefused; got != 0 {
						t.Errorf("Stats().UDPRefused rose by %d, want 0", got)
					}
					if got := ipAfter.InvalidSource - ipBefore.InvalidSource; got != c.invalidSrc {
						t.Errorf("gVisor dropped %d packets for their source address, want %d", got, c.invalidSrc)
					}
					if got := ipAfter.InvalidDestination - ipBefore.InvalidDestination; got != c.invalidDst {
						t.Errorf("gVisor dropped %d packets for their destination address, want %d", got, c.invalidDst)
					}
					// Accepted or dropped: nothing goes back to the app.
					e.s.Flush(time.Second)
					for len(wire) > 0 {
						p := <-wire
						t.Errorf("stack wrote a %d-byte packet in answer: % x", len(p), p[:min(len(p), 48)])
					}
				})
			}
		})
	}
}

// TestFastUDPRefused: a datagram the handler refuses on the fast path goes
// on through gVisor, which answers ICMP port unreachable, without asking
// the handler again; each refusal is counted once. The next datagrams,
// through the fast path and through gVisor, are handled normally: the
// refusal does not stick. Once the stack stops accepting, the handler is
// not asked at all.
func TestFastUDPRefused(t *testing.T) {
	for _, virtio := range []bool{false, true} {
		for _, dst := range []netip.AddrPort{fastDst4, fastDst6} {
			t.Run(fmt.Sprintf("virtio=%v/%s", virtio, dst), func(t *testing.T) {
				h := &testHandler{}
				e := newEnvMode(t, defaultConfig(), h, virtio)
				type call struct {
					d datagram
					// gVisor's IP packet count when the handler was
					// called: not yet moved by the datagram if the fast
					// path is asking.
					ipReceived uint64
				}
				calls := make(chan call, 64)
				var accept atomic.Bool
				h.udp = func(src, dst netip.AddrPort, payload []byte) bool {
					calls <- call{datagram{src, dst, payload}, netstack.IPStats(e.s).Received}
					return accept.Load()
				}
				u := e.client.udpSocket(t, dst.Addr(), netip.AddrPort{}, dst)
				app := u.localAddr()

				// send writes payload from the app and returns the one
				// handler call it caused (none: ok false), with the stats
				// from before.
				send := func(payload []byte) (c call, ok bool, before netstack.Stats, ipBefore netstack.GVisorIPStats) {
					t.Helper()
					before, ipBefore = e.s.Stats(), netstack.IPStats(e.s)
					if err := u.write(payload, netip.AddrPort{}); err != nil {
						t.Fatalf("client udp Write(%d bytes) to %s: %s", len(payload), dst, err)
					}
					select {
					case c = <-calls:
						ok = true
					case <-time.After(waitFor):
					}
					if ok && (c.d.src != app || c.d.dst != dst || !bytes.Equal(c.d.payload, payload)) {
						t.Errorf("HandleUDP(%s, %s, %d bytes), want (%s, %s, %d bytes) equal=%v", c.d.src, c.d.dst, len(c.d.payload), app, dst, len(payload), bytes.Equal(c.d.payload, payload))
					}
					return c, ok, before, ipBefore
				}
				noMoreCalls := func(what string) {
					t.Helper()
					select {
					case c := <-calls:
						t.Errorf("%s: HandleUDP called again, with %d bytes", what, len(c.d.payload))
					default:
					}
				}

				for i := range 3 {
					what := fmt.Sprintf("refused datagram %d", i)
					c, ok, before, ipBefore := send(fmt.Appendf(nil, "refuse me %d", i))
					if !ok {
						t.Fatalf("%s: HandleUDP not called within %v", what, waitFor)
					}
					if c.ipReceived != ipBefore.Received {
						t.Errorf("%s: HandleUDP called after gVisor received the datagram, not by the fast path", what)
					}
					if _, _, err := u.read(make([]byte, 64), waitFor); !refusedError(err) {
						t.Fatalf("%s: client udp Read = %v (%T), want %s", what, err, err, &tcpip.ErrConnectionRefused{})
					}
					// gVisor asks its UDP handler before it sends the
					// ICMP error: a second call would have been made.
					noMoreCalls(what)
					after, ipAfter := e.s.Stats(), netstack.IPStats(e.s)
					if got := after.UDPRefused - before.UDPRefused; got != 1 {
						t.Errorf("%s: Stats().UDPRefused rose by %d, want 1", what, got)
					}
					if got := ipAfter.Received - ipBefore.Received; got != 1 {
						t.Errorf("%s: gVisor received %d packets, want 1 (for the ICMP error)", what, got)
					}
					if got := after.Malformed - before.Malformed; got != 0 {
						t.Errorf("%s: Stats().Malformed rose by %d", what, got)
					}
				}

				accept.Store(true)
				for _, tc := range []struct {
					what string
					size int
					fast bool
				}{
					{"accepted datagram after refusals", 100, true},
					// Bigger than the MTU: the app fragments it, and
					// only gVisor reassembles; its UDP handler must
					// ask the handler again rather than refuse.
					{"accepted fragmented datagram after refusals", 3000, false},
				} {
					payload := payloadFor(tc.what, tc.size)
					c, ok, before, ipBefore := send(payload)
					if !ok {
						t.Fatalf("%s: HandleUDP not called within %v (stats %+v)", tc.what, waitFor, e.s.Stats())
					}
					if tc.fast != (c.ipReceived == ipBefore.Received) {
						t.Errorf("%s: by the fast path = %v, want %v", tc.what, !tc.fast, tc.fast)
					}
					if _, _, err := u.read(make([]byte, 64), 50*time.Millisecond); err == nil {
						t.Errorf("%s: client udp Read got a datagram, want nothing", tc.what)
					} else if _, ok := err.(*tcpip.ErrTimeout); !ok {
						t.Errorf("%s: client udp Read = %s, want no error (timeout)", tc.what, err)
					}
					noMoreCalls(tc.what)
					if got := e.s.Stats().UDPRefused - before.UDPRefused; got != 0 {
						t.Errorf("%s: Stats().UDPRefused rose by %d, want 0", tc.what, got)
					}
				}

				// Stopping: refused without asking.
				e.s.StopAccepting()
				before := e.s.Stats()
				if err := u.write([]byte("too late"), netip.AddrPort{}); err != nil {
					t.Fatalf("client udp Write to %s: %s", dst, err)
				}
				if _, _, err := u.read(make([]byte, 64), waitFor); !refusedError(err) {
					t.Fatalf("after StopAccepting: client udp Read = %v (%T), want %s", err, err, &tcpip.ErrConnectionRefused{})
				}
				noMoreCalls("after StopAccepting")
				if got := e.s.Stats().UDPRefused - before.UDPRefused; got != 1 {
					t.Errorf("after StopAccepting: Stats().UDPRefused rose by %d, want 1", got)
				}
			})
		}
	}
}

// Benchmarks: one 1400-byte datagram from the TUN frame to a handler that
// discards it, by the fast path and, for comparison, forced through gVisor
// by IP options (IPv4) or a destination-options header (IPv6).

// benchDevice is a device for a stack that is never started: frames are
// handed over with netstack.DeliverFrame.
type benchDevice struct{}

func (benchDevice) ReadFrame([]byte) (int, error)    { return 0, errDeviceClosed }
func (benchDevice) WriteFrame(b []byte) (int, error) { return len(b), nil }
func (benchDevice) VirtioHdr() bool                  { return false }

// discardUDP counts datagrams and drops them.
type discardUDP struct{ n, bytes int }

func (*discardUDP) HandleTCP(r *netstack.TCPRequest) { r.Refuse() }
func (h *discardUDP) HandleUDP(_, _ netip.AddrPort, payload []byte) bool {
	h.n++
	h.bytes += len(payload)
	return true
}

const benchPacket = 1400

func benchFrames(viaGVisor bool) map[string][]byte {
	v4Payload := benchPacket - header.IPv4MinimumSize - header.UDPMinimumSize
	v6Payload := benchPacket - header.IPv6MinimumSize - header.UDPMinimumSize
	if !viaGVisor {
		return map[string][]byte{
			"ipv4": fastUDP4(fastSrc4, fastDst4, make([]byte, v4Payload)),
			"ipv6": fastUDP6(fastSrc6, fastDst6, make([]byte, v6Payload)),
		}
	}
	nop := []byte{1, 1, 1, 1}
	destOpts := []byte{uint8(header.UDPProtocolNumber), 0, 1, 4, 0, 0, 0, 0}
	return map[string][]byte{
		"ipv4": ipv4Packet(fastSrc4.Addr(), fastDst4.Addr(), udpSegment(fastSrc4, fastDst4, make([]byte, v4Payload-len(nop))), v4Opts{id: 1, options: nop}),
		"ipv6": ipv6Packet(fastSrc6.Addr(), fastDst6.Addr(), uint8(header.IPv6DestinationOptionsExtHdrIdentifier),
			append(destOpts, udpSegment(fastSrc6, fastDst6, make([]byte, v6Payload-len(destOpts)))...), nil),
	}
}

func benchmarkUDP(b *testing.B, viaGVisor bool) {
	frames := benchFrames(viaGVisor)
	for _, name := range []string{"ipv4", "ipv6"} {
		frame := frames[name]
		b.Run(name, func(b *testing.B) {
			if len(frame) != benchPacket {
				b.Fatalf("frame of %d bytes, want %d", len(frame), benchPacket)
			}
			h := &discardUDP{}
			s, err := netstack.New(benchDevice{}, h, defaultConfig(), nil)
			if err != nil {
				b.Fatalf("netstack.New: %v", err)
			}
			defer s.Close()
			// Check once that the frame reaches the handler whole and by
			// the path meant.
			ipBefore := netstack.IPStats(s).Received
			netstack.DeliverFrame(s, frame)
			if want := len(frame) - payloadOffset(frame); h.n != 1 || h.bytes != want {
				b.Fatalf("handler got %d datagrams, %d bytes, want 1 of %d", h.n, h.bytes, want)
			}
			if got := netstack.IPStats(s).Received - ipBefore; (got == 0) != !viaGVisor {
				b.Fatalf("gVisor received %d packets, via gVisor = %v", got, viaGVisor)
			}
			b.ReportAllocs()
			b.SetBytes(int64(len(frame)))
			for b.Loop() {
				netstack.DeliverFrame(s, frame)
			}
			if st := s.Stats(); st.Malformed != 0 || st.UDPRefused != 0 {
				b.Fatalf("stats %+v", st)
			}
		})
	}
}

// payloadOffset is where the UDP payload starts in a bench frame.
func payloadOffset(frame []byte) int {
	if header.IPVersion(frame) == header.IPv4Version {
		return int(header.IPv4(frame).HeaderLength()) + header.UDPMinimumSize
	}
	off := header.IPv6MinimumSize + header.UDPMinimumSize
	if header.IPv6(frame).NextHeader() != uint8(header.UDPProtocolNumber) {
		off += 8 // the destination options
	}
	return off
}

func BenchmarkFastUDP(b *testing.B) { benchmarkUDP(b, false) }

func BenchmarkUDPThroughGVisor(b *testing.B) { benchmarkUDP(b, true) }
