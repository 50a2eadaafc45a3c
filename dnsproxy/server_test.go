package dnsproxy

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// handleUDP sends one datagram through HandleUDP and returns the reply, or
// nil when none comes within wait.
func handleUDP(t *testing.T, p *Proxy, b []byte, wait time.Duration) []byte {
	t.Helper()
	ch := make(chan []byte, 2)
	p.HandleUDP(b, func(answer []byte) { ch <- answer })
	select {
	case a := <-ch:
		return a
	case <-time.After(wait):
		return nil
	}
}

func pack(t *testing.T, m *dns.Msg) []byte {
	t.Helper()
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func unpack(t *testing.T, b []byte) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	if err := m.Unpack(b); err != nil {
		t.Fatalf("reply does not parse: %v", err)
	}
	return m
}

func TestHandleUDP(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)
	q := query("example.test.", dns.TypeA)
	b := pack(t, q)
	ch := make(chan []byte, 1)
	p.HandleUDP(b, func(answer []byte) { ch <- answer })
	for i := range b { // the caller may reuse its buffer at once
		b[i] = 0
	}
	r := unpack(t, <-ch)
	if r.Id != q.Id || !r.Response || len(r.Answer) != 1 {
		t.Fatalf("reply %v", r)
	}
}

func TestHandleUDPBadInput(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)

	// Garbage with a readable header: FORMERR with the query's ID.
	garbage := []byte{0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff}
	a := handleUDP(t, p, garbage, 5*time.Second)
	if a == nil {
		t.Fatal("no reply to a malformed query with a header")
	}
	r := unpack(t, a)
	if r.Id != 0xbeef || r.Rcode != dns.RcodeFormatError || !r.Response {
		t.Fatalf("reply id %#x rcode %s, want 0xbeef FORMERR", r.Id, dns.RcodeToString[r.Rcode])
	}
	// Shorter than a header: dropped.
	if a := handleUDP(t, p, []byte{1, 2, 3}, 200*time.Millisecond); a != nil {
		t.Fatalf("reply %x to a 3-byte datagram", a)
	}
	// A response is never answered.
	resp := new(dns.Msg).SetReply(query("example.test.", dns.TypeA))
	if a := handleUDP(t, p, pack(t, resp), 200*time.Millisecond); a != nil {
		t.Fatal("answered a response")
	}
	// Two questions: FORMERR.
	q2 := query("example.test.", dns.TypeA)
	q2.Question = append(q2.Question, q2.Question[0])
	if r := unpack(t, handleUDP(t, p, pack(t, q2), 5*time.Second)); r.Rcode != dns.RcodeFormatError || r.Id != q2.Id {
		t.Errorf("QDCOUNT 2: rcode %s", dns.RcodeToString[r.Rcode])
	}
	// ANY and other opcodes: NOTIMP; EDNS version 1: BADVERS.
	if r := unpack(t, handleUDP(t, p, pack(t, query("example.test.", dns.TypeANY)), 5*time.Second)); r.Rcode != dns.RcodeNotImplemented {
		t.Errorf("ANY: rcode %s, want NOTIMP", dns.RcodeToString[r.Rcode])
	}
	notify := new(dns.Msg).SetNotify("example.test.")
	if r := unpack(t, handleUDP(t, p, pack(t, notify), 5*time.Second)); r.Rcode != dns.RcodeNotImplemented {
		t.Errorf("NOTIFY: rcode %s, want NOTIMP", dns.RcodeToString[r.Rcode])
	}
	v1 := query("example.test.", dns.TypeA)
	v1.SetEdns0(1232, false)
	v1.IsEdns0().SetVersion(1)
	if r := unpack(t, handleUDP(t, p, pack(t, v1), 5*time.Second)); r.Rcode != dns.RcodeBadVers {
		t.Errorf("EDNS v1: rcode %s, want BADVERS", dns.RcodeToString[r.Rcode])
	}

	st := p.Stats()
	if st.FormErr != 2 || st.Dropped != 2 {
		t.Errorf("FormErr %d Dropped %d, want 2 and 2", st.FormErr, st.Dropped)
	}
	// Still answering.
	q := query("example.test.", dns.TypeA)
	if r := unpack(t, handleUDP(t, p, pack(t, q), 5*time.Second)); r.Id != q.Id || len(r.Answer) != 1 {
		t.Fatalf("after bad input: %v", r)
	}
}

