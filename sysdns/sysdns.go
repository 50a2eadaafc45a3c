package sysdns

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/tungate/tungate/internal/wal"
)

// System DNS (route.set_system_dns): while tungate runs, the system
// resolver points at its DNS proxy (dns.listen); on exit the original is
// restored exactly, and what a killed tungate changed is restored at the
// next start.
//
// Two ways, chosen at start:
//
//   - systemd-resolved, when it runs and manages /etc/resolv.conf (a link
//     to its stub, or its stub address 127.0.0.53): `resolvectl dns TUN
//     dns.listen` and `resolvectl domain TUN ~.` make the TUN's link the
//     resolver for every name; `resolvectl revert TUN` undoes it.
//   - otherwise the file: /etc/resolv.conf is replaced by one naming
//     dns.listen (keeping the original's search and options lines). The
//     original's exact bytes, mode and owner (or, for a symlink, its
//     target; or that there was no file) are journaled before the change,
//     and restored from there. A symlink is replaced by a file and put
//     back as the same symlink on undo; its target is never written. A
//     file that is a mount point (a bind mount, as in containers) cannot
//     be replaced by a rename and is rewritten in place. On undo, a file
//     that someone else rewrote since (it is no longer tungate's) is left
//     alone, with a warning.
//
// The journal is a file of its own beside route.journal (JournalPath),
// in the same JSON-lines form (begin, add with a "resolv" entry, abort),
// written and fsync'd before each change and locked while tungate runs:
// the resolver change outlives neither the routes' journal reset at start
// nor a run without route.auto.

// DefaultResolvConf is the system resolver's configuration file.
const DefaultResolvConf = "/etc/resolv.conf"

// ErrUnsupported is returned by Set on an OS where it is not built yet.
var ErrUnsupported = errors.New("route.set_system_dns is not supported on this OS yet")

// ErrJournalBusy is returned by Set and Restore when another live tungate
// holds the journal (it is sysroute.ErrJournalBusy).
var ErrJournalBusy = wal.ErrBusy

// JournalPath returns the journal of the system resolver change for a
// tungate whose route journal is routeJournal.
func JournalPath(routeJournal string) string {
	if routeJournal == "" {
		return ""
	}
	return routeJournal + ".dns"
}

// Config says where to point the system resolver.
type Config struct {
	// Server is the resolver address handed to the system (dns.listen).
	Server netip.Addr
	// Link is the TUN: systemd-resolved gets Server as this link's DNS
	// server.
	Link string
	// Journal is the write-ahead record of the change (JournalPath).
	Journal string
	// ResolvConf is the file to rewrite without systemd-resolved; ""
	// means DefaultResolvConf.
	ResolvConf string
}

func (c *Config) path() string {
	if c.ResolvConf == "" {
		return DefaultResolvConf
	}
	return c.ResolvConf
}

// Resolver change kinds.
const (
	resolvFile     = "file"
	resolvResolved = "resolved"
)

// resolvChange is the journal's record of one change to the system
// resolver: everything needed to undo it.
type resolvChange struct {
	Kind string `json:"kind"` // resolvFile | resolvResolved

	// file: Path was a regular file with exactly Original (and Mode, UID,
	// GID), or a symlink to Symlink, or nothing (!Existed); tungate wrote
	// Written there.
	Path     string `json:"path,omitempty"`
	Existed  bool   `json:"existed,omitempty"`
	Symlink  string `json:"symlink,omitempty"`
	Original []byte `json:"original,omitempty"`
	Mode     uint32 `json:"mode,omitempty"`
	UID      int    `json:"uid,omitempty"`
	GID      int    `json:"gid,omitempty"`
	Written  []byte `json:"written,omitempty"`

	// resolved: the link whose DNS settings tungate set.
	Link   string `json:"link,omitempty"`
	Server string `json:"server,omitempty"`
}

