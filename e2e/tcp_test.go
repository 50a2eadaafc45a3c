//go:build linux

package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/netlab"
)

const bulkSize = 64 << 20

// stream is a deterministic pseudo-random byte stream: both ends can
// produce and hash the same 64 MiB without storing it.
func stream(seed uint64) io.Reader {
	return io.LimitReader(rand.NewChaCha8(seedBytes(seed)), bulkSize)
}

func seedBytes(seed uint64) [32]byte {
	var s [32]byte
	for i := range 8 {
		s[i] = byte(seed >> (8 * i))
	}
	return s
}

func hashOf(r io.Reader) ([32]byte, int64) {
	h := sha256.New()
	n, _ := io.Copy(h, r)
	return [32]byte(h.Sum(nil)), n
}

// bulkServer serves three kinds of connection on one listener, told apart
// by the first byte: 'U' (upload) reads to EOF and answers with the SHA-256
// of what it read; 'L' reads an 8-byte length and that many bytes, then
// answers with their SHA-256; 'D' (download) sends the 64 MiB stream and
// closes.
func bulkServer(t *testing.T, ns *netlab.NS, addr string, seed uint64) {
	ns.ServeTCP(t, addr, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		var kind [1]byte
		if _, err := io.ReadFull(c, kind[:]); err != nil {
			return
		}
		switch kind[0] {
		case 'U':
			sum, _ := hashOf(c)
			c.Write(sum[:])
		case 'L':
			// Length-prefixed upload, for paths that do not carry a
			// half-close (some proxies close both directions on the
			// client's FIN).
			var n [8]byte
			if _, err := io.ReadFull(c, n[:]); err != nil {
				return
			}
			sum, _ := hashOf(io.LimitReader(c, int64(binary.BigEndian.Uint64(n[:]))))
			c.Write(sum[:])
		case 'D':
			io.Copy(c, stream(seed))
		}
	})
}

func TestTCPBulk(t *testing.T) {
	lab := netlab.New(t)
	g := startGateway(t, lab, baseConfig())
	const seed = 0x7e57
	bulkServer(t, lab.Wan, remote4(1, 5001), seed)
	bulkServer(t, lab.Wan, remote6(1, 5001), seed)
	want, _ := hashOf(stream(seed))

	for _, tc := range []struct{ name, addr string }{
		{"ipv4", remote4(1, 5001)},
		{"ipv6", remote6(1, 5001)},
	} {
		t.Run(tc.name+"/upload", func(t *testing.T) {
			c := dialApp(t, lab, tc.addr)
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Minute))
			start := time.Now()
			if _, err := c.Write([]byte{'U'}); err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(c, stream(seed)); err != nil {
				t.Fatalf("upload: %v", err)
			}
			c.(*net.TCPConn).CloseWrite()
			var got [32]byte
			if _, err := io.ReadFull(c, got[:]); err != nil {
				t.Fatalf("reading the server's hash: %v", err)
			}
			if got != want {
				t.Fatalf("server hashed %x, sent %x", got, want)
			}
			t.Logf("64 MiB up in %v", time.Since(start).Round(time.Millisecond))
		})
		t.Run(tc.name+"/download", func(t *testing.T) {
			c := dialApp(t, lab, tc.addr)
			defer c.Close()
			c.SetDeadline(time.Now().Add(2 * time.Minute))
			start := time.Now()
			if _, err := c.Write([]byte{'D'}); err != nil {
				t.Fatal(err)
			}
			got, n := hashOf(c)
			if n != bulkSize || got != want {
				t.Fatalf("received %d bytes hashing %x, want %d bytes hashing %x", n, got, bulkSize, want)
			}
			t.Logf("64 MiB down in %v", time.Since(start).Round(time.Millisecond))
		})
	}
	if v := g.metric("tungate_tcp_bytes_down_total"); v < 2*bulkSize {
		t.Errorf("tungate_tcp_bytes_down_total = %v, want ≥ %d: traffic did not go through tungate", v, 2*bulkSize)
	}
}

func dialApp(t testing.TB, lab *netlab.Lab, addr string) net.Conn {
	t.Helper()
	c, err := lab.App.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	return c
}

func TestTCPHalfClose(t *testing.T) {
	lab := netlab.New(t)
	startGateway(t, lab, baseConfig())
	payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB

	t.Run("app FIN, server keeps sending", func(t *testing.T) {
		ln := listenWan(t, lab, remote4(1, 5002))
		served := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				served <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			got, err := io.ReadAll(c) // returns at the app's FIN
			if err != nil || string(got) != "request" {
				served <- fmt.Errorf("server read %q, %v; want \"request\" then EOF", got, err)
				return
			}
			if _, err := c.Write(payload); err != nil {
				served <- fmt.Errorf("server write after the app's FIN: %w", err)
				return
			}
			served <- nil
		}()
		c := dialApp(t, lab, remote4(1, 5002))
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		c.Write([]byte("request"))
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("app read after its FIN: %v", err)
		}
		if err := <-served; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, payload) {
			t.Fatalf("app got %d bytes after its FIN, want the server's %d", len(got), len(payload))
		}
	})

	t.Run("server FIN, app keeps sending", func(t *testing.T) {
		ln := listenWan(t, lab, remote4(1, 5003))
		received := make(chan []byte, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				received <- nil
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			c.Write([]byte("bye"))
			c.(*net.TCPConn).CloseWrite()
			got, _ := io.ReadAll(c)
			received <- got
		}()
		c := dialApp(t, lab, remote4(1, 5003))
		defer c.Close()
		c.SetDeadline(time.Now().Add(20 * time.Second))
		got, err := io.ReadAll(c) // EOF: the server's FIN arrived
		if err != nil || string(got) != "bye" {
			t.Fatalf("app read %q, %v; want \"bye\" then EOF", got, err)
		}
		if _, err := c.Write(payload); err != nil {
			t.Fatalf("app write after the server's FIN: %v", err)
		}
		c.(*net.TCPConn).CloseWrite()
		if srv := <-received; !bytes.Equal(srv, payload) {
			t.Fatalf("server got %d bytes after its FIN, want the app's %d", len(srv), len(payload))
		}
	})
}