func TestHandleUDPTruncates(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)
	r := unpack(t, handleUDP(t, p, pack(t, query("many.test.", dns.TypeTXT)), 5*time.Second))
	if !r.Truncated {
		t.Errorf("40 TXT records over UDP without EDNS: TC not set")
	}
	q := query("many.test.", dns.TypeTXT)
	q.SetEdns0(4096, false)
	a := handleUDP(t, p, pack(t, q), 5*time.Second)
	if r := unpack(t, a); r.Truncated || len(r.Answer) != 40 || len(a) > 4096 {
		t.Errorf("with EDNS 4096: TC=%v, %d records, %d bytes", r.Truncated, len(r.Answer), len(a))
	}
}

func TestHandleUDPUpstreamDownIsServfail(t *testing.T) {
	p := newProxy(t, Config{Upstreams: []string{"tcp://" + closedPort(t, "tcp")}, Timeout: 200 * time.Millisecond})
	q := query("example.test.", dns.TypeA)
	r := unpack(t, handleUDP(t, p, pack(t, q), 5*time.Second))
	if r.Rcode != dns.RcodeServerFailure || r.Id != q.Id {
		t.Errorf("rcode %s id %d, want SERVFAIL %d", dns.RcodeToString[r.Rcode], r.Id, q.Id)
	}
}

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	return client, server
}

func writeFramed(t *testing.T, c net.Conn, b []byte) {
	t.Helper()
	f := make([]byte, 2+len(b))
	binary.BigEndian.PutUint16(f, uint16(len(b)))
	copy(f[2:], b)
	if _, err := c.Write(f); err != nil {
		t.Fatal(err)
	}
}

func TestServeTCP(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)
	client, server := tcpPair(t)
	done := make(chan struct{})
	go func() {
		p.ServeTCP(server)
		close(done)
	}()
	// Several queries, pipelined, plus a malformed one and a runt.
	qs := []*dns.Msg{query("example.test.", dns.TypeA), query("a.test.", dns.TypeA), query("many.test.", dns.TypeTXT)}
	for _, q := range qs {
		writeFramed(t, client, pack(t, q))
	}
	writeFramed(t, client, []byte{0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff})
	writeFramed(t, client, []byte{1, 2})
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := map[uint16]*dns.Msg{}
	for range len(qs) + 1 {
		b, err := readFramed(client)
		if err != nil {
			t.Fatalf("read answer: %v", err)
		}
		r := unpack(t, b)
		got[r.Id] = r
	}
	for _, q := range qs {
		r := got[q.Id]
		if r == nil || r.Rcode != dns.RcodeSuccess || len(r.Answer) == 0 || r.Truncated {
			t.Errorf("answer to %s: %v", q.Question[0].Name, r)
		}
	}
	if r := got[0x1234]; r == nil || r.Rcode != dns.RcodeFormatError {
		t.Errorf("malformed query: %v, want FORMERR", r)
	}
	if r := got[qs[2].Id]; r != nil && len(r.Answer) != 40 {
		t.Errorf("TCP answer cut to %d records", len(r.Answer))
	}
	// EOF from the client ends ServeTCP, which closes its end.
	client.(*net.TCPConn).CloseWrite()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeTCP did not return after EOF")
	}
	if _, err := client.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("client read after ServeTCP returned: %v, want EOF", err)
	}
}

