package socks5

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tungate/tungate/outbound"
)

// loopback is the base dialer of the tests: the direct outbound, unmarked
// and unbound, reaching the fake proxies on this host's loopback.
func loopback() outbound.Dialer {
	d, err := outbound.NewDirect(outbound.DirectConfig{Name: "loopback"}, nil)
	if err != nil {
		panic(err)
	}
	return d
}

// fakeRequest is what the fake server saw of one client.
type fakeRequest struct {
	methods []byte
	cmd     byte
	atyp    byte
	host    string // IP or name, as sent
	port    uint16
}

// fakeDatagram is one datagram the fake relay received from the client.
type fakeDatagram struct {
	atyp    byte
	host    string
	port    uint16
	payload string
}

// fakeOptions set how a fakeSOCKS behaves.
type fakeOptions struct {
	user, pass string            // non-empty user: require method 0x02
	rep        byte              // reply code for every request; 0 succeeds
	silent     bool              // accept and never answer
	bndZero    bool              // ASSOCIATE replies with BND.ADDR 0.0.0.0
	names      map[string]string // name or IP as sent → address to dial
}

// fakeSOCKS is a tiny SOCKS5 server on 127.0.0.1: CONNECT (dialing the
// destination and relaying with half-close), UDP ASSOCIATE (a full-cone
// relay) and username/password authentication.
type fakeSOCKS struct {
	fakeOptions
	ln     net.Listener
	addr   string
	reqs   chan fakeRequest
	assocs chan *fakeAssoc
	wg     sync.WaitGroup
	mu     sync.Mutex
	closer []io.Closer
}

