package sysdns

import (
	"bytes"
	"errors"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
)

// These tests work on files in t.TempDir() only: the resolver file is
// always Config.ResolvConf, never the host's.

var testServer = netip.MustParseAddr("172.19.0.2")

const origResolv = "# the host's own\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nsearch lan example.org\noptions ndots:2 edns0\n"

// fileOps is the file way on the real file system, with no
// systemd-resolved.
func fileOps() dnsOps {
	return dnsOps{
		fs:          resolvFS{isMountPoint: func(string) bool { return false }, rename: os.Rename},
		useResolved: func(string, string) bool { return false },
	}
}

func dnsConfig(t *testing.T) Config {
	dir := t.TempDir()
	return Config{
		Server:     testServer,
		Link:       "tg0",
		Journal:    filepath.Join(dir, "state", "route.journal.dns"),
		ResolvConf: filepath.Join(dir, "etc", "resolv.conf"),
	}
}

func writeFile(t *testing.T, path, content string, mode fs.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// wantPointed checks that path is a regular file naming only the server.
func wantPointed(t *testing.T, path string) string {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("%s while set: %v, %v; want a regular file", path, fi, err)
	}
	got := readFile(t, path)
	if ns := Nameservers([]byte(got)); !reflect.DeepEqual(ns, []netip.Addr{testServer}) {
		t.Fatalf("nameservers while set = %v, want [%s]; file:\n%s", ns, testServer, got)
	}
	return got
}

func wantNoFile(t *testing.T, path, what string) {
	t.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s: %s: %v, want it gone", what, path, err)
	}
}

func TestSystemDNSFileRestoredExactly(t *testing.T) {
	c := dnsConfig(t)
	writeFile(t, c.ResolvConf, origResolv, 0o640)
	// A run killed between creating its new file and renaming it left it.
	writeFile(t, filepath.Join(filepath.Dir(c.ResolvConf), ".resolv.conf.tungate-99999"), "nameserver 172.19.0.2\n", 0o644)
	s, err := setSystemDNS(c, fileOps(), nil)
	if err != nil {
		t.Fatalf("setSystemDNS: %v", err)
	}
	got := wantPointed(t, c.ResolvConf)
	for _, keep := range []string{"search lan example.org\n", "options ndots:2 edns0\n"} {
		if !strings.Contains(got, keep) {
			t.Errorf("the written file lost %q:\n%s", keep, got)
		}
	}
	if s.Way() != c.ResolvConf {
		t.Errorf("Way() = %q, want %q", s.Way(), c.ResolvConf)
	}
	if _, err := os.Stat(c.Journal); err != nil {
		t.Fatalf("journal while set: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if got := readFile(t, c.ResolvConf); got != origResolv {
		t.Errorf("after Close:\n%q\nwant the original\n%q", got, origResolv)
	}
	if fi, _ := os.Stat(c.ResolvConf); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode after Close = %v, want 0640", fi.Mode().Perm())
	}
	wantNoFile(t, c.Journal, "journal after Close")
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	left, _ := os.ReadDir(filepath.Dir(c.ResolvConf))
	if len(left) != 1 {
		t.Errorf("files beside resolv.conf after Close: %v, want only resolv.conf", left)
	}
}

