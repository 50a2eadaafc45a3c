//go:build linux

package netlab

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// pollInterval is the pause between two checks of a Wait helper.
const pollInterval = 20 * time.Millisecond

// WaitListen polls until something listens on addr inside the namespace,
// failing t if nothing does within timeout. For network "tcp" ("tcp4",
// "tcp6") that means a TCP connect to addr succeeds (an unspecified or
// empty host is dialled on loopback); the probe connection is closed at
// once. For "udp" ("udp4", "udp6") it means a UDP socket is bound to addr's
// port on addr's host or on the wildcard address, as the namespace's
// /proc/net/udp and /proc/net/udp6 show; an empty or unspecified host
// accepts a socket bound to any address. Call it from the test goroutine.
func (n *NS) WaitListen(t testing.TB, network, addr string, timeout time.Duration) {
	t.Helper()
	var check func() error
	switch network {
	case "tcp", "tcp4", "tcp6":
		target, err := tcpProbeTarget(addr)
		if err != nil {
			t.Fatalf("netlab: WaitListen(%q, %q): %v", network, addr, err)
		}
		check = func() error {
			c, err := n.DialTimeout(network, target, 250*time.Millisecond)
			if err != nil {
				return err
			}
			return c.Close()
		}
	case "udp", "udp4", "udp6":
		want, err := parseUDPWant(addr)
		if err != nil {
			t.Fatalf("netlab: WaitListen(%q, %q): %v", network, addr, err)
		}
		check = func() error { return n.udpBound(want) }
	default:
		t.Fatalf("netlab: WaitListen: unsupported network %q", network)
	}
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("netlab: netns %s: nothing listens on %s %s after %v: %v", n.Name, network, addr, timeout, err)
		}
		time.Sleep(pollInterval)
	}
}

// tcpProbeTarget returns addr with an empty or unspecified host replaced by
// loopback.
func tcpProbeTarget(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return net.JoinHostPort(host, port), nil
}

// udpWant is what WaitListen looks for in /proc/net/udp{,6}.
type udpWant struct {
	addr netip.Addr // invalid or unspecified: any address
	port uint16
}

func parseUDPWant(addr string) (udpWant, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return udpWant{}, err
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return udpWant{}, fmt.Errorf("bad port %q", portStr)
	}
	w := udpWant{port: uint16(port)}
	if host != "" {
		a, err := netip.ParseAddr(host)
		if err != nil {
			return udpWant{}, err
		}
		w.addr = a.Unmap()
	}
	return w, nil
}

// matches reports whether a socket bound to local serves w.
func (w udpWant) matches(local netip.AddrPort) bool {
	if local.Port() != w.port {
		return false
	}
	a := local.Addr().Unmap()
	if !w.addr.IsValid() || w.addr.IsUnspecified() || a == w.addr {
		return true
	}
	if !a.IsUnspecified() {
		return false
	}
	// A wildcard socket: 0.0.0.0 serves IPv4, :: serves both (unless
	// IPV6_V6ONLY, which /proc does not show).
	return w.addr.Is4() || local.Addr().Is6()
}

// udpBound reports (nil) whether a UDP socket in the namespace matches w.
func (n *NS) udpBound(w udpWant) error {
	var found bool
	err := n.Do(func() error {
		// /proc/net is /proc/self/net, the namespace of the process's
		// main thread; thread-self is the namespace this thread is in.
		for _, f := range []string{"/proc/thread-self/net/udp", "/proc/thread-self/net/udp6"} {
			locals, err := readProcNetLocals(f)
			if err != nil {
				return err
			}
			for _, l := range locals {
				if w.matches(l) {
					found = true
					return nil
				}
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !found {
		return errors.New("no UDP socket bound")
	}
	return nil
}

// readProcNetLocals returns the local addresses of the sockets listed in a
// /proc/net/{tcp,udp}{,6} file.
func readProcNetLocals(path string) ([]netip.AddrPort, error) {
	f, err := os.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil // no IPv6
		}
		return nil, err
	}
	defer f.Close()
	var locals []netip.AddrPort
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		ap, err := parseProcNetAddr(fields[1])
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		locals = append(locals, ap)
	}
	return locals, sc.Err()
}

// parseProcNetAddr parses "0100007F:0035": the address as 32-bit words in
// host byte order, in hex, and the port in hex.
func parseProcNetAddr(s string) (netip.AddrPort, error) {
	hexAddr, hexPort, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("bad socket address %q", s)
	}
	port, err := strconv.ParseUint(hexPort, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("bad socket address %q", s)
	}
	raw, err := hex.DecodeString(hexAddr)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("bad socket address %q", s)
	}
	b := make([]byte, len(raw))
	for i := 0; i < len(raw); i += 4 {
		binary.NativeEndian.PutUint32(b[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	a, _ := netip.AddrFromSlice(b)
	return netip.AddrPortFrom(a, uint16(port)), nil
}

// WaitLink polls until the link called name exists inside the namespace
// and, if up, is administratively up, failing t after timeout. Call it from
// the test goroutine.
func (n *NS) WaitLink(t testing.TB, name string, up bool, timeout time.Duration) {
	t.Helper()
	h, err := n.handle()
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		link, err := h.LinkByName(name)
		var notFound netlink.LinkNotFoundError
		switch {
		case err == nil && (!up || link.Attrs().Flags&net.FlagUp != 0):
			return
		case err == nil:
			err = fmt.Errorf("link %s is down", name)
		case errors.As(err, &notFound):
		default:
			t.Fatalf("netlab: netns %s: link %s: %v", n.Name, name, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("netlab: netns %s: waiting %v for link %s (up=%v): %v", n.Name, timeout, name, up, err)
		}
		time.Sleep(pollInterval)
	}
}

// WaitLinkGone polls until the named link no longer exists inside n.
func (n *NS) WaitLinkGone(t testing.TB, name string, timeout time.Duration) {
	t.Helper()
	h, err := n.handle()
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	deadline := time.Now().Add(timeout)
	for {
		_, err := h.LinkByName(name)
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return
		}
		if err != nil {
			t.Fatalf("netlab: netns %s: link %s: %v", n.Name, name, err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("netlab: netns %s: link %s still there after %v", n.Name, name, timeout)
		}
		time.Sleep(pollInterval)
	}
}
