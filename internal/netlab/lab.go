//go:build linux

package netlab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Well-known lab addresses. The veth link between app and wan is
// 10.233.0.0/24 and fd00:233::/64.
var (
	AppAddr4 = netip.MustParseAddr("10.233.0.1")
	WanAddr4 = netip.MustParseAddr("10.233.0.2")
	AppAddr6 = netip.MustParseAddr("fd00:233::1")
	WanAddr6 = netip.MustParseAddr("fd00:233::2")
)

// NumRemotes is the number of "remote" hosts on wan's lo: Remote4(1) to
// Remote4(NumRemotes) and the same for Remote6.
const NumRemotes = 9

// VethName is the name of the veth end in both namespaces.
const VethName = "veth0"

// Remote4 returns 10.233.1.i, the IPv4 address of remote host i (1 ≤ i ≤ 9),
// which is assigned to wan's lo and routed to from app.
func Remote4(i int) netip.Addr {
	checkRemote(i)
	return netip.AddrFrom4([4]byte{10, 233, 1, byte(i)})
}

// Remote6 returns fd00:233:1::i, the IPv6 address of remote host i
// (1 ≤ i ≤ 9), which is assigned to wan's lo and routed to from app.
func Remote6(i int) netip.Addr {
	checkRemote(i)
	return netip.AddrFrom16([16]byte{0xfd, 0, 0x02, 0x33, 0, 1, 15: byte(i)})
}

func checkRemote(i int) {
	if i < 1 || i > NumRemotes {
		panic(fmt.Sprintf("netlab: remote host %d out of range 1..%d", i, NumRemotes))
	}
}

// remote4Net and remote6Net hold the remote hosts; app routes them to wan.
var (
	remote4Net = netip.MustParsePrefix("10.233.1.0/24")
	remote6Net = netip.MustParsePrefix("fd00:233:1::/64")
)

// Lab is two namespaces joined by a veth pair, built for one test and torn
// down in t.Cleanup.
//
//	app: lo up; veth0 10.233.0.1/24 fd00:233::1/64;
//	     10.233.1.0/24 via 10.233.0.2, fd00:233:1::/64 via fd00:233::2
//	wan: lo up with 10.233.1.1-9/32 and fd00:233:1::1-9/128;
//	     veth0 10.233.0.2/24 fd00:233::2/64
//
// app has no default route: the test adds what it needs. All IPv6
// addresses are assigned with nodad and usable as soon as New returns.
type Lab struct {
	App, Wan *NS
}

// labSeq numbers the labs of this process; with the pid it makes namespace
// names unique to the run.
var labSeq atomic.Uint32

// setupTimeout bounds each step of building or removing a lab.
const setupTimeout = 10 * time.Second

// New builds a lab for t and registers its removal with t.Cleanup. It
// skips t (fails it with TUNGATE_E2E=1) when the machine cannot host a lab:
// not root, no `ip`, no /dev/net/tun, or network namespaces unsupported.
func New(t testing.TB) *Lab {
	t.Helper()
	RequireE2E(t, "netlab", os.Geteuid() == 0, "needs root")
	ipPath, err := lookPath("ip")
	RequireE2E(t, "netlab", err == nil, fmt.Sprintf("needs the ip command: %v", err))
	_, err = os.Stat("/dev/net/tun")
	RequireE2E(t, "netlab", err == nil, fmt.Sprintf("needs /dev/net/tun: %v", err))
	_, err = os.Stat("/proc/self/ns/net")
	RequireE2E(t, "netlab", err == nil, fmt.Sprintf("needs network namespaces: %v", err))

	lab := &Lab{}
	// Registered before anything exists, so whatever part of the lab got
	// built is removed however New or the test ends.
	t.Cleanup(func() {
		for _, n := range []*NS{lab.Wan, lab.App} {
			if n == nil {
				continue
			}
			if err := n.remove(); err != nil {
				t.Errorf("netlab: %v", err)
			}
		}
	})

	app, err := addNS(ipPath, "app")
	RequireE2E(t, "netlab", err == nil, fmt.Sprintf("cannot create a network namespace: %v", err))
	lab.App = app
	wan, err := addNS(ipPath, "wan")
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	lab.Wan = wan

	if err := lab.build(); err != nil {
		t.Fatalf("netlab: build lab %s/%s: %v", app.Name, wan.Name, err)
	}
	if err := lab.probe(setupTimeout); err != nil {
		t.Fatalf("netlab: lab %s/%s not usable: %v", app.Name, wan.Name, err)
	}
	return lab
}

