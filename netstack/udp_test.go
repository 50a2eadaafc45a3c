package netstack_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/tungate/tungate/netstack"
)

type datagram struct {
	src, dst netip.AddrPort
	payload  []byte
}

// recordUDP sets h to record every datagram and answer accept.
func recordUDP(h *testHandler, accept bool) <-chan datagram {
	ch := make(chan datagram, 64)
	h.udp = func(src, dst netip.AddrPort, payload []byte) bool {
		select {
		case ch <- datagram{src, dst, bytes.Clone(payload)}:
		default:
		}
		return accept
	}
	return ch
}

func waitDatagram(t *testing.T, what string, ch <-chan datagram) datagram {
	t.Helper()
	select {
	case d := <-ch:
		return d
	case <-time.After(waitFor):
		t.Fatalf("%s: HandleUDP not called within %v", what, waitFor)
	}
	return datagram{}
}

func udpDst(ap netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(ap.Addr(), 53) }

// TestUDPToHandler: an app's datagram reaches HandleUDP with its source,
// destination and payload, also when the app had to fragment it.
func TestUDPToHandler(t *testing.T) {
	for _, dst := range []netip.AddrPort{udpDst(remote4), udpDst(remote6)} {
		for _, size := range []int{5, 20000} {
			t.Run(dst.String()+"/"+strconv.Itoa(size), func(t *testing.T) {
				h := &testHandler{}
				got := recordUDP(h, true)
				e := newEnv(t, defaultConfig(), h)
				u := e.client.udpSocket(t, dst.Addr(), netip.AddrPort{}, dst)
				want := make([]byte, size)
				rand.Read(want)
				if err := u.write(want, netip.AddrPort{}); err != nil {
					t.Fatalf("client udp Write(%d bytes) to %s: %s", size, dst, err)
				}
				d := waitDatagram(t, "client datagram", got)
				if d.src != u.localAddr() || d.dst != dst {
					t.Errorf("HandleUDP src, dst = %s, %s; want %s, %s", d.src, d.dst, u.localAddr(), dst)
				}
				if !bytes.Equal(d.payload, want) {
					t.Errorf("HandleUDP payload: %d bytes, want %d, equal=false", len(d.payload), len(want))
				}
				// Accepted: no ICMP error for the app.
				if _, _, err := u.read(make([]byte, 16), 50*time.Millisecond); err == nil {
					t.Errorf("client udp Read got a datagram, want nothing")
				} else if _, ok := err.(*tcpip.ErrTimeout); !ok {
					t.Errorf("client udp Read after an accepted datagram = %s, want no error (timeout)", err)
				}
				if st := e.s.Stats(); st.UDPRefused != 0 {
					t.Errorf("Stats().UDPRefused = %d, want 0", st.UDPRefused)
				}
			})
		}
	}
}

// TestUDPRefused: HandleUDP returning false makes the app get ICMP port
// unreachable (its connected socket reports connection refused), counted.
func TestUDPRefused(t *testing.T) {
	for _, dst := range []netip.AddrPort{udpDst(remote4), udpDst(remote6)} {
		t.Run(dst.String(), func(t *testing.T) {
			h := &testHandler{}
			got := recordUDP(h, false)
			e := newEnv(t, defaultConfig(), h)
			u := e.client.udpSocket(t, dst.Addr(), netip.AddrPort{}, dst)
			if err := u.write([]byte("anyone?"), netip.AddrPort{}); err != nil {
				t.Fatalf("client udp Write to %s: %s", dst, err)
			}
			waitDatagram(t, "refused datagram", got)
			_, _, err := u.read(make([]byte, 16), waitFor)
			if !refusedError(err) {
				t.Fatalf("client udp Read after refused datagram = %v (%T), want %s", err, err, &tcpip.ErrConnectionRefused{})
			}
			if st := e.s.Stats(); st.UDPRefused != 1 {
				t.Errorf("Stats().UDPRefused = %d, want 1", st.UDPRefused)
			}
		})
	}
}