func startSOCKS(t *testing.T, opts fakeOptions) *fakeSOCKS {
	t.Helper()
	f := &fakeSOCKS{fakeOptions: opts}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.ln, f.addr = ln, ln.Addr().String()
	f.reqs = make(chan fakeRequest, 16)
	f.assocs = make(chan *fakeAssoc, 16)
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.track(c)
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer c.Close()
				f.serve(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for _, c := range f.closer {
			c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

func (f *fakeSOCKS) track(c io.Closer) {
	f.mu.Lock()
	f.closer = append(f.closer, c)
	f.mu.Unlock()
}

func (f *fakeSOCKS) serve(c *net.TCPConn) {
	if f.silent {
		io.Copy(io.Discard, c)
		return
	}
	var b [512]byte
	if _, err := io.ReadFull(c, b[:2]); err != nil || b[0] != 5 {
		return
	}
	methods := make([]byte, b[1])
	if _, err := io.ReadFull(c, methods); err != nil {
		return
	}
	want := byte(0x00)
	if f.user != "" {
		want = 0x02
	}
	if !strings.ContainsRune(string(methods), rune(want)) {
		c.Write([]byte{5, 0xff})
		return
	}
	c.Write([]byte{5, want})
	if want == 0x02 {
		if _, err := io.ReadFull(c, b[:2]); err != nil {
			return
		}
		user := make([]byte, b[1])
		io.ReadFull(c, user)
		io.ReadFull(c, b[:1])
		pass := make([]byte, b[0])
		io.ReadFull(c, pass)
		if string(user) != f.user || string(pass) != f.pass {
			c.Write([]byte{1, 1})
			return
		}
		c.Write([]byte{1, 0})
	}
	if _, err := io.ReadFull(c, b[:4]); err != nil {
		return
	}
	req := fakeRequest{methods: methods, cmd: b[1], atyp: b[3]}
	switch req.atyp {
	case 1:
		io.ReadFull(c, b[:4])
		req.host = netip.AddrFrom4([4]byte(b[:4])).String()
	case 4:
		io.ReadFull(c, b[:16])
		req.host = netip.AddrFrom16([16]byte(b[:16])).String()
	case 3:
		io.ReadFull(c, b[:1])
		name := make([]byte, b[0])
		io.ReadFull(c, name)
		req.host = string(name)
	default:
		return
	}
	if _, err := io.ReadFull(c, b[:2]); err != nil {
		return
	}
	req.port = binary.BigEndian.Uint16(b[:2])
	f.reqs <- req
	if f.rep != 0 {
		c.Write([]byte{5, f.rep, 0, 1, 0, 0, 0, 0, 0, 0})
		return
	}
	switch req.cmd {
	case 1:
		up, err := net.Dial("tcp", f.resolve(req.host, req.port))
		if err != nil {
			c.Write([]byte{5, 5, 0, 1, 0, 0, 0, 0, 0, 0})
			return
		}
		defer up.Close()
		c.Write(reply(up.LocalAddr().(*net.TCPAddr).AddrPort()))
		done := make(chan struct{})
		go func() {
			io.Copy(up, c)
			up.(*net.TCPConn).CloseWrite()
			close(done)
		}()
		io.Copy(c, up)
		c.CloseWrite()
		<-done
	case 3:
		udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return
		}
		f.track(udp)
		bnd := udp.LocalAddr().(*net.UDPAddr).AddrPort()
		a := &fakeAssoc{f: f, ctrl: c, udp: udp, relay: bnd, seen: make(chan fakeDatagram, 16), known: make(chan struct{}), ctrlEnded: make(chan struct{})}
		if f.bndZero {
			bnd = netip.AddrPortFrom(netip.IPv4Unspecified(), bnd.Port())
		}
		c.Write(reply(bnd))
		f.assocs <- a
		done := make(chan struct{})
		go func() {
			a.serve()
			close(done)
		}()
		io.Copy(io.Discard, c)
		close(a.ctrlEnded)
		udp.Close()
		<-done
	default:
		c.Write([]byte{5, 7, 0, 1, 0, 0, 0, 0, 0, 0})
	}
}

func (f *fakeSOCKS) resolve(host string, port uint16) string {
	if a, ok := f.names[host]; ok {
		return a
	}
	return net.JoinHostPort(host, fmt.Sprint(port))
}

// reply is a success reply with an IPv4 bound address.
func reply(bnd netip.AddrPort) []byte {
	a := bnd.Addr().As4()
	b := append([]byte{5, 0, 0, 1}, a[:]...)
	return binary.BigEndian.AppendUint16(b, bnd.Port())
}

// fakeAssoc is the fake server's side of one UDP association. The client
// is whoever sends the first datagram; datagrams from anyone else are
// relayed to the client, wrapped.
type fakeAssoc struct {
	f     *fakeSOCKS
	ctrl  *net.TCPConn
	udp   *net.UDPConn
	relay netip.AddrPort
	seen  chan fakeDatagram

	client netip.AddrPort
	known  chan struct{} // closed once client is set

	ctrlEnded chan struct{} // closed when the client ended the control connection
}

func (a *fakeAssoc) serve() {
	buf := make([]byte, 65536)
	for {
		n, from, err := a.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		if !a.client.IsValid() {
			a.client = from
			close(a.known)
		}
		if from != a.client {
			ip := from.Addr().As4()
			h := append([]byte{0, 0, 0, 1}, ip[:]...)
			h = binary.BigEndian.AppendUint16(h, from.Port())
			a.udp.WriteToUDPAddrPort(append(h, buf[:n]...), a.client)
			continue
		}
		p := buf[:n]
		if len(p) < 4 || p[2] != 0 {
			continue
		}
		d := fakeDatagram{atyp: p[3]}
		switch p[3] {
		case 1:
			d.host, p = netip.AddrFrom4([4]byte(p[4:8])).String(), p[8:]
		case 4:
			d.host, p = netip.AddrFrom16([16]byte(p[4:20])).String(), p[20:]
		case 3:
			d.host, p = string(p[5:5+int(p[4])]), p[5+int(p[4]):]
		}
		d.port, d.payload = binary.BigEndian.Uint16(p), string(p[2:])
		a.seen <- d
		dst, err := netip.ParseAddrPort(a.f.resolve(d.host, d.port))
		if err == nil {
			a.udp.WriteToUDPAddrPort([]byte(d.payload), dst)
		}
	}
}

// inject sends raw from the relay to the client.
func (a *fakeAssoc) inject(t *testing.T, raw []byte) {
	t.Helper()
	<-a.known
	if _, err := a.udp.WriteToUDPAddrPort(raw, a.client); err != nil {
		t.Fatal(err)
	}
}

// noGoroutine fails t if a goroutine running fn is still there after a
// short grace period.
func noGoroutine(t *testing.T, fn string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if !strings.Contains(string(buf[:n]), fn) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutine %s still running:\n%s", fn, buf[:n])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// echoServer accepts connections on 127.0.0.1 and echoes them, half-close
// included; it returns the address.
func echoServer(t *testing.T) string {
	t.Helper()
	return tcpServer(t, func(c *net.TCPConn) {
		io.Copy(c, c)
		c.CloseWrite()
		io.Copy(io.Discard, c)
	})
}

// tcpServer runs handle for every connection to a listener on 127.0.0.1.
func tcpServer(t *testing.T, handle func(*net.TCPConn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}
