package httpconnect

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/tungate/tungate/outbound"
)

func newDialer(t *testing.T, cfg Config) *Dialer {
	t.Helper()
	if cfg.Name == "" {
		cfg.Name = "web"
	}
	d, err := New(cfg, loopback(), nil)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	return d
}

func TestNewValidates(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string // in the error; "" for none
	}{
		{Config{Name: "w", Address: "127.0.0.1:8888"}, ""},
		{Config{Name: "w", Address: "[::1]:8888", Username: "u", Password: "p:q"}, ""},
		{Config{Address: "127.0.0.1:8888"}, "empty name"},
		{Config{Name: "w", Address: "proxy.lan:8888"}, "must be an IP address"},
		{Config{Name: "w", Address: "127.0.0.1"}, "host:port"},
		{Config{Name: "w", Address: "127.0.0.1:0"}, "port 0"},
		{Config{Name: "w", Address: "127.0.0.1:8888", Username: "a:b"}, "contains ':'"},
		{Config{Name: "w", Address: "127.0.0.1:8888", Username: "a", Password: "b\r\nX: y"}, "control character"},
		{Config{Name: "w", Address: "127.0.0.1:8888", Password: "p"}, "password without a username"},
	} {
		_, err := New(tc.cfg, loopback(), nil)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("New(%+v): %v", tc.cfg, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("New(%+v) = %v, want an error containing %q", tc.cfg, err, tc.want)
		}
	}
}

// TestConnect checks the request target for each kind of destination,
// the early bytes, and a 1 MiB echo with a half-close at the end.
func TestConnect(t *testing.T) {
	for _, tc := range []struct {
		name  string
		dst   outbound.Target
		want  string
		early string
	}{
		{"domain with early bytes", outbound.Target{Addr: mustAddrPort(t, "198.18.0.3:443"), Domain: "example.org"}, "example.org:443", "early bird"},
		{"ipv4", outbound.Target{Addr: mustAddrPort(t, "192.0.2.1:80")}, "192.0.2.1:80", ""},
		{"ipv6", outbound.Target{Addr: mustAddrPort(t, "[2001:db8::1]:443")}, "[2001:db8::1]:443", ""},
		{"ipv4-mapped", outbound.Target{Addr: mustAddrPort(t, "[::ffff:192.0.2.1]:80")}, "192.0.2.1:80", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startHTTP(t, fakeOptions{status: 200, early: tc.early})
			d := newDialer(t, Config{Address: f.addr})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := d.DialTCP(ctx, tc.dst)
			if err != nil {
				t.Fatalf("DialTCP(%s): %v", tc.dst, err)
			}
			defer c.Close()
			req := <-f.reqs
			if req.method != "CONNECT" || req.target != tc.want || req.host != tc.want || req.auth != "" {
				t.Errorf("proxy saw %+v, want CONNECT %s with Host %[2]s and no credentials", req, tc.want)
			}

			c.SetDeadline(time.Now().Add(10 * time.Second))
			data := make([]byte, 1<<20)
			rand.Read(data)
			werr := make(chan error, 1)
			go func() {
				_, err := c.Write(data)
				if err == nil {
					err = c.CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("ReadAll: %v", err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("Write/CloseWrite: %v", err)
			}
			want := append([]byte(tc.early), data...)
			if !bytes.Equal(got, want) {
				t.Fatalf("read %d bytes, want the %d early bytes then the %d echoed, byte-exact", len(got), len(tc.early), len(data))
			}
			if st := d.Stats(); st.Dials != 1 || st.DialFailures+st.Refused != 0 {
				t.Errorf("Stats() = %+v, want one dial, no failure", st)
			}
		})
	}
}

func TestBasicAuth(t *testing.T) {
	f := startHTTP(t, fakeOptions{user: "alice", pass: "s3:cret", status: 200})
	d := newDialer(t, Config{Address: f.addr, Username: "alice", Password: "s3:cret"})
	c, err := d.DialTCP(context.Background(), outbound.Target{Addr: mustAddrPort(t, "192.0.2.1:80")})
	if err != nil {
		t.Fatalf("DialTCP: %v", err)
	}
	c.Close()
	want := "Basic " + base64.StdEncoding.EncodeToString([]byte("alice:s3:cret"))
	if req := <-f.reqs; req.auth != want {
		t.Errorf("Proxy-Authorization = %q, want %q", req.auth, want)
	}
}

func TestFailures(t *testing.T) {
	dst := outbound.Target{Addr: mustAddrPort(t, "192.0.2.1:80"), Domain: "example.org"}
	for _, tc := range []struct {
		name    string
		fake    fakeOptions
		cfg     Config
		refused bool
		text    string
	}{
		{"wrong password", fakeOptions{user: "alice", pass: "s3cret", status: 200}, Config{Username: "alice", Password: "guess"}, true, "authentication failed"},
		{"no credentials", fakeOptions{user: "alice", pass: "s3cret", status: 200}, Config{}, true, "authentication failed"},
		{"bad gateway", fakeOptions{status: 502}, Config{}, false, `"HTTP/1.1 502 Bad Gateway"`},
		{"forbidden", fakeOptions{status: 403}, Config{}, false, `"HTTP/1.1 403 Forbidden"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := startHTTP(t, tc.fake)
			tc.cfg.Address = f.addr
			d := newDialer(t, tc.cfg)
			_, err := d.DialTCP(context.Background(), dst)
			if err == nil {
				t.Fatal("DialTCP succeeded")
			}
			if errors.Is(err, outbound.ErrRefused) != tc.refused {
				t.Errorf("errors.Is(%v, ErrRefused) = %v, want %v", err, !tc.refused, tc.refused)
			}
			if !strings.Contains(err.Error(), tc.text) || !strings.HasPrefix(err.Error(), "http web: connect example.org:80: ") {
				t.Errorf("error %q does not name outbound, destination and %q", err, tc.text)
			}
			st := d.Stats()
			if tc.refused && st.Refused != 1 || !tc.refused && st.DialFailures != 1 {
				t.Errorf("Stats() = %+v", st)
			}
		})
	}
}

func TestSilentProxy(t *testing.T) {
	f := startHTTP(t, fakeOptions{silent: true})
	d := newDialer(t, Config{Address: f.addr})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := d.DialTCP(ctx, outbound.Target{Addr: mustAddrPort(t, "192.0.2.1:80")})
	if err == nil || errors.Is(err, outbound.ErrRefused) {
		t.Fatalf("DialTCP = %v, want a timeout", err)
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("DialTCP took %v past a 200ms deadline", el)
	}
}

func TestUDPRefused(t *testing.T) {
	d := newDialer(t, Config{Address: "127.0.0.1:8888"})
	_, err := d.ListenUDP(context.Background(), outbound.Target{Addr: mustAddrPort(t, "192.0.2.1:53")})
	if !errors.Is(err, outbound.ErrRefused) || !strings.Contains(err.Error(), "http outbound carries TCP only") {
		t.Fatalf("ListenUDP = %v, want ErrRefused saying TCP only", err)
	}
}

func TestBadName(t *testing.T) {
	d := newDialer(t, Config{Address: "127.0.0.1:8888"})
	_, err := d.DialTCP(context.Background(), outbound.Target{Addr: mustAddrPort(t, "192.0.2.1:80"), Domain: "evil.org HTTP/1.1\r\nX-Injected: 1"})
	if err == nil || !strings.Contains(err.Error(), "control character") {
		t.Fatalf("DialTCP to a name with CRLF = %v, want an error", err)
	}
}
