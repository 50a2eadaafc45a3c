package netstack_test

import (
	"bytes"
	"crypto/rand"
	"io"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/tungate/tungate/netstack"
	"github.com/tungate/tungate/tun/virtio"
)

// TestVirtioTCPEcho runs a flow over a device with offloads: gVisor sends
// super-packets the "kernel" (the fake device) must segment, and partial
// checksums it must complete; the data still arrives byte-exact both ways.
func TestVirtioTCPEcho(t *testing.T) {
	for _, dst := range []netip.AddrPort{remote4, remote6} {
		t.Run(dst.String(), func(t *testing.T) {
			h := &testHandler{}
			e := newEnvMode(t, netstack.Config{MTU: 1500, MaxInFlight: 16}, h, true)
			h.tcp = e.echo
			c := e.client.mustDialTCP(t, dst)
			want := make([]byte, 4<<20)
			rand.Read(want)
			c.SetDeadline(time.Now().Add(30 * time.Second))
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(want)
				if err == nil {
					err = c.CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(c)
			if err != nil || <-werr != nil {
				t.Fatalf("echo over offloads: read %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("echo over offloads: got %d bytes, want %d, equal=false", len(got), len(want))
			}
			if e.dev.gsoFrames.Load() == 0 {
				t.Errorf("no frame asked the kernel to segment: host GSO is not in use")
			}
		})
	}
}

// TestVirtioRXChecksums: with offloads gVisor trusts received checksums,
// so the link checks those the kernel did not mark partial: a corrupt one
// is dropped and counted, a partial one is accepted.
func TestVirtioRXChecksums(t *testing.T) {
	h := &testHandler{}
	got := make(chan []byte, 4)
	h.udp = func(src, dst netip.AddrPort, payload []byte) bool {
		got <- bytes.Clone(payload)
		return true
	}
	e := newEnvMode(t, defaultConfig(), h, true)
	src := netip.AddrPortFrom(client4, 5353)

	bad := buildUDP(src, remote4, []byte("corrupt"))
	bad[len(bad)-1] ^= 0xff
	before := e.s.Stats().Malformed
	e.dev.inject(bad)
	if !waitUntil(func() bool { return e.s.Stats().Malformed > before }) {
		t.Fatalf("a UDP datagram with a bad checksum was not counted as malformed")
	}

	// A partial checksum: the pseudo-header sum only, flagged NEEDS_CSUM.
	partial := buildUDP(src, remote4, []byte("partial"))
	udp := header.UDP(partial[header.IPv4MinimumSize:])
	udp.SetChecksum(header.PseudoHeaderChecksum(header.UDPProtocolNumber, toTCPIP(src.Addr()), toTCPIP(remote4.Addr()), uint16(len(udp))))
	frame := make([]byte, virtio.HdrLen, virtio.HdrLen+len(partial))
	virtio.Hdr{Flags: virtio.FlagNeedsCsum, CsumStart: header.IPv4MinimumSize, CsumOffset: 6 /* udphdr.check */}.Encode(frame)
	e.dev.inject(append([]byte(rawFrameTag), append(frame, partial...)...))
	select {
	case p := <-got:
		if string(p) != "partial" {
			t.Fatalf("handler got %q, want the partial-checksum datagram", p)
		}
	case <-time.After(waitFor):
		t.Fatal("a datagram with a partial checksum (NEEDS_CSUM) never reached the handler")
	}
	select {
	case p := <-got:
		t.Fatalf("the corrupt datagram reached the handler too: %q", p)
	default:
	}
}
