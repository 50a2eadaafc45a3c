package sysdns

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// resolvectlTimeout bounds each resolvectl call.
const resolvectlTimeout = 10 * time.Second

// hostDNSOps is what Set does to this host.
var hostDNSOps = dnsOps{
	fs:          hostFS,
	resolved:    resolvedOps{run: runResolvectl, linkExists: linkExists},
	useResolved: resolvedManages,
}

// Set points the system resolver at c.Server (see the top of sysdns.go
// for how): first it restores what a killed earlier run left changed (by
// c.Journal), then it journals the current resolver configuration and
// changes it. On error nothing of it is left changed. Close restores the
// original.
func Set(c Config, log *slog.Logger) (*SystemDNS, error) {
	return setSystemDNS(c, hostDNSOps, log)
}

// Restore restores the system resolver that a killed tungate changed, by
// its journal (JournalPath), and removes the journal. It returns how many
// changes it undid (0 without a journal). It fails with ErrJournalBusy
// while that tungate still runs.
func Restore(journal string, log *slog.Logger) (int, error) {
	return restoreSystemDNS(journal, hostDNSOps, log)
}

func runResolvectl(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), resolvectlTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "resolvectl", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("resolvectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func linkExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

// resolvedStubs are systemd-resolved's stub listener addresses.
var resolvedStubs = []string{"127.0.0.53", "127.0.0.54"}

// resolvedManages reports whether systemd-resolved runs and is the
// resolver that path configures, so that it should be told instead of the
// file being rewritten: resolvectl is installed, path is a link into
// /run/systemd/resolve/ or names only resolved's stub, resolved answers,
// and tungate runs in the host's network namespace (resolved, a host
// service, knows links by the host's interface indexes: from another
// namespace it would be told about the wrong link).
func resolvedManages(path, link string) bool {
	if _, err := exec.LookPath("resolvectl"); err != nil {
		return false
	}
	self, err1 := os.Stat("/proc/self/ns/net")
	host, err2 := os.Stat("/proc/1/ns/net")
	if err1 != nil || err2 != nil || !os.SameFile(self, host) {
		return false
	}
	if !PointsAtResolved(path) {
		return false
	}
	return runResolvectl("--no-pager", "status", link) == nil
}

// PointsAtResolved reports whether the resolv.conf at path is
// systemd-resolved's: a link into /run/systemd/resolve/, or a file whose
// nameservers are all resolved's stub addresses.
func PointsAtResolved(path string) bool {
	if target, err := os.Readlink(path); err == nil {
		if !filepath.IsAbs(target) {
			target = filepath.Join(filepath.Dir(path), target) // ../run/systemd/resolve/stub-resolv.conf
		}
		if strings.HasPrefix(filepath.Clean(target), "/run/systemd/resolve/") {
			return true
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	ns := Nameservers(data)
	for _, a := range ns {
		if !slices.Contains(resolvedStubs, a.String()) {
			return false
		}
	}
	return len(ns) > 0
}

// isMountPoint reports whether path (a file) is a mount point in this
// process's mount namespace: a bind mount, as containers (and tests) put
// on /etc/resolv.conf. Such a file cannot be replaced by a rename.
func isMountPoint(path string) bool {
	dir, err := filepath.EvalSymlinks(filepath.Dir(path))
	if err != nil {
		return false
	}
	path = filepath.Join(dir, filepath.Base(path))
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMountinfo(fields[4]) == path {
			return true
		}
	}
	return false
}

// unescapeMountinfo undoes the octal escapes (\040 for a space…) of a
// mountinfo path.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
