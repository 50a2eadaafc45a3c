package dnsproxy

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
)

// fakeIPStore is the append-only log behind a fake-ip pool. The file is
// text, one record a line:
//
//	tungate-fakeip v1 range4=198.18.0.0/15 range6=fc00::/18
//	198.18.0.1 example.com
//	fc00::1 example.com
//
// Each new mapping is appended with one write(2) before its answer leaves,
// so it survives a crash of the process (SIGKILL); it is fsynced on
// compaction and Close, so a power loss may lose the mappings made since.
// Replay applies the records in order (last write wins), skips records it
// cannot read and ignores a torn last line. The file is rewritten with only
// the live mappings at every start and whenever it holds more than
// compactFactor records per live mapping.
type fakeIPStore struct {
	path    string
	header  string
	f       *os.File // open for appending
	records int      // mapping lines in the file
}

const (
	storeMagic    = "tungate-fakeip v1"
	compactFactor = 4
	compactMin    = 256 // never compact a log shorter than this
)

func storeHeader(r4, r6 netip.Prefix) string {
	f := func(p netip.Prefix) string {
		if !p.IsValid() {
			return "none"
		}
		return p.Masked().String()
	}
	return fmt.Sprintf("%s range4=%s range6=%s", storeMagic, f(r4), f(r6))
}

// openFakeIPStore replays the store at path into pool and rewrites it. A
// store made for other ranges (or with an unreadable header) is discarded
// with one warning.
func openFakeIPStore(path string, pool *fakeIPPool, log *slog.Logger) (*fakeIPStore, error) {
	s := &fakeIPStore{path: path, header: storeHeader(rangePrefix(pool.v4), rangePrefix(pool.v6))}
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("fake-ip store: %w", err)
	}
	if len(data) > 0 {
		header, body, _ := bytes.Cut(data, []byte("\n"))
		if string(header) != s.header {
			log.Warn("fake-ip store: made for other ranges or unreadable, discarding its mappings",
				"path", path, "found", truncateForLog(string(header)), "want", s.header)
		} else {
			s.replay(body, pool, log)
		}
	}
	if err := s.rewrite(pool.snapshot()); err != nil {
		return nil, err
	}
	return s, nil
}

func rangePrefix(r *fakeRange) netip.Prefix {
	if r == nil {
		return netip.Prefix{}
	}
	return r.prefix
}

func truncateForLog(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}

// replay applies the record lines of body. A last line without its newline
// is a write torn by a crash and is ignored.
func (s *fakeIPStore) replay(body []byte, pool *fakeIPPool, log *slog.Logger) {
	bad, torn := 0, false
	for len(body) > 0 {
		line, rest, complete := bytes.Cut(body, []byte("\n"))
		body = rest
		if !complete {
			torn = true
			break
		}
		addrText, name, ok := strings.Cut(string(line), " ")
		addr, err := netip.ParseAddr(addrText)
		if !ok || err != nil || !pool.replay(addr, name) {
			bad++
		}
	}
	if bad > 0 || torn {
		log.Debug("fake-ip store: skipped unreadable records", "path", s.path, "bad", bad, "torn_tail", torn)
	}
}

// append writes one mapping with a single write(2).
func (s *fakeIPStore) append(addr netip.Addr, name string) error {
	line := make([]byte, 0, 48+len(name))
	line = addr.AppendTo(line)
	line = append(line, ' ')
	line = append(line, name...)
	line = append(line, '\n')
	if _, err := s.f.Write(line); err != nil {
		return fmt.Errorf("fake-ip store %s: %w", s.path, err)
	}
	s.records++
	return nil
}

func (s *fakeIPStore) needsCompaction(live int) bool {
	return s.records > compactMin && s.records > compactFactor*live
}

// rewrite replaces the file with the header and mappings (atomically:
// temporary file, fsync, rename) and reopens it for appending.
func (s *fakeIPStore) rewrite(mappings []fakeMapping) error {
	var b bytes.Buffer
	b.WriteString(s.header)
	b.WriteByte('\n')
	for _, m := range mappings {
		b.Write(m.addr.AppendTo(nil))
		b.WriteByte(' ')
		b.WriteString(m.name)
		b.WriteByte('\n')
	}
	tmp := s.path + ".tmp"
	if err := writeFileSync(tmp, b.Bytes()); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("fake-ip store: %w", err)
	}
	if err := os.Rename(tmp, s.path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("fake-ip store: %w", err)
	}
	if d, err := os.Open(filepath.Dir(s.path)); err == nil {
		d.Sync() // make the rename durable; best effort
		d.Close()
	}
	f, err := os.OpenFile(s.path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return fmt.Errorf("fake-ip store: %w", err)
	}
	if s.f != nil {
		s.f.Close()
	}
	s.f, s.records = f, len(mappings)
	return nil
}

func writeFileSync(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// close fsyncs and closes the file.
func (s *fakeIPStore) close() error {
	if s.f == nil {
		return nil
	}
	err := s.f.Sync()
	if cerr := s.f.Close(); err == nil {
		err = cerr
	}
	s.f = nil
	if err != nil {
		return fmt.Errorf("fake-ip store %s: %w", s.path, err)
	}
	return nil
}