func (c *resolvChange) String() string {
	switch c.Kind {
	case resolvResolved:
		return fmt.Sprintf("systemd-resolved DNS of link %s", c.Link)
	case resolvFile:
		switch {
		case c.Symlink != "":
			return fmt.Sprintf("%s (a symlink to %s)", c.Path, c.Symlink)
		case !c.Existed:
			return fmt.Sprintf("%s (absent before)", c.Path)
		}
		return c.Path
	}
	return "resolver change of kind " + c.Kind
}

// dnsRecord is one line of the system DNS journal; the ops are those of
// the route journal.
type dnsRecord struct {
	Op     string        `json:"op"`
	Seq    int           `json:"seq,omitempty"`
	PID    int           `json:"pid,omitempty"`
	Resolv *resolvChange `json:"resolv,omitempty"`
}

// openJournal opens (creating if needed) and locks the system DNS journal
// at path.
func openJournal(path string) (*wal.File, error) {
	return wal.Open(path, "system DNS journal")
}

// parseDNSJournal returns the changes a system DNS journal lists as made
// and not aborted, oldest first, and the lines it skipped. As in the route
// journal, a last line without its newline was torn by a kill: its change
// was never made.
func parseDNSJournal(data []byte) (changes []*resolvChange, problems []string) {
	lines := bytes.Split(data, []byte{'\n'})
	lines = lines[:len(lines)-1]
	type pending struct {
		seq int
		ch  *resolvChange
	}
	var adds []pending
	aborted := map[int]bool{}
	for i, line := range lines {
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var rec dnsRecord
		if err := json.Unmarshal(line, &rec); err != nil {
			problems = append(problems, fmt.Sprintf("line %d: %v", i+1, err))
			continue
		}
		switch rec.Op {
		case wal.OpBegin:
		case wal.OpAdd:
			if rec.Resolv == nil || (rec.Resolv.Kind != resolvFile && rec.Resolv.Kind != resolvResolved) {
				problems = append(problems, fmt.Sprintf("line %d: an add record needs a resolv change of a known kind", i+1))
				continue
			}
			adds = append(adds, pending{rec.Seq, rec.Resolv})
		case wal.OpAbort:
			aborted[rec.Seq] = true
		default:
			problems = append(problems, fmt.Sprintf("line %d: unknown op %q", i+1, rec.Op))
		}
	}
	for _, a := range adds {
		if !aborted[a.seq] {
			changes = append(changes, a.ch)
		}
	}
	return changes, problems
}

// resolvContent is the resolv.conf tungate writes: server as the only
// nameserver, the original's search, domain and options lines kept.
func resolvContent(server netip.Addr, original []byte, journal string) []byte {
	var b bytes.Buffer
	b.WriteString("# Written by tungate (route.set_system_dns): the resolver is tungate's DNS\n")
	b.WriteString("# proxy while tungate runs. The original is restored when tungate stops, or\n")
	fmt.Fprintf(&b, "# at its next start after a crash; until then it is kept in\n# %s\n", journal)
	fmt.Fprintf(&b, "nameserver %s\n", server)
	for line := range strings.SplitSeq(string(original), "\n") {
		fields := strings.Fields(line)
		if len(fields) > 1 && (fields[0] == "search" || fields[0] == "domain" || fields[0] == "options") {
			b.WriteString(strings.TrimSpace(line))
			b.WriteByte('\n')
		}
	}
	return b.Bytes()
}

// Nameservers returns the nameserver addresses a resolv.conf names, in
// order (a link-local server's zone is dropped).
func Nameservers(content []byte) []netip.Addr {
	var out []netip.Addr
	for line := range strings.SplitSeq(string(content), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		s, _, _ := strings.Cut(fields[1], "%")
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// resolvFS is the file system operations of the file way, replaceable in
// tests.
type resolvFS struct {
	// isMountPoint reports whether path is a mount point (a bind mount):
	// such a file is rewritten in place, never replaced.
	isMountPoint func(path string) bool
	rename       func(from, to string) error
}

var hostFS = resolvFS{isMountPoint: isMountPoint, rename: os.Rename}

// snapshotResolv records what path is now, for undo.
func snapshotResolv(path string) (*resolvChange, error) {
	ch := &resolvChange{Kind: resolvFile, Path: path}
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return ch, nil
	case err != nil:
		return nil, err
	}
	ch.Existed = true
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		if ch.Symlink, err = os.Readlink(path); err != nil {
			return nil, err
		}
		if ch.Symlink == "" {
			return nil, fmt.Errorf("%s: empty symlink", path)
		}
	case fi.Mode().IsRegular():
		if ch.Original, err = os.ReadFile(path); err != nil {
			return nil, err
		}
		if ch.Original == nil {
			ch.Original = []byte{}
		}
		ch.Mode = uint32(fi.Mode().Perm())
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			ch.UID, ch.GID = int(st.Uid), int(st.Gid)
		}
	default:
		return nil, fmt.Errorf("%s is neither a regular file nor a symlink (%s)", path, fi.Mode().Type())
	}
	return ch, nil
}