// TestWriteUDPFullCone: WriteUDP from an address the app never talked to
// reaches the app's socket with that address as source.
func TestWriteUDPFullCone(t *testing.T) {
	for _, from := range []netip.AddrPort{
		netip.MustParseAddrPort("10.233.9.9:1234"),
		netip.MustParseAddrPort("[fd00:233:9::9]:1234"),
	} {
		t.Run(from.String(), func(t *testing.T) {
			e := newEnv(t, defaultConfig(), &testHandler{})
			local := netip.AddrPortFrom(clientAddrFor(from.Addr()), nextPort())
			u := e.client.udpSocket(t, local.Addr(), local, netip.AddrPort{})
			if err := e.s.WriteUDP([]byte("hello app"), from, local); err != nil {
				t.Fatalf("WriteUDP(_, %s, %s): %v", from, local, err)
			}
			buf := make([]byte, 64)
			n, src, err := u.read(buf, waitFor)
			if err != nil {
				t.Fatalf("client udp Read on %s: %s", local, err)
			}
			if string(buf[:n]) != "hello app" || src != from {
				t.Fatalf("client udp Read = %q from %s, want %q from %s", buf[:n], src, "hello app", from)
			}
		})
	}
}

// TestWriteUDPLarge: a datagram bigger than the MTU is fragmented into
// packets that fit and arrives whole; the largest legal datagram too.
func TestWriteUDPLarge(t *testing.T) {
	for _, tc := range []struct {
		from netip.AddrPort
		size int
	}{
		{netip.MustParseAddrPort("10.233.1.5:53"), 1500 - 28}, // fits exactly
		{netip.MustParseAddrPort("10.233.1.5:53"), 1500 - 27}, // one byte over
		{netip.MustParseAddrPort("10.233.1.5:53"), 20000},
		{netip.MustParseAddrPort("10.233.1.5:53"), 65535 - 28}, // largest IPv4
		{netip.MustParseAddrPort("[fd00:233:1::5]:53"), 1500 - 48},
		{netip.MustParseAddrPort("[fd00:233:1::5]:53"), 1500 - 47},
		{netip.MustParseAddrPort("[fd00:233:1::5]:53"), 20000},
		{netip.MustParseAddrPort("[fd00:233:1::5]:53"), 65535 - 8}, // largest IPv6
	} {
		t.Run(tc.from.String()+"/"+strconv.Itoa(tc.size), func(t *testing.T) {
			e := newEnv(t, defaultConfig(), &testHandler{})
			local := netip.AddrPortFrom(clientAddrFor(tc.from.Addr()), nextPort())
			u := e.client.udpSocket(t, local.Addr(), local, netip.AddrPort{})
			wire := e.tap()
			want := make([]byte, tc.size)
			rand.Read(want)
			if err := e.s.WriteUDP(want, tc.from, local); err != nil {
				t.Fatalf("WriteUDP(%d bytes, %s, %s): %v", tc.size, tc.from, local, err)
			}
			buf := make([]byte, 70000)
			n, src, err := u.read(buf, waitFor)
			if err != nil {
				t.Fatalf("client udp Read of a %d-byte datagram: %s", tc.size, err)
			}
			if src != tc.from || !bytes.Equal(buf[:n], want) {
				t.Fatalf("client udp Read = %d bytes from %s, want %d from %s (equal=%v)", n, src, tc.size, tc.from, bytes.Equal(buf[:n], want))
			}
			packets := 0
			for len(wire) > 0 {
				p := <-wire
				packets++
				if len(p) > testMTU {
					t.Errorf("packet of %d bytes written to the device, MTU %d", len(p), testMTU)
				}
			}
			t.Logf("%d bytes in %d packets", tc.size, packets)
		})
	}
}

