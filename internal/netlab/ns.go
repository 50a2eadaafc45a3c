//go:build linux

package netlab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// NS is one network namespace of a lab.
type NS struct {
	// Name is the namespace's name, as `ip netns` shows it and
	// /run/netns/<Name> holds it.
	Name string

	ipPath string

	mu sync.Mutex
	nl *netlink.Handle // the lab's own handle, closed by remove
}

// Do runs fn on an OS thread switched into the namespace and waits for it.
// The thread is switched back to its original namespace afterwards; if that
// fails, the thread stays locked and is thrown away with the goroutine fn
// ran on. Sockets created inside fn belong to the namespace for their whole
// life, wherever they are used later. Goroutines started by fn do not run
// in the namespace. A panic in fn is re-raised in the caller.
func (n *NS) Do(fn func() error) error {
	type result struct {
		err   error
		panic any
	}
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("netns %s: get current namespace: %w", n.Name, err)}
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(n.Name)
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{err: fmt.Errorf("netns %s: %w", n.Name, err)}
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			// setns failing leaves the thread where it was, but don't
			// bet on it: keep it locked so it dies with this goroutine.
			done <- result{err: fmt.Errorf("netns %s: enter: %w", n.Name, err)}
			return
		}
		var r result
		func() {
			defer func() { r.panic = recover() }()
			r.err = fn()
		}()
		if err := netns.Set(orig); err != nil {
			// The thread is in the wrong namespace: leave it locked so
			// the runtime ends it with this goroutine.
			if r.err == nil && r.panic == nil {
				r.err = fmt.Errorf("netns %s: restore original namespace: %w", n.Name, err)
			}
			done <- r
			return
		}
		runtime.UnlockOSThread()
		done <- r
	}()
	r := <-done
	if r.panic != nil {
		panic(r.panic)
	}
	return r.err
}

// Listen is net.Listen inside the namespace.
func (n *NS) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() (err error) {
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// ListenPacket is net.ListenPacket inside the namespace.
func (n *NS) ListenPacket(network, addr string) (net.PacketConn, error) {
	var c net.PacketConn
	err := n.Do(func() (err error) {
		c, err = net.ListenPacket(network, addr)
		return err
	})
	return c, err
}

// Dial is net.Dial inside the namespace.
func (n *NS) Dial(network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		c, err = net.Dial(network, addr)
		return err
	})
	return c, err
}

// DialTimeout is net.DialTimeout inside the namespace.
func (n *NS) DialTimeout(network, addr string, d time.Duration) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		c, err = net.DialTimeout(network, addr, d)
		return err
	})
	return c, err
}

// command returns `ip netns exec <Name> name args...` in its own process
// group. When ctx ends the whole group is killed, and output pipes held
// open by stray grandchildren do not hang Wait for more than 2s.
func (n *NS) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, n.ipPath, append([]string{"netns", "exec", n.Name, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return killGroup(cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 2 * time.Second
	return cmd
}

// killGroup signals the process group led by pid.
func killGroup(pid int, sig syscall.Signal) error {
	if pid <= 0 {
		return errors.New("netlab: no pid")
	}
	return syscall.Kill(-pid, sig)
}

// Run runs a command to completion inside the namespace (`ip netns exec`)
// and returns its combined output. The error includes the output.
func (n *NS) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	out, err := n.command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("netns %s: %s %q: %w; output:\n%s", n.Name, name, args, err, out)
	}
	return out, nil
}

// runTimeout bounds MustRun.
const runTimeout = time.Minute

// MustRun is Run bounded by a minute, failing t on error. It returns the
// output. (It does not use t.Context(), which is already cancelled when
// cleanups run, so it works in a cleanup too.)
func (n *NS) MustRun(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), runTimeout)
	defer cancel()
	out, err := n.Run(ctx, name, args...)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// Netlink returns a netlink handle bound to the namespace, for the test to
// add routes, rules and links with. It is closed in t.Cleanup.
func (n *NS) Netlink(t testing.TB) *netlink.Handle {
	t.Helper()
	h, err := n.newHandle()
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	t.Cleanup(h.Close)
	return h
}

func (n *NS) newHandle() (*netlink.Handle, error) {
	ns, err := netns.GetFromName(n.Name)
	if err != nil {
		return nil, fmt.Errorf("netns %s: %w", n.Name, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netns %s: netlink handle: %w", n.Name, err)
	}
	// A reply that never comes fails the call instead of hanging the test.
	if err := h.SetSocketTimeout(setupTimeout); err != nil {
		h.Close()
		return nil, fmt.Errorf("netns %s: netlink handle: %w", n.Name, err)
	}
	return h, nil
}

// handle returns the lab's own netlink handle for n, opening it once.
func (n *NS) handle() (*netlink.Handle, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nl == nil {
		h, err := n.newHandle()
		if err != nil {
			return nil, err
		}
		n.nl = h
	}
	return n.nl, nil
}

func (n *NS) closeHandles() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.nl != nil {
		n.nl.Close()
		n.nl = nil
	}
}
