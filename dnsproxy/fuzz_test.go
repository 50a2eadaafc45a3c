package dnsproxy

import (
	"encoding/binary"
	"testing"

	"github.com/miekg/dns"
)

// FuzzHandleUDP feeds arbitrary datagrams to HandleUDP on a fake-ip proxy
// with a live upstream: nothing panics, and every reply parses and carries
// the query's ID.
func FuzzHandleUDP(f *testing.F) {
	for _, q := range []*dns.Msg{
		query("example.test.", dns.TypeA),
		query("example.test.", dns.TypeAAAA),
		query("example.test.", dns.TypeMX),
		query("svc.test.", dns.TypeHTTPS),
		query("host.lan.", dns.TypeA),
		query("1.0.18.198.in-addr.arpa.", dns.TypePTR),
		query("missing.test.", dns.TypeTXT),
		query("example.test.", dns.TypeANY),
	} {
		b, _ := q.Pack()
		f.Add(b)
		f.Add(b[:len(b)-3])
		f.Add(b[:12])
		q.SetEdns0(4096, true)
		b, _ = q.Pack()
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{1, 2, 3})
	f.Add([]byte{0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1})
	f.Add([]byte("\x00\x01\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00garbage that is long enough"))

	s := newTestServer(f)
	p, err := New(Config{
		Mode:        ModeFakeIP,
		Upstreams:   []string{"udp://" + s.udpAddr.String()},
		FakeRange4:  testRange4,
		FakeRange6:  testRange6,
		FakeExclude: []string{"*.lan"},
	}, &loopbackDialer{}, nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { p.Close() })

	f.Fuzz(func(t *testing.T, b []byte) {
		var answer []byte
		calls := 0
		p.HandleUDP(b, func(a []byte) { answer = a; calls++ })
		p.wg.Wait() // HandleUDP's goroutine, and any flight it started
		if calls > 1 {
			t.Fatalf("reply called %d times", calls)
		}
		if calls == 0 {
			return
		}
		if len(b) < headerLen {
			t.Fatalf("reply to a %d-byte datagram", len(b))
		}
		m := new(dns.Msg)
		if err := m.Unpack(answer); err != nil {
			t.Fatalf("reply does not parse: %v\nquery %x\nreply %x", err, b, answer)
		}
		if m.Id != binary.BigEndian.Uint16(b) || !m.Response {
			t.Fatalf("reply ID %#x QR %v, query ID %#x", m.Id, m.Response, binary.BigEndian.Uint16(b))
		}
	})
}