func listenWan(t testing.TB, lab *netlab.Lab, addr string) net.Listener {
	t.Helper()
	ln, err := lab.Wan.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func TestTCPRefusedAndReset(t *testing.T) {
	lab := netlab.New(t)
	g := startGateway(t, lab, baseConfig())

	for _, addr := range []string{remote4(1, 5999), remote6(1, 5999)} {
		start := time.Now()
		c, err := lab.App.DialTimeout("tcp", addr, 5*time.Second)
		elapsed := time.Since(start)
		if err == nil {
			c.Close()
			t.Fatalf("dial %s (no listener): connected; want ECONNREFUSED", addr)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial %s (no listener): %v; want ECONNREFUSED", addr, err)
		}
		if elapsed > time.Second {
			t.Fatalf("dial %s: refused after %v, want under 1 s", addr, elapsed)
		}
	}
	if v := g.metric("tungate_tcp_refused_total"); v != 2 {
		t.Errorf("tungate_tcp_refused_total = %v, want 2", v)
	}

	t.Run("server RST reaches the app", func(t *testing.T) {
		ln := listenWan(t, lab, remote4(1, 5004))
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var b [1]byte
			c.Read(b[:])
			c.(*net.TCPConn).SetLinger(0)
			c.Close() // RST
		}()
		c := dialApp(t, lab, remote4(1, 5004))
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		c.Write([]byte("x"))
		_, err := c.Read(make([]byte, 10))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("app read after the server's RST: %v; want ECONNRESET", err)
		}
	})

	t.Run("app RST reaches the server", func(t *testing.T) {
		ln := listenWan(t, lab, remote4(1, 5005))
		result := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				result <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			_, err = io.ReadAll(c)
			result <- err
		}()
		c := dialApp(t, lab, remote4(1, 5005))
		c.Write([]byte("x"))
		time.Sleep(100 * time.Millisecond) // let the byte cross before the RST
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		if err := <-result; !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("server read after the app's RST: %v; want ECONNRESET", err)
		}
	})
}

func TestTCPConcurrentEcho(t *testing.T) {
	const conns = 1000
	lab := netlab.New(t)
	g := startGateway(t, lab, baseConfig())
	lab.Wan.TCPEcho(t, remote4(2, 7))

	// Warm up (the first flow starts pools and timers), then take the
	// baseline.
	echoOnce(t, lab, []byte("warm-up"))
	g.waitMetric("tungate_tcp_flows_active", 5*time.Second, "0", func(v float64) bool { return v == 0 })
	goroutines := g.metric("go_goroutines")

	open := make([]net.Conn, 0, conns)
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := range conns {
		c, err := lab.App.DialTimeout("tcp", remote4(2, 7), 10*time.Second)
		if err != nil {
			t.Fatalf("dial #%d: %v", i, err)
		}
		open = append(open, c)
	}
	if v := g.metric("tungate_tcp_flows_active"); v != conns {
		t.Errorf("tungate_tcp_flows_active = %v with %d connections open, want %d", v, conns, conns)
	}
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i, c := range open {
		wg.Go(func() {
			msg := make([]byte, 1024)
			rand.NewChaCha8(seedBytes(uint64(i))).Read(msg)
			c.SetDeadline(time.Now().Add(30 * time.Second))
			if _, err := c.Write(msg); err != nil {
				errs <- fmt.Errorf("conn %d write: %w", i, err)
				return
			}
			c.(*net.TCPConn).CloseWrite()
			got, err := io.ReadAll(c)
			if err != nil || !bytes.Equal(got, msg) {
				errs <- fmt.Errorf("conn %d: echoed %d bytes (%v), want the same 1024", i, len(got), err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, c := range open {
		c.Close()
	}
	open = nil
	g.waitMetric("tungate_tcp_flows_active", 10*time.Second, "0", func(v float64) bool { return v == 0 })
	g.waitMetric("go_goroutines", 10*time.Second, fmt.Sprintf("≤ %v (the baseline)", goroutines), func(v float64) bool { return v <= goroutines })
}

func echoOnce(t testing.TB, lab *netlab.Lab, msg []byte) {
	t.Helper()
	c := dialApp(t, lab, remote4(2, 7))
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write(msg)
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: got %q, %v; want %q", got, err, msg)
	}
}
