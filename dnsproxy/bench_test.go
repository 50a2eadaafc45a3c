package dnsproxy

import (
	"context"
	"testing"

	"github.com/miekg/dns"
)

// BenchmarkExchangeCached measures a cache hit: lookup, copy with TTLs
// lowered, the reply header.
func BenchmarkExchangeCached(b *testing.B) {
	s := newTestServer(b)
	p, err := New(Config{Upstreams: []string{"udp://" + s.udpAddr.String()}}, &loopbackDialer{}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	q := query("www.test.", dns.TypeA)
	ctx := context.Background()
	if _, err := p.Exchange(ctx, q); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		r, err := p.Exchange(ctx, q)
		if err != nil || len(r.Answer) != 2 {
			b.Fatal(err, r)
		}
	}
}

// BenchmarkHandleUDPCached measures the whole wire path of a cache hit.
func BenchmarkHandleUDPCached(b *testing.B) {
	s := newTestServer(b)
	p, err := New(Config{Upstreams: []string{"udp://" + s.udpAddr.String()}}, &loopbackDialer{}, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	wire, _ := query("www.test.", dns.TypeA).Pack()
	done := make(chan []byte, 1)
	reply := func(a []byte) { done <- a }
	p.HandleUDP(wire, reply)
	<-done
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		p.HandleUDP(wire, reply)
		<-done
	}
}