func TestSystemDNSSymlink(t *testing.T) {
	c := dnsConfig(t)
	target := filepath.Join(filepath.Dir(c.Journal), "stub-resolv.conf")
	writeFile(t, target, origResolv, 0o644)
	if err := os.MkdirAll(filepath.Dir(c.ResolvConf), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, c.ResolvConf); err != nil {
		t.Fatal(err)
	}
	s, err := setSystemDNS(c, fileOps(), nil)
	if err != nil {
		t.Fatalf("setSystemDNS: %v", err)
	}
	if !strings.Contains(wantPointed(t, c.ResolvConf), "search lan example.org") {
		t.Errorf("the written file lost the link target's search line")
	}
	if got := readFile(t, target); got != origResolv {
		t.Errorf("the symlink's target was written: %q", got)
	}
	if !strings.Contains(s.Way(), "a symlink to "+target) {
		t.Errorf("Way() = %q, want it to name the symlink", s.Way())
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if got, err := os.Readlink(c.ResolvConf); err != nil || got != target {
		t.Errorf("after Close: readlink = %q, %v; want the symlink to %s back", got, err, target)
	}
	if got := readFile(t, target); got != origResolv {
		t.Errorf("the symlink's target after Close: %q", got)
	}
}

func TestSystemDNSAbsentFile(t *testing.T) {
	c := dnsConfig(t)
	if err := os.MkdirAll(filepath.Dir(c.ResolvConf), 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := setSystemDNS(c, fileOps(), nil)
	if err != nil {
		t.Fatalf("setSystemDNS: %v", err)
	}
	wantPointed(t, c.ResolvConf)
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wantNoFile(t, c.ResolvConf, "a resolv.conf that was absent, after Close")
}

// kill drops s as a killed tungate would: the journal's lock goes with the
// process, nothing is restored.
func kill(s *SystemDNS) { s.j.Close() }

func TestSystemDNSCrashRecovery(t *testing.T) {
	for _, next := range []string{"restart", "restore"} {
		t.Run(next, func(t *testing.T) {
			c := dnsConfig(t)
			writeFile(t, c.ResolvConf, origResolv, 0o644)
			s, err := setSystemDNS(c, fileOps(), nil)
			if err != nil {
				t.Fatalf("setSystemDNS: %v", err)
			}
			kill(s)
			wantPointed(t, c.ResolvConf)
			switch next {
			case "restart":
				s, err = setSystemDNS(c, fileOps(), nil)
				if err != nil {
					t.Fatalf("setSystemDNS after a kill: %v", err)
				}
				wantPointed(t, c.ResolvConf)
				if err := s.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
			case "restore":
				n, err := restoreSystemDNS(c.Journal, fileOps(), nil)
				if n != 1 || err != nil {
					t.Fatalf("restoreSystemDNS = %d, %v; want 1, nil", n, err)
				}
				if n, err := restoreSystemDNS(c.Journal, fileOps(), nil); n != 0 || err != nil {
					t.Fatalf("a second restoreSystemDNS = %d, %v; want 0, nil", n, err)
				}
			}
			if got := readFile(t, c.ResolvConf); got != origResolv {
				t.Errorf("after a kill and %s:\n%q\nwant the original", next, got)
			}
			wantNoFile(t, c.Journal, "journal")
		})
	}
}

func TestSystemDNSBusy(t *testing.T) {
	c := dnsConfig(t)
	writeFile(t, c.ResolvConf, origResolv, 0o644)
	s, err := setSystemDNS(c, fileOps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := setSystemDNS(c, fileOps(), nil); !errors.Is(err, ErrJournalBusy) {
		t.Errorf("a second setSystemDNS on a held journal: %v, want ErrJournalBusy", err)
	}
	if _, err := restoreSystemDNS(c.Journal, fileOps(), nil); !errors.Is(err, ErrJournalBusy) {
		t.Errorf("restoreSystemDNS on a held journal: %v, want ErrJournalBusy", err)
	}
	wantPointed(t, c.ResolvConf)
}

// A bind-mounted resolv.conf (containers, the e2e test) cannot be renamed
// over: it is rewritten in place, keeping its inode.
func TestSystemDNSMountPointInPlace(t *testing.T) {
	c := dnsConfig(t)
	writeFile(t, c.ResolvConf, origResolv, 0o644)
	ops := fileOps()
	ops.fs.isMountPoint = func(p string) bool { return p == c.ResolvConf }
	ops.fs.rename = func(from, to string) error {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: syscall.EBUSY}
	}
	ino := func() uint64 {
		fi, err := os.Stat(c.ResolvConf)
		if err != nil {
			t.Fatal(err)
		}
		return fi.Sys().(*syscall.Stat_t).Ino
	}
	before := ino()
	s, err := setSystemDNS(c, ops, nil)
	if err != nil {
		t.Fatalf("setSystemDNS: %v", err)
	}
	wantPointed(t, c.ResolvConf)
	if ino() != before {
		t.Error("the mount point was replaced, not rewritten in place")
	}
	kill(s)
	if n, err := restoreSystemDNS(c.Journal, ops, nil); n != 1 || err != nil {
		t.Fatalf("restoreSystemDNS = %d, %v", n, err)
	}
	if got := readFile(t, c.ResolvConf); got != origResolv || ino() != before {
		t.Errorf("after restore: %q (same inode: %v); want the original in place", got, ino() == before)
	}
}

// A rename that fails leaves the file as it was and no journal.
func TestSystemDNSApplyFails(t *testing.T) {
	c := dnsConfig(t)
	writeFile(t, c.ResolvConf, origResolv, 0o644)
	ops := fileOps()
	ops.fs.rename = func(from, to string) error {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: syscall.EROFS}
	}
	if _, err := setSystemDNS(c, ops, nil); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("setSystemDNS with a failing rename: %v, want EROFS", err)
	}
	if got := readFile(t, c.ResolvConf); got != origResolv {
		t.Errorf("after a failed set: %q", got)
	}
	wantNoFile(t, c.Journal, "journal after a failed set")
	left, _ := os.ReadDir(filepath.Dir(c.ResolvConf))
	if len(left) != 1 {
		t.Errorf("files beside resolv.conf: %v, want only resolv.conf", left)
	}
}