// TestWriteUDPTooBig: a datagram that cannot be sent even fragmented is
// refused with ErrTooBig and counted, not sent to be dropped by the app's
// reassembly. IPv4's limit is 65535-20-8 bytes of payload.
func TestWriteUDPTooBig(t *testing.T) {
	for _, tc := range []struct {
		from netip.AddrPort
		size int
	}{
		{netip.MustParseAddrPort("10.233.1.5:53"), 65535 - 28 + 1},
		{netip.MustParseAddrPort("10.233.1.5:53"), 65535 - 8},
		{netip.MustParseAddrPort("10.233.1.5:53"), 70000},
		{netip.MustParseAddrPort("[fd00:233:1::5]:53"), 65535 - 8 + 1},
	} {
		t.Run(tc.from.String()+"/"+strconv.Itoa(tc.size), func(t *testing.T) {
			e := newEnv(t, defaultConfig(), &testHandler{})
			to := netip.AddrPortFrom(clientAddrFor(tc.from.Addr()), 4000)
			err := e.s.WriteUDP(make([]byte, tc.size), tc.from, to)
			if !errors.Is(err, netstack.ErrTooBig) {
				t.Fatalf("WriteUDP(%d bytes, %s, %s) = %v, want ErrTooBig", tc.size, tc.from, to, err)
			}
			if st := e.s.Stats(); st.UDPReplyTooBig != 1 {
				t.Errorf("Stats().UDPReplyTooBig = %d, want 1", st.UDPReplyTooBig)
			}
		})
	}
}

// TestWriteUDPMixedFamilies: from and to must be of one family.
func TestWriteUDPMixedFamilies(t *testing.T) {
	e := newEnv(t, defaultConfig(), &testHandler{})
	wire := e.tap()
	v4 := netip.MustParseAddrPort("10.233.1.5:53")
	v6 := netip.MustParseAddrPort("[fd00:233:1::5]:53")
	c4 := netip.AddrPortFrom(client4, 4000)
	c6 := netip.AddrPortFrom(client6, 4000)
	for _, tc := range []struct{ from, to netip.AddrPort }{{v4, c6}, {v6, c4}} {
		if err := e.s.WriteUDP([]byte("x"), tc.from, tc.to); err == nil {
			t.Errorf("WriteUDP(_, %s, %s) = nil, want an error", tc.from, tc.to)
		}
	}
	e.s.Flush(time.Second)
	if n := len(wire); n != 0 {
		t.Errorf("%d packets written for mixed-family WriteUDP, want 0", n)
	}
}

// TestWriteUDPInvalidAddresses: WriteUDP with a zero (invalid) address
// errors and writes nothing, rather than sending a datagram between
// unspecified addresses.
func TestWriteUDPInvalidAddresses(t *testing.T) {
	e := newEnv(t, defaultConfig(), &testHandler{})
	wire := e.tap()
	ok := netip.AddrPortFrom(client4, 4000)
	for _, tc := range []struct{ from, to netip.AddrPort }{
		{netip.AddrPort{}, netip.AddrPort{}},
		{netip.AddrPort{}, ok},
		{netip.MustParseAddrPort("10.233.1.5:53"), netip.AddrPort{}},
	} {
		if err := e.s.WriteUDP([]byte("x"), tc.from, tc.to); err == nil {
			t.Errorf("WriteUDP(_, %s, %s) = nil, want an error", tc.from, tc.to)
		}
	}
	e.s.Flush(time.Second)
	for len(wire) > 0 {
		p := <-wire
		t.Errorf("WriteUDP with an invalid address wrote a %d-byte packet: % x", len(p), p[:min(len(p), 48)])
	}
}

