// Package wal is the write-ahead journal file that sysroute (routes,
// rules, the nftables table) and sysdns (the system resolver) record their
// changes in: a file of JSON lines, each written and fsync'd before the
// change it describes is made, held under an exclusive flock while its
// tungate runs, so that a second tungate sharing the path refuses to start
// instead of undoing the first one's changes.
//
// It owns the file: opening and locking it, appending a record durably,
// reading, emptying and removing it. It does not own the records' meaning:
// each user defines and parses its own records.
package wal

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The ops of a journal record: a run's begin, a change about to be made,
// and the abort of the change that failed.
const (
	OpBegin = "begin"
	OpAdd   = "add"
	OpAbort = "abort"
)

// ErrBusy is returned when another live tungate holds the journal.
var ErrBusy = errors.New("route.journal is held by a running tungate (stop it first, or give each tungate its own route.journal, route.table and route.priority)")

// File is an open, locked journal file.
type File struct {
	name string // names the file in errors: "route.journal"
	path string
	f    *os.File
	seq  int
}

// Open opens (creating if needed) and locks the journal at path; name
// says what it is in errors ("route.journal").
func Open(path, name string) (*File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", path, ErrBusy)
		}
		return nil, fmt.Errorf("%s %s: lock: %w", name, path, err)
	}
	return &File{name: name, path: path, f: f}, nil
}

// Path returns the file's path.
func (j *File) Path() string { return j.path }

// NextSeq returns the next record sequence number of this run (1 after
// Open or Reset).
func (j *File) NextSeq() int {
	j.seq++
	return j.seq
}

// Read returns the whole journal as written so far.
func (j *File) Read() ([]byte, error) {
	if _, err := j.f.Seek(0, 0); err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	_, err := buf.ReadFrom(j.f)
	return buf.Bytes(), err
}

// Reset empties the journal for a new run.
func (j *File) Reset() error {
	if err := j.f.Truncate(0); err != nil {
		return fmt.Errorf("%s %s: %w", j.name, j.path, err)
	}
	if _, err := j.f.Seek(0, 0); err != nil {
		return fmt.Errorf("%s %s: %w", j.name, j.path, err)
	}
	j.seq = 0
	return j.sync()
}

// Append writes rec (JSON) as one line and makes it durable before
// returning.
func (j *File) Append(rec any) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if _, err := j.f.Write(b); err != nil {
		return fmt.Errorf("%s %s: %w", j.name, j.path, err)
	}
	return j.sync()
}

func (j *File) sync() error {
	if err := j.f.Sync(); err != nil {
		return fmt.Errorf("%s %s: fsync: %w", j.name, j.path, err)
	}
	return nil
}

// Remove deletes the journal file and releases it.
func (j *File) Remove() error {
	err := os.Remove(j.path)
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	j.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", j.name, err)
	}
	return nil
}

// Close releases the journal (and its lock) without removing it.
func (j *File) Close() {
	if j.f != nil {
		j.f.Close()
		j.f = nil
	}
}