// A resolv.conf someone else rewrote while tungate ran is theirs: it is
// left alone, on Close and after a kill.
func TestSystemDNSRewrittenBySomeoneElse(t *testing.T) {
	const theirs = "nameserver 192.0.2.1\n"
	for _, how := range []string{"close", "kill"} {
		t.Run(how, func(t *testing.T) {
			c := dnsConfig(t)
			writeFile(t, c.ResolvConf, origResolv, 0o644)
			s, err := setSystemDNS(c, fileOps(), nil)
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, c.ResolvConf, theirs, 0o644)
			if how == "close" {
				if err := s.Close(); err != nil {
					t.Fatalf("Close: %v", err)
				}
			} else {
				kill(s)
				if _, err := restoreSystemDNS(c.Journal, fileOps(), nil); err != nil {
					t.Fatalf("restoreSystemDNS: %v", err)
				}
			}
			if got := readFile(t, c.ResolvConf); got != theirs {
				t.Errorf("someone else's resolv.conf became %q", got)
			}
			wantNoFile(t, c.Journal, "journal")
		})
	}
}

// A kill in the middle of an in-place write leaves a prefix of tungate's
// content (down to an empty file): still tungate's, restored.
func TestSystemDNSTornWrite(t *testing.T) {
	c := dnsConfig(t)
	writeFile(t, c.ResolvConf, origResolv, 0o644)
	s, err := setSystemDNS(c, fileOps(), nil)
	if err != nil {
		t.Fatal(err)
	}
	kill(s)
	written := readFile(t, c.ResolvConf)
	writeFile(t, c.ResolvConf, written[:len(written)/2], 0o644)
	// The journal's own last line torn too: an extra half record.
	f, err := os.OpenFile(c.Journal, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"op":"add","seq":9,"resolv":{"kind":"fi`)
	f.Close()
	if n, err := restoreSystemDNS(c.Journal, fileOps(), nil); n != 1 || err != nil {
		t.Fatalf("restoreSystemDNS = %d, %v", n, err)
	}
	if got := readFile(t, c.ResolvConf); got != origResolv {
		t.Errorf("after a torn write and restore: %q", got)
	}
}

// fakeResolved records resolvectl calls.
type fakeResolved struct {
	calls []string
	links map[string]bool
	fail  string // a call that fails
}

func (f *fakeResolved) ops() dnsOps {
	return dnsOps{
		fs: resolvFS{isMountPoint: func(string) bool { return false }, rename: func(string, string) error {
			return errors.New("the file must not be touched with systemd-resolved")
		}},
		resolved: resolvedOps{
			run: func(args ...string) error {
				call := strings.Join(args, " ")
				f.calls = append(f.calls, call)
				if call == f.fail {
					return errors.New("resolvectl failed")
				}
				return nil
			},
			linkExists: func(name string) bool { return f.links[name] },
		},
		useResolved: func(string, string) bool { return true },
	}
}

func TestSystemDNSResolved(t *testing.T) {
	c := dnsConfig(t)
	f := &fakeResolved{links: map[string]bool{"tg0": true}}
	s, err := setSystemDNS(c, f.ops(), nil)
	if err != nil {
		t.Fatalf("setSystemDNS: %v", err)
	}
	if s.Way() != "systemd-resolved (link tg0)" {
		t.Errorf("Way() = %q", s.Way())
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	want := []string{"dns tg0 172.19.0.2", "domain tg0 ~.", "revert tg0"}
	if !reflect.DeepEqual(f.calls, want) {
		t.Errorf("resolvectl calls %q, want %q", f.calls, want)
	}
	wantNoFile(t, c.ResolvConf, "resolv.conf with systemd-resolved")
	wantNoFile(t, c.Journal, "journal after Close")

	// After a kill: reverted at the next start if the link is still
	// there; nothing to do if it went (resolved forgets it).
	for _, exists := range []bool{true, false} {
		f := &fakeResolved{links: map[string]bool{"tg0": true}}
		s, err := setSystemDNS(c, f.ops(), nil)
		if err != nil {
			t.Fatal(err)
		}
		kill(s)
		f.links["tg0"] = exists
		f.calls = nil
		if _, err := restoreSystemDNS(c.Journal, f.ops(), nil); err != nil {
			t.Fatalf("restoreSystemDNS: %v", err)
		}
		if want := exists; (len(f.calls) == 1 && f.calls[0] == "revert tg0") != want {
			t.Errorf("link exists %v: calls after a kill %q", exists, f.calls)
		}
	}

	// A failure half way is undone at once.
	f = &fakeResolved{links: map[string]bool{"tg0": true}, fail: "domain tg0 ~."}
	if _, err := setSystemDNS(c, f.ops(), nil); err == nil {
		t.Fatal("setSystemDNS with a failing resolvectl: no error")
	}
	if want := []string{"dns tg0 172.19.0.2", "domain tg0 ~.", "revert tg0"}; !reflect.DeepEqual(f.calls, want) {
		t.Errorf("calls %q, want %q", f.calls, want)
	}
	wantNoFile(t, c.Journal, "journal after a failed set")
}

func TestSystemDNSConfigErrors(t *testing.T) {
	c := dnsConfig(t)
	c.Server = netip.Addr{}
	if _, err := setSystemDNS(c, fileOps(), nil); err == nil || !strings.Contains(err.Error(), "dns.listen") {
		t.Errorf("no server: %v, want an error naming dns.listen", err)
	}
	c = dnsConfig(t)
	c.Journal = ""
	if _, err := setSystemDNS(c, fileOps(), nil); err == nil || !strings.Contains(err.Error(), "route.journal") {
		t.Errorf("no journal: %v, want an error naming route.journal", err)
	}
	c = dnsConfig(t)
	if err := os.MkdirAll(c.ResolvConf, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := setSystemDNS(c, fileOps(), nil); err == nil {
		t.Error("resolv.conf a directory: no error")
	}
	wantNoFile(t, c.Journal, "journal after a refused set")
}

func TestParseDNSJournal(t *testing.T) {
	data := []byte(`{"op":"begin","pid":1}
{"op":"add","seq":1,"resolv":{"kind":"file","path":"/x","existed":true,"original":"YQ=="}}
not json
{"op":"add","seq":2,"resolv":{"kind":"resolved","link":"tg0"}}
{"op":"abort","seq":2}
{"op":"add","seq":3}
{"op":"add","seq":4,"resolv":{"kind":"file","path":"/torn"`)
	changes, problems := parseDNSJournal(data)
	if len(changes) != 1 || changes[0].Path != "/x" || !bytes.Equal(changes[0].Original, []byte("a")) {
		t.Errorf("changes = %+v, want only the first file change", changes)
	}
	if len(problems) != 2 {
		t.Errorf("problems = %q, want the bad line and the add without a change", problems)
	}
}

func TestNameservers(t *testing.T) {
	got := Nameservers([]byte(origResolv + "nameserver bogus\n#nameserver 1.1.1.1\n"))
	want := []netip.Addr{netip.MustParseAddr("10.0.0.53"), netip.MustParseAddr("fe80::1")}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Nameservers = %v, want %v", got, want)
	}
}