// writeResolv makes path a regular file with data: by an atomic rename of
// a new file over it (which replaces a symlink, never its target), or, for
// a mount point, by rewriting the file in place.
func (fsys resolvFS) writeResolv(path string, data []byte, mode fs.FileMode, uid, gid int) error {
	fi, err := os.Lstat(path)
	if err == nil && fi.Mode().IsRegular() && fsys.isMountPoint(path) {
		return writeInPlace(path, data)
	}
	return fsys.replace(path, func(tmp string) error {
		f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
		if err != nil {
			return err
		}
		_, err = f.Write(data)
		if err == nil {
			err = f.Chmod(mode) // not subject to the umask
		}
		if err == nil && uid >= 0 {
			err = f.Chown(uid, gid)
		}
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	})
}

// symlinkResolv makes path a symlink to target (atomically).
func (fsys resolvFS) symlinkResolv(path, target string) error {
	return fsys.replace(path, func(tmp string) error { return os.Symlink(target, tmp) })
}

// replace creates a new directory entry beside path with create and
// renames it over path.
func (fsys resolvFS) replace(path string, create func(tmp string) error) error {
	dir := filepath.Dir(path)
	prefix := "." + filepath.Base(path) + ".tungate-"
	// Leftovers of a run killed between creating and renaming.
	if old, err := filepath.Glob(filepath.Join(dir, globEscape(prefix)+"*")); err == nil {
		for _, o := range old {
			os.Remove(o)
		}
	}
	tmp := filepath.Join(dir, prefix+strconv.Itoa(os.Getpid()))
	if err := create(tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := fsys.rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	syncDir(dir)
	return nil
}

// globEscape quotes the glob metacharacters in s.
func globEscape(s string) string {
	var b strings.Builder
	for _, r := range s {
		if strings.ContainsRune(`*?[\\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// writeInPlace truncates and rewrites a regular file (keeping its inode,
// mode and owner).
func writeInPlace(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// applyFile points path at ch.Written (ch is the snapshot, journaled).
func (fsys resolvFS) applyFile(ch *resolvChange) error {
	mode, uid, gid := fs.FileMode(0o644), -1, -1
	if ch.Existed && ch.Symlink == "" {
		mode, uid, gid = fs.FileMode(ch.Mode), ch.UID, ch.GID
	}
	return fsys.writeResolv(ch.Path, ch.Written, mode, uid, gid)
}

// errNotOurs says the resolver configuration changed since tungate set it.
var errNotOurs = errors.New("changed since tungate set it")

// undoFile restores what ch recorded, if the file is still what tungate
// wrote (or a torn, in-place write of it: a prefix); otherwise it leaves
// the file alone and returns an error wrapping errNotOurs.
func (fsys resolvFS) undoFile(ch *resolvChange) error {
	fi, err := os.Lstat(ch.Path)
	var cur []byte
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if !ch.Existed {
			return nil
		}
		// Ours was removed (or never written after a failed rename):
		// put the original back.
	case err != nil:
		return err
	case fi.Mode()&fs.ModeSymlink != 0:
		if target, err := os.Readlink(ch.Path); err == nil && target == ch.Symlink {
			return nil // already the original symlink
		}
		return fmt.Errorf("%s: now a symlink that tungate did not make: %w", ch.Path, errNotOurs)
	case fi.Mode().IsRegular():
		if cur, err = os.ReadFile(ch.Path); err != nil {
			return err
		}
		if ch.Existed && ch.Symlink == "" && bytes.Equal(cur, ch.Original) {
			return nil // never changed, or already restored
		}
		if !bytes.HasPrefix(ch.Written, cur) {
			return fmt.Errorf("%s: %w", ch.Path, errNotOurs)
		}
	default:
		return fmt.Errorf("%s: now a %s: %w", ch.Path, fi.Mode().Type(), errNotOurs)
	}
	switch {
	case !ch.Existed:
		if err := os.Remove(ch.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		syncDir(filepath.Dir(ch.Path))
		return nil
	case ch.Symlink != "":
		return fsys.symlinkResolv(ch.Path, ch.Symlink)
	default:
		return fsys.writeResolv(ch.Path, ch.Original, fs.FileMode(ch.Mode), ch.UID, ch.GID)
	}
}

// resolvectl runs resolvectl; replaceable in tests.
type resolvectlFunc func(args ...string) error

// resolvedOps is the systemd-resolved way.
type resolvedOps struct {
	run resolvectlFunc
	// linkExists reports whether the link is still there (resolved
	// forgets a link's settings when the link goes).
	linkExists func(name string) bool
}

func (r resolvedOps) apply(ch *resolvChange) error {
	if err := r.run("dns", ch.Link, ch.Server); err != nil {
		return err
	}
	return r.run("domain", ch.Link, "~.")
}

func (r resolvedOps) undo(ch *resolvChange) error {
	if !r.linkExists(ch.Link) {
		return nil
	}
	return r.run("revert", ch.Link)
}

// dnsOps is everything the resolver change does to the system.
type dnsOps struct {
	fs       resolvFS
	resolved resolvedOps
	// useResolved reports whether systemd-resolved manages the resolver
	// configuration at path (and may be told about link).
	useResolved func(path, link string) bool
}

func (o dnsOps) undo(ch *resolvChange) error {
	if ch.Kind == resolvResolved {
		return o.resolved.undo(ch)
	}
	return o.fs.undoFile(ch)
}

// SystemDNS is the system resolver pointed at tungate. Close restores it.
//
// Lifecycle: Set → set → Close → restored (Close again: no-op, same
// result).
type SystemDNS struct {
	log *slog.Logger
	ops dnsOps
	j   *wal.File
	ch  *resolvChange

	mu     sync.Mutex
	closed bool
	err    error
}

// Way returns how the resolver was set: "systemd-resolved (link tg0)" or
// the file's path.
func (s *SystemDNS) Way() string {
	if s.ch.Kind == resolvResolved {
		return fmt.Sprintf("systemd-resolved (link %s)", s.ch.Link)
	}
	return s.ch.String()
}

// setSystemDNS is Set with given operations.
func setSystemDNS(c Config, ops dnsOps, log *slog.Logger) (*SystemDNS, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if !c.Server.IsValid() {
		return nil, errors.New("route.set_system_dns: dns.listen is not set")
	}
	if c.Journal == "" {
		return nil, errors.New("route.set_system_dns: route.journal must be set (the original resolver is journaled there before it is changed)")
	}
	j, err := openJournal(c.Journal)
	if err != nil {
		return nil, fmt.Errorf("system DNS: %w", err)
	}
	if _, err := restoreLocked(j, ops, log); err != nil {
		j.Close()
		return nil, err
	}
	if err := j.Reset(); err != nil {
		j.Close()
		return nil, err
	}
	path := c.path()
	var ch *resolvChange
	if c.Link != "" && ops.useResolved(path, c.Link) {
		ch = &resolvChange{Kind: resolvResolved, Link: c.Link, Server: c.Server.String()}
	} else {
		if ch, err = snapshotResolv(path); err != nil {
			j.Remove()
			return nil, fmt.Errorf("system DNS: %w", err)
		}
		cur := ch.Original
		if ch.Symlink != "" {
			cur, _ = os.ReadFile(path) // the target's search and options, if any
		}
		ch.Written = resolvContent(c.Server, cur, c.Journal)
	}
	s := &SystemDNS{log: log, ops: ops, j: j, ch: ch}
	err = j.Append(dnsRecord{Op: wal.OpBegin, PID: os.Getpid()})
	if err == nil {
		err = j.Append(dnsRecord{Op: wal.OpAdd, Seq: j.NextSeq(), Resolv: ch})
	}
	if err != nil {
		j.Remove()
		return nil, err
	}
	if ch.Kind == resolvResolved {
		err = ops.resolved.apply(ch)
	} else {
		err = ops.fs.applyFile(ch)
	}
	if err != nil {
		err = fmt.Errorf("system DNS: set %s: %w", ch, err)
		// Part of it may have been made (one resolvectl call, a torn
		// write): undo now, keeping the journal if that fails too.
		if uerr := ops.undo(ch); uerr != nil {
			j.Close()
			return nil, errors.Join(err, fmt.Errorf("undo: %w; the journal %s keeps the original for the next start", uerr, c.Journal))
		}
		j.Remove()
		return nil, err
	}
	log.Debug("system DNS set", "way", s.Way(), "server", c.Server)
	return s, nil
}

// Close restores the system resolver and removes the journal. If the
// resolver cannot be restored, the journal stays for the next start and
// the error says so; a resolv.conf that someone else rewrote meanwhile is
// left as it is (logged, not an error). Close is idempotent.
func (s *SystemDNS) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return s.err
	}
	s.closed = true
	err := s.ops.undo(s.ch)
	switch {
	case err == nil:
		s.err = s.j.Remove()
	case errors.Is(err, errNotOurs):
		// Someone (a DHCP client, NetworkManager, the user) wrote a
		// newer configuration: theirs wins over the old original.
		s.log.Warn("system DNS: not restoring the resolver: someone else changed it while tungate ran; leaving it as it is", "what", s.ch.String(), "err", err)
		s.err = s.j.Remove()
	default:
		s.j.Close()
		s.err = fmt.Errorf("system DNS: restore %s: %w (the journal %s keeps the original for the next start)", s.ch, err, s.j.Path())
	}
	return s.err
}

// restoreLocked undoes, newest first, every change a held system DNS
// journal lists (a killed run's); it returns how many it undid. A file
// someone else has rewritten since is left alone (logged). It leaves the
// journal's content in place; the caller resets or removes it.
func restoreLocked(j *wal.File, ops dnsOps, log *slog.Logger) (int, error) {
	data, err := j.Read()
	if err != nil {
		return 0, fmt.Errorf("system DNS journal %s: %w", j.Path(), err)
	}
	changes, problems := parseDNSJournal(data)
	for _, p := range problems {
		log.Warn("system DNS: skipping a damaged journal line", "journal", j.Path(), "problem", p)
	}
	n := 0
	var errs []error
	for _, ch := range slices.Backward(changes) {
		err := ops.undo(ch)
		switch {
		case err == nil:
			n++
			log.Info("system DNS: restored the resolver an earlier run changed", "what", ch.String())
		case errors.Is(err, errNotOurs):
			log.Warn("system DNS: an earlier run's resolver change was since replaced by someone else; leaving it", "what", ch.String(), "err", err)
		default:
			errs = append(errs, fmt.Errorf("restore %s: %w", ch, err))
		}
	}
	if len(errs) > 0 {
		return n, fmt.Errorf("system DNS: restoring after an earlier run (journal %s kept): %w", j.Path(), errors.Join(errs...))
	}
	return n, nil
}

// restoreSystemDNS is Restore with given operations.
func restoreSystemDNS(journalPath string, ops dnsOps, log *slog.Logger) (int, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if journalPath == "" {
		return 0, nil
	}
	if _, err := os.Stat(journalPath); errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	j, err := openJournal(journalPath)
	if err != nil {
		return 0, fmt.Errorf("system DNS: %w", err)
	}
	n, err := restoreLocked(j, ops, log)
	if err != nil {
		j.Close()
		return n, err
	}
	return n, j.Remove()
}