func TestCloseEndsServeTCP(t *testing.T) {
	s := newTestServer(t)
	p, err := New(Config{Upstreams: []string{"udp://" + s.udpAddr.String()}}, &loopbackDialer{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, server := tcpPair(t)
	done := make(chan struct{})
	go func() {
		p.ServeTCP(server)
		close(done)
	}()
	waitFor(t, "ServeTCP to register", func() bool {
		p.lifeMu.Lock()
		defer p.lifeMu.Unlock()
		return len(p.conns) == 1
	})
	p.Close()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeTCP still running after Close")
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := p.Exchange(context.Background(), query("x.test.", dns.TypeA)); !errors.Is(err, errClosed) {
		t.Errorf("Exchange after Close: %v", err)
	}
	if a := handleUDP(t, p, pack(t, query("example.test.", dns.TypeA)), 100*time.Millisecond); a != nil {
		t.Error("HandleUDP answered after Close")
	}
}

// TestCloseLeavesNoGoroutines runs every upstream kind and the serving paths
// and checks that Close leaves nothing of the proxy running.
func TestCloseLeavesNoGoroutines(t *testing.T) {
	ca := newTestCA(t, "test CA")
	cert := ca.issue(t, []string{"dns.test"}, net.IPv4(127, 0, 0, 1))
	s := newTestServer(t)
	dot, doh := s.startDoT(cert), s.startDoH(cert, true)
	before := runtime.NumGoroutine()
	p, err := New(Config{
		Upstreams: []string{"tls://" + dot.String(), "https://" + doh.String(), "udp://" + s.udpAddr.String()},
		TLSConfig: tlsClientConfig(ca),
	}, &loopbackDialer{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i, name := range []string{"example.test.", "a.test.", "b.test."} {
		p.preferred.Store(int32(i))
		exchange(t, p, name, dns.TypeA)
	}
	handleUDP(t, p, pack(t, query("short.test.", dns.TypeA)), 5*time.Second)
	p.Close()
	waitFor(t, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
}

func TestResolve(t *testing.T) {
	s := newTestServer(t)
	p := fakeProxy(t, s)
	ctx := context.Background()
	got, err := p.Resolve(ctx, "example.test", false)
	if err != nil || len(got) != 1 || got[0] != netip.MustParseAddr("192.0.2.1") {
		t.Errorf("Resolve v4 = %v, %v; want the real 192.0.2.1 in fake-ip mode", got, err)
	}
	got, err = p.Resolve(ctx, "example.test", true)
	if err != nil || len(got) != 1 || got[0] != netip.MustParseAddr("2001:db8::1") {
		t.Errorf("Resolve v6 = %v, %v", got, err)
	}
	got, err = p.Resolve(ctx, "v6only.test", false)
	if err != nil || len(got) != 1 || got[0] != netip.MustParseAddr("2001:db8::6") {
		t.Errorf("Resolve v4 of a v6-only name = %v, %v; want the AAAA", got, err)
	}
	got, err = p.Resolve(ctx, "www.test", false) // through a CNAME
	if err != nil || len(got) != 1 || got[0] != netip.MustParseAddr("192.0.2.80") {
		t.Errorf("Resolve through CNAME = %v, %v", got, err)
	}
	if _, err := p.Resolve(ctx, "missing.test", false); !errors.Is(err, ErrNoSuchHost) {
		t.Errorf("Resolve of a missing name: %v, want ErrNoSuchHost", err)
	}
	if got, err := p.Resolve(ctx, "10.1.2.3", false); err != nil || got[0] != netip.MustParseAddr("10.1.2.3") {
		t.Errorf("Resolve of an IP = %v, %v", got, err)
	}
	// Resolve never handed out fake addresses.
	if st := p.Stats(); st.FakeIPMappings != 0 {
		t.Errorf("Resolve made %d fake mappings", st.FakeIPMappings)
	}
}

func TestRealModeDomain(t *testing.T) {
	s := newTestServer(t)
	p := realProxy(t, s)
	exchange(t, p, "WWW.test.", dns.TypeA)
	exchange(t, p, "example.test.", dns.TypeAAAA)
	for a, want := range map[string]string{"192.0.2.80": "www.test", "2001:db8::1": "example.test"} {
		if got, ok := p.Domain(netip.MustParseAddr(a)); !ok || got != want {
			t.Errorf("Domain(%s) = %q, %v; want %q", a, got, ok, want)
		}
	}
	if _, ok := p.Domain(netip.MustParseAddr("192.0.2.200")); ok {
		t.Error("Domain of an unknown address found a name")
	}
	if p.IsFake(netip.MustParseAddr("198.18.0.1")) {
		t.Error("IsFake in real mode")
	}
}