// TestMalformedDropped: each malformed packet is dropped and counted once
// in Stats().Malformed, reaches no handler and draws no reply; afterwards
// the stack still serves a TCP flow.
func TestMalformedDropped(t *testing.T) {
	h := &testHandler{}
	e := newEnv(t, defaultConfig(), h)
	tcpSeen := make(chan netip.AddrPort, 16)
	h.tcp = func(r *netstack.TCPRequest) {
		tcpSeen <- r.Dst()
		e.echo(r)
	}
	udpSeen := make(chan datagram, 16)
	h.udp = func(src, dst netip.AddrPort, payload []byte) bool {
		udpSeen <- datagram{src, dst, bytes.Clone(payload)}
		return true
	}
	probeSrc := netip.AddrPortFrom(client4, 7777)
	probeDst := netip.AddrPortFrom(remote4.Addr(), 9)

	src := netip.AddrPortFrom(client4, 5555)
	dns4 := netip.MustParseAddrPort("10.233.1.5:53")
	udpOK := buildUDP(src, dns4, []byte("query"))

	version7 := bytes.Clone(udpOK)
	version7[0] = 0x70 | version7[0]&0x0f

	badIPSum := bytes.Clone(udpOK)
	header.IPv4(badIPSum).SetChecksum(header.IPv4(badIPSum).Checksum() ^ 0x5555)

	badUDPSum := bytes.Clone(udpOK)
	u := header.UDP(badUDPSum[header.IPv4MinimumSize:])
	u.SetChecksum(u.Checksum() ^ 0x5555)

	badUDPSum6 := buildUDP(netip.AddrPortFrom(client6, 5555), netip.MustParseAddrPort("[fd00:233:1::5]:53"), []byte("query"))
	u6 := header.UDP(badUDPSum6[header.IPv6MinimumSize:])
	u6.SetChecksum(u6.Checksum() ^ 0x5555)

	badUDPLen := bytes.Clone(udpOK)
	header.UDP(badUDPLen[header.IPv4MinimumSize:]).SetLength(200)

	badTCPSum := buildTCPSYN(netip.AddrPortFrom(client4, 5556), remote4)
	tc := header.TCP(badTCPSum[header.IPv4MinimumSize:])
	tc.SetChecksum(tc.Checksum() ^ 0x5555)

	ipTotalTooLong := bytes.Clone(udpOK)
	ip := header.IPv4(ipTotalTooLong)
	ip.SetTotalLength(ip.TotalLength() + 100)
	ip.SetChecksum(0)
	ip.SetChecksum(^ip.CalculateChecksum())

	for _, m := range []struct {
		name string
		pkt  []byte
	}{
		{"version 7", version7},
		{"truncated IPv4 header", bytes.Clone(udpOK[:10])},
		{"IPv4 total length past the packet", ipTotalTooLong},
		{"bad IPv4 header checksum", badIPSum},
		{"bad UDP checksum", badUDPSum},
		{"bad UDP checksum over IPv6", badUDPSum6},
		{"UDP length past the packet", badUDPLen},
		{"TCP SYN with bad checksum", badTCPSum},
	} {
		t.Run(m.name, func(t *testing.T) {
			before := e.s.Stats()
			wire := e.tap()
			if !e.dev.inject(m.pkt) {
				t.Fatal("inject: device closed")
			}
			// A good datagram after it: once that is handled, the
			// malformed one was.
			e.dev.inject(buildUDP(probeSrc, probeDst, []byte("probe")))
			d := waitDatagram(t, "probe after "+m.name, udpSeen)
			if string(d.payload) != "probe" {
				t.Fatalf("HandleUDP got %q from %s to %s, want only the probe (the malformed packet got through)", d.payload, d.src, d.dst)
			}
			after := e.s.Stats()
			if got := after.Malformed - before.Malformed; got != 1 {
				t.Errorf("Stats().Malformed rose by %d for one malformed packet, want 1", got)
			}
			if after.UDPRefused != before.UDPRefused {
				t.Errorf("Stats().UDPRefused rose by %d, want 0", after.UDPRefused-before.UDPRefused)
			}
			e.s.Flush(time.Second)
			for len(wire) > 0 {
				p := <-wire
				t.Errorf("stack wrote a %d-byte packet in answer: % x", len(p), p[:min(len(p), 48)])
			}
			select {
			case dst := <-tcpSeen:
				t.Fatalf("HandleTCP called for %s", dst)
			default:
			}
		})
	}

	// Still serving: a full TCP flow.
	c := e.client.mustDialTCP(t, remote4)
	c.SetDeadline(time.Now().Add(waitFor))
	if _, err := c.Write([]byte("alive?")); err != nil {
		t.Fatalf("client Write after malformed input: %v", err)
	}
	buf := make([]byte, 6)
	n, err := io.ReadFull(c, buf)
	if err != nil || string(buf[:n]) != "alive?" {
		t.Fatalf("client echo after malformed input = %q, %v; want %q", buf[:n], err, "alive?")
	}
}
