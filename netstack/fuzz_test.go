package netstack_test

import (
	"bytes"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/tungate/tungate/netstack"
)

// fuzzFixture is one stack shared by every FuzzInbound iteration of a
// process, so that an iteration costs two packets and not a stack. It is
// never closed: the process ends first.
type fuzzFixture struct {
	e      *env
	probes chan []byte
	seq    atomic.Uint64
}

var (
	fuzzOnce sync.Once
	fuzzFix  *fuzzFixture
)

var (
	fuzzProbeSrc = netip.MustParseAddrPort("172.19.0.1:7777")
	fuzzProbeDst = netip.MustParseAddrPort("10.233.1.5:9")
)

// fuzzTB lets newEnv build a fixture that outlives any one test: it fails
// loudly and never registers cleanups.
type fuzzTB struct{ testing.TB }

func (fuzzTB) Helper()                   {}
func (fuzzTB) Cleanup(func())            {}
func (fuzzTB) Fatalf(f string, a ...any) { panic(fmt.Sprintf(f, a...)) }
func (fuzzTB) Errorf(f string, a ...any) { panic(fmt.Sprintf(f, a...)) }

func getFuzzFixture() *fuzzFixture {
	fuzzOnce.Do(func() {
		fx := &fuzzFixture{probes: make(chan []byte, 64)}
		h := &testHandler{}
		cfg := defaultConfig()
		cfg.MaxInFlight = 8
		fx.e = newEnv(fuzzTB{}, cfg, h)
		s := fx.e.s
		// Accept and echo TCP; echo UDP back from where it was sent
		// (exercising WriteUDP with whatever addresses the input has),
		// and report probes.
		h.tcp = func(r *netstack.TCPRequest) {
			c, err := r.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(time.Second))
				buf := make([]byte, 2048)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
		h.udp = func(src, dst netip.AddrPort, payload []byte) bool {
			if src == fuzzProbeSrc && dst == fuzzProbeDst {
				select {
				case fx.probes <- bytes.Clone(payload):
				default:
				}
				return true
			}
			s.WriteUDP(payload, dst, src)
			return true
		}
		fuzzFix = fx
	})
	return fuzzFix
}

// FuzzInbound delivers each input as a packet from the TUN. The stack must
// not panic and must still serve afterwards: a normal datagram sent after
// the input reaches the handler.
func FuzzInbound(f *testing.F) {
	c4 := netip.AddrPortFrom(client4, 40001)
	c6 := netip.AddrPortFrom(client6, 40001)
	d4 := netip.MustParseAddrPort("10.233.1.5:53")
	d6 := netip.MustParseAddrPort("[fd00:233:1::5]:53")
	syn4 := buildTCPSYN(c4, remote4)
	syn6 := buildTCPSYN(c6, remote6)
	udp4 := buildUDP(c4, d4, []byte("query"))
	udp6 := buildUDP(c6, d6, []byte("query"))
	for _, seed := range [][]byte{
		syn4, syn6, udp4, udp6,
		buildUDP(c4, d4, make([]byte, 3000)), // bigger than the MTU: unfragmented
		buildUDP(netip.MustParseAddrPort("10.233.1.5:53"), netip.MustParseAddrPort("255.255.255.255:68"), []byte("bcast")),
		buildUDP(c6, netip.MustParseAddrPort("[ff02::1]:5353"), []byte("mcast")),
		// An IPv4 first fragment whose rest never comes.
		func() []byte {
			p := bytes.Clone(udp4)
			ip := header.IPv4(p)
			ip.SetFlagsFragmentOffset(header.IPv4FlagMoreFragments, 0)
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
			return p
		}(),
		udp4[:header.IPv4MinimumSize+4],
		syn6[:header.IPv6MinimumSize],
		{},
		{0x45},
		{0x60, 0, 0, 0},
		{0x70, 1, 2, 3, 4, 5, 6, 7},
		[]byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
		bytes.Repeat([]byte{0xff}, 60),
	} {
		f.Add(seed)
	}

	f.Fuzz(func(t *testing.T, pkt []byte) {
		if len(pkt) > 65535 {
			return // no IP packet is longer; the device would never read one
		}
		fx := getFuzzFixture()
		if !fx.e.dev.inject(bytes.Clone(pkt)) {
			t.Fatalf("after earlier inputs: stack not reading from the device for %v; goroutines:\n%s", waitFor, stackDump())
		}
		want := fmt.Appendf(nil, "probe %d", fx.seq.Add(1))
		if !fx.e.dev.inject(buildUDP(fuzzProbeSrc, fuzzProbeDst, want)) {
			t.Fatalf("after input % x: stack not reading from the device for %v; goroutines:\n%s", pkt[:min(len(pkt), 64)], waitFor, stackDump())
		}
		timeout := time.After(waitFor)
		for {
			select {
			case got := <-fx.probes:
				if bytes.Equal(got, want) {
					return
				}
				// An earlier probe, or one the input forged: keep waiting.
			case <-timeout:
				t.Fatalf("after input % x: probe datagram did not reach HandleUDP within %v (stats %+v); goroutines:\n%s", pkt[:min(len(pkt), 64)], waitFor, fx.e.s.Stats(), stackDump())
			}
		}
	})
}