// addNS creates a namespace named tgl<pid>-<seq>-<role> with `ip netns
// add`. A name left behind by a dead process that had our pid is skipped,
// never removed.
func addNS(ipPath, role string) (*NS, error) {
	var lastErr error
	for range 20 {
		name := fmt.Sprintf("tgl%d-%d-%s", os.Getpid(), labSeq.Add(1), role)
		if _, err := os.Stat("/run/netns/" + name); err == nil {
			lastErr = fmt.Errorf("namespace %s exists", name)
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
		out, err := exec.CommandContext(ctx, ipPath, "netns", "add", name).CombinedOutput()
		cancel()
		if err != nil {
			lastErr = fmt.Errorf("ip netns add %s: %v: %s", name, err, strings.TrimSpace(string(out)))
			if strings.Contains(string(out), "File exists") {
				continue
			}
			return nil, lastErr
		}
		return &NS{Name: name, ipPath: ipPath}, nil
	}
	return nil, lastErr
}

// remove deletes the namespace. Links in it go with it; sockets the test
// still holds keep the (then nameless) namespace alive until they close.
func (n *NS) remove() error {
	n.closeHandles()
	ctx, cancel := context.WithTimeout(context.Background(), setupTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, n.ipPath, "netns", "del", n.Name).CombinedOutput()
	if err != nil {
		if _, serr := os.Stat("/run/netns/" + n.Name); errors.Is(serr, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("ip netns del %s: %v: %s", n.Name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// build creates the veth pair and assigns the lab's addresses and routes.
func (l *Lab) build() error {
	app, err := l.App.handle()
	if err != nil {
		return err
	}
	wan, err := l.Wan.handle()
	if err != nil {
		return err
	}
	wanNS, err := netns.GetFromName(l.Wan.Name)
	if err != nil {
		return fmt.Errorf("open namespace %s: %w", l.Wan.Name, err)
	}
	defer wanNS.Close()

	// The pair is created by a netlink socket inside app with its peer
	// placed straight into wan: no end ever exists in our own namespace.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: VethName},
		PeerName:      VethName,
		PeerNamespace: netlink.NsFd(int(wanNS)),
	}
	if err := app.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth pair: %w", err)
	}

	appVeth, err := setupLink(app, VethName, AppAddr4, 24, AppAddr6, 64)
	if err != nil {
		return fmt.Errorf("%s: %w", l.App.Name, err)
	}
	if _, err := setupLink(app, "lo", netip.Addr{}, 0, netip.Addr{}, 0); err != nil {
		return fmt.Errorf("%s: %w", l.App.Name, err)
	}
	for _, r := range []struct {
		dst netip.Prefix
		gw  netip.Addr
	}{{remote4Net, WanAddr4}, {remote6Net, WanAddr6}} {
		route := &netlink.Route{
			LinkIndex: appVeth.Attrs().Index,
			Dst:       prefixIPNet(r.dst),
			Gw:        r.gw.AsSlice(),
		}
		if err := app.RouteAdd(route); err != nil {
			return fmt.Errorf("%s: route %s via %s: %w", l.App.Name, r.dst, r.gw, err)
		}
	}

	if _, err := setupLink(wan, VethName, WanAddr4, 24, WanAddr6, 64); err != nil {
		return fmt.Errorf("%s: %w", l.Wan.Name, err)
	}
	lo, err := setupLink(wan, "lo", netip.Addr{}, 0, netip.Addr{}, 0)
	if err != nil {
		return fmt.Errorf("%s: %w", l.Wan.Name, err)
	}
	for i := 1; i <= NumRemotes; i++ {
		for _, p := range []netip.Prefix{
			netip.PrefixFrom(Remote4(i), 32),
			netip.PrefixFrom(Remote6(i), 128),
		} {
			if err := addAddr(wan, lo, p); err != nil {
				return fmt.Errorf("%s: %w", l.Wan.Name, err)
			}
		}
	}
	return nil
}

// setupLink assigns the given addresses (skipping invalid ones) to the
// named link and brings it up.
func setupLink(h *netlink.Handle, name string, a4 netip.Addr, bits4 int, a6 netip.Addr, bits6 int) (netlink.Link, error) {
	link, err := h.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("link %s: %w", name, err)
	}
	if a4.IsValid() {
		if err := addAddr(h, link, netip.PrefixFrom(a4, bits4)); err != nil {
			return nil, err
		}
	}
	if a6.IsValid() {
		if err := addAddr(h, link, netip.PrefixFrom(a6, bits6)); err != nil {
			return nil, err
		}
	}
	if err := h.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("set %s up: %w", name, err)
	}
	return link, nil
}

// addAddr assigns p to link; IPv6 addresses skip duplicate address
// detection so that they are usable at once.
func addAddr(h *netlink.Handle, link netlink.Link, p netip.Prefix) error {
	addr := &netlink.Addr{IPNet: prefixIPNet(p)}
	if p.Addr().Is6() {
		addr.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(link, addr); err != nil {
		return fmt.Errorf("add %s to %s: %w", p, link.Attrs().Name, err)
	}
	return nil
}

func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{
		IP:   p.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}
}

// probe waits until both veth ends are operationally up and a TCP connect
// from app reaches a remote host in wan over IPv4 and IPv6. Packets sent
// before the kernel's link watcher activates a veth are dropped, so
// without this the first packets of a test could be lost.
func (l *Lab) probe(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, n := range []*NS{l.App, l.Wan} {
		h, err := n.handle()
		if err != nil {
			return err
		}
		for {
			link, err := h.LinkByName(VethName)
			if err != nil {
				return fmt.Errorf("%s: link %s: %w", n.Name, VethName, err)
			}
			if link.Attrs().OperState == netlink.OperUp {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s: %s is %s after %v", n.Name, VethName, link.Attrs().OperState, timeout)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	for _, remote := range []netip.Addr{Remote4(1), Remote6(1)} {
		ln, err := l.Wan.Listen("tcp", netip.AddrPortFrom(remote, 0).String())
		if err != nil {
			return err
		}
		err = func() error {
			defer ln.Close()
			for {
				c, err := l.App.DialTimeout("tcp", ln.Addr().String(), 500*time.Millisecond)
				if err == nil {
					return c.Close()
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("connect from %s to %s: %w", l.App.Name, ln.Addr(), err)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}()
		if err != nil {
			return err
		}
	}
	return nil
}

// RequireE2E skips t, or fails it when TUNGATE_E2E=1, unless ok. what names
// the thing that needs the capability and reason says what is missing.
func RequireE2E(t testing.TB, what string, ok bool, reason string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("TUNGATE_E2E") == "1" {
		t.Fatalf("%s: %s (TUNGATE_E2E=1, so this is a failure)", what, reason)
	}
	t.Skipf("%s: %s (set TUNGATE_E2E=1 to fail instead)", what, reason)
}

// RequireBinary returns the path of the program name, looked up in PATH and
// then in /usr/sbin and /sbin (where Debian puts daemons), or skips t (fails
// it with TUNGATE_E2E=1) when there is none.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	path, err := lookPath(name)
	RequireE2E(t, name, err == nil, fmt.Sprintf("program not installed: %v", err))
	return path
}

func lookPath(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err == nil {
		return path, nil
	}
	if !strings.Contains(name, "/") {
		for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
			if p, err := exec.LookPath(dir + "/" + name); err == nil {
				return p, nil
			}
		}
	}
	return "", err
}
