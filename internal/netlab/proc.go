//go:build linux

package netlab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Proc is a long-running process started inside a namespace by NS.Start.
type Proc struct {
	// Cmd is the started command (`ip netns exec NAME prog args...`; ip
	// execs prog, so Cmd.Process.Pid is prog's pid). Use Proc's methods
	// rather than Cmd.Wait: Proc already waits for it.
	Cmd *exec.Cmd
	// LogPath is the file in t.TempDir() that receives the process's
	// stdout and stderr.
	LogPath string

	done    chan struct{} // closed when the process has been reaped
	waitErr error         // Cmd.Wait's result, set before done closes

	stopOnce sync.Once
	stopErr  error
}

// procSeq numbers log files.
var procSeq atomic.Uint32

// stopTimeout is how long cleanup gives a process to exit on SIGTERM.
const stopTimeout = 2 * time.Second

// Start starts a long-running command inside the namespace with `ip netns
// exec`, its stdout and stderr going to a file in t.TempDir(), and registers
// a cleanup that stops it (SIGTERM, SIGKILL after 2s) and, if t failed,
// logs the end of its output. The command runs in its own process group;
// stopping it signals that group, and when the command exits whatever is
// left of the group is killed, so children it forked do not outlive it.
func (n *NS) Start(t testing.TB, name string, args ...string) *Proc {
	t.Helper()
	logPath := filepath.Join(t.TempDir(), fmt.Sprintf("%s-%d.log", filepath.Base(name), procSeq.Add(1)))
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	defer f.Close()
	// Stopped by Stop, not by a context.
	cmd := n.command(context.Background(), name, args...)
	// An *os.File is handed to the child as is: no copying goroutine, and
	// Wait does not depend on children closing a pipe.
	cmd.Stdout = f
	cmd.Stderr = f
	if err := cmd.Start(); err != nil {
		t.Fatalf("netlab: netns %s: start %s %q: %v", n.Name, name, args, err)
	}
	p := &Proc{Cmd: cmd, LogPath: logPath, done: make(chan struct{})}
	go p.reap()
	t.Cleanup(func() {
		err := p.Stop(stopTimeout)
		if t.Failed() {
			t.Logf("netlab: %s (pid %d) exited: %v; log %s ends:\n%s", name, cmd.Process.Pid, err, logPath, tail(p.Log(), 4096))
		}
		var exitErr *exec.ExitError
		if err != nil && !errors.As(err, &exitErr) {
			t.Errorf("netlab: stop %s (pid %d): %v", name, cmd.Process.Pid, err)
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return "…\n" + s
}

// reap waits for the process to exit, kills what is left of its process
// group, then reaps it. The group is killed while the exited process is
// still a zombie holding its pid, so the group id cannot have been reused
// by anyone else.
func (p *Proc) reap() {
	pid := p.Cmd.Process.Pid
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			break
		}
	}
	_ = killGroup(pid, syscall.SIGKILL)
	p.waitErr = p.Cmd.Wait()
	close(p.done)
}

// Log returns what the process has written to its log so far.
func (p *Proc) Log() string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("<reading %s: %v>", p.LogPath, err)
	}
	return string(b)
}

// Signal sends sig to the process (not its group). It returns
// os.ErrProcessDone once the process has exited.
func (p *Proc) Signal(sig os.Signal) error {
	if p.Exited() {
		return os.ErrProcessDone
	}
	return p.Cmd.Process.Signal(sig)
}

// Exited reports whether the process has exited (and been reaped).
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits up to timeout for the process to exit without signalling it.
// It reports whether it exited and, if so, its exit error (nil on exit 0).
func (p *Proc) Wait(timeout time.Duration) (exited bool, err error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-p.done:
		return true, p.waitErr
	case <-timer.C:
		return false, nil
	}
}

// killWait bounds the wait for a process after SIGKILL.
const killWait = 5 * time.Second

// Stop sends SIGTERM to the process group, waits up to timeout for the
// process to exit, then sends SIGKILL to the group. (When the process
// exits, for whatever reason, what is left of its group is killed.) It
// returns the process's exit error: nil on exit 0, an *exec.ExitError
// otherwise ("signal: terminated" when SIGTERM ended it). Later calls return
// the same.
func (p *Proc) Stop(timeout time.Duration) error {
	p.stopOnce.Do(func() {
		p.stopErr = p.stop(timeout)
	})
	return p.stopErr
}

func (p *Proc) stop(timeout time.Duration) error {
	pid := p.Cmd.Process.Pid
	if !p.Exited() {
		// Signalling the group is safe while its leader is unreaped:
		// the group id cannot have been reused.
		_ = killGroup(pid, syscall.SIGTERM)
		if exited, _ := p.Wait(timeout); !exited {
			_ = killGroup(pid, syscall.SIGKILL)
			if exited, _ := p.Wait(killWait); !exited {
				return fmt.Errorf("pid %d still running %v after SIGKILL", pid, killWait)
			}
		}
	}
	return p.waitErr
}
