package socks5

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/outbound"
)

// FuzzSOCKS5Reply feeds arbitrary server bytes to the method-selection,
// authentication and CONNECT/ASSOCIATE reply parsers, alone and as a
// whole handshake: each must return an error or a sane result, never
// panic or hang.
func FuzzSOCKS5Reply(f *testing.F) {
	f.Add([]byte{5, 0, 5, 0, 0, 1, 127, 0, 0, 1, 0x04, 0x38})
	f.Add([]byte{5, 2, 1, 0, 5, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80})
	f.Add([]byte{5, 0, 5, 0, 0, 3, 11, 'e', 'x', 'a', 'm', 'p', 'l', 'e', '.', 'o', 'r', 'g', 1, 187})
	f.Add([]byte{5, 0, 5, 5, 0, 1})
	f.Add([]byte{5, 0xff})
	f.Add([]byte{5, 2, 1, 1})
	f.Add([]byte{5, 0, 5, 0, 0, 3, 0})
	f.Add([]byte{5, 0, 5, 0, 0, 3, 255, 'x'})
	f.Add([]byte{5, 0, 5, 0, 0, 9})
	f.Add([]byte{4, 0})
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{5}, 600))

	withAuth := &Dialer{cfg: Config{Name: "fuzz", Username: "u", Password: "p"}}
	noAuth := &Dialer{cfg: Config{Name: "fuzz"}}
	dst := outbound.Target{Addr: netip.MustParseAddrPort("192.0.2.1:443"), Domain: "example.org"}
	f.Fuzz(func(t *testing.T, data []byte) {
		done := make(chan struct{})
		timer := time.AfterFunc(5*time.Second, func() {
			select {
			case <-done:
			default:
				panic("parser hung on a bytes.Reader")
			}
		})
		defer timer.Stop()
		defer close(done)

		readMethodReply(bytes.NewReader(data))
		err := readAuthReply(bytes.NewReader(data))
		if err == nil && (len(data) < 2 || data[1] != 0) {
			t.Fatalf("readAuthReply(%x) accepted a failure", data)
		}
		a, err := readReply(bytes.NewReader(data))
		var re ReplyError
		switch {
		case err == nil && (len(a.name) > 255 || (a.name == "") != a.ip.IsValid()):
			t.Fatalf("readReply(%x) = %+v", data, a)
		case errors.As(err, &re) && errors.Is(err, outbound.ErrRefused) != (re == 5):
			t.Fatalf("readReply(%x): %v: refused is %v", data, err, re != 5)
		}
		for _, d := range []*Dialer{withAuth, noAuth} {
			for _, cmd := range []byte{cmdConnect, cmdUDPAssociate} {
				rw := struct {
					io.Reader
					io.Writer
				}{bytes.NewReader(data), io.Discard}
				a, err := d.handshake(rw, cmd, dst)
				if err == nil && a.name == "" && !a.ip.IsValid() {
					t.Fatalf("handshake(%x) = %+v, nil", data, a)
				}
				if err != nil && strings.Contains(err.Error(), "authentication failed") && !errors.Is(err, outbound.ErrRefused) {
					t.Fatalf("handshake(%x): auth failure %v is not ErrRefused", data, err)
				}
			}
		}
	})
}

// FuzzSOCKS5UDPHeader: the UDP header parser returns an error or an
// address and a payload offset within the datagram.
func FuzzSOCKS5UDPHeader(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 192, 0, 2, 1, 0, 53, 'h', 'i'})
	f.Add([]byte{0, 0, 0, 4, 0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 53})
	f.Add([]byte{0, 0, 0, 3, 3, 'a', '.', 'b', 0, 53, 'x'})
	f.Add([]byte{0, 0, 1, 1, 192, 0, 2, 1, 0, 53})
	f.Add([]byte{0, 0, 0, 1, 192})
	f.Add([]byte{0, 0, 0, 7})
	f.Add([]byte{0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		from, off, err := parseUDPHeader(data)
		if err != nil {
			return
		}
		if off < 4 || off > len(data) || !from.IsValid() || from.Addr().Is4In6() {
			t.Fatalf("parseUDPHeader(%x) = %s, %d", data, from, off)
		}
		// What parses survives a round trip through our own encoder.
		hdr, err := appendUDPHeader(nil, outbound.Target{Addr: from})
		if err != nil {
			t.Fatalf("appendUDPHeader(%s): %v", from, err)
		}
		again, _, err := parseUDPHeader(hdr)
		if err != nil || again != from || data[2] != 0 {
			t.Fatalf("parseUDPHeader(%x) = %s; re-encoded %x parses as %s, %v", data, from, hdr, again, err)
		}
	})
}
