package httpconnect

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"

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

// fakeRequest is what the fake proxy saw of one CONNECT.
type fakeRequest struct {
	method, target, host, auth string
}

// fakeOptions set how a fakeHTTP answers.
type fakeOptions struct {
	user, pass string // non-empty user: require these credentials, else 407
	status     int    // answer to every CONNECT that passes authentication
	early      string // with a 2xx: sent in the same write as the header
	silent     bool   // read the request and never answer
}

// fakeHTTP is a tiny HTTP CONNECT proxy on 127.0.0.1. After a 2xx it
// echoes the tunnel (half-close included) instead of dialing anything.
type fakeHTTP struct {
	fakeOptions
	addr string
	reqs chan fakeRequest
	wg   sync.WaitGroup
	mu   sync.Mutex
	open []net.Conn
}

func startHTTP(t *testing.T, opts fakeOptions) *fakeHTTP {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeHTTP{fakeOptions: opts, addr: ln.Addr().String(), reqs: make(chan fakeRequest, 16)}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.open = append(f.open, c)
			f.mu.Unlock()
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
		for _, c := range f.open {
			c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

func (f *fakeHTTP) serve(c *net.TCPConn) {
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	f.reqs <- fakeRequest{method: req.Method, target: req.RequestURI, host: req.Host, auth: req.Header.Get("Proxy-Authorization")}
	if f.silent {
		io.Copy(io.Discard, c)
		return
	}
	if f.user != "" {
		if u, p, ok := basicAuth(req); !ok || u != f.user || p != f.pass {
			io.WriteString(c, "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"fake\"\r\nContent-Length: 0\r\n\r\n")
			return
		}
	}
	if f.status < 200 || f.status > 299 {
		fmt.Fprintf(c, "HTTP/1.1 %d %s\r\nContent-Length: 5\r\n\r\noops\n", f.status, http.StatusText(f.status))
		return
	}
	fmt.Fprintf(c, "HTTP/1.1 %d Connection established\r\nProxy-Agent: fake\r\n\r\n%s", f.status, f.early)
	io.Copy(c, br)
	c.CloseWrite()
	io.Copy(io.Discard, c)
}

// basicAuth parses the Proxy-Authorization header the way a proxy does,
// through net/http's own Basic parser.
func basicAuth(req *http.Request) (string, string, bool) {
	r := &http.Request{Header: http.Header{"Authorization": req.Header["Proxy-Authorization"]}}
	return r.BasicAuth()
}

func mustAddrPort(t *testing.T, s string) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}
