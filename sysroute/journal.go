package sysroute

import (
	"bytes"
	"encoding/json"
	"fmt"

	"github.com/tungate/tungate/internal/wal"
)

// The journal is a file of JSON lines, one record per line, each written
// and fsync'd before the change it describes is made:
//
//	{"op":"begin","pid":…,"netns":"…","table":2022,"first":9000,"last":9003}
//	{"op":"add","seq":1,"route":{…}}
//	{"op":"add","seq":2,"rule":{…}}
//	{"op":"add","seq":3,"nftable":{"family":"inet","name":"tungate2022"}}
//	{"op":"abort","seq":3}          the add failed: nothing to undo for it
//
// A tungate that was killed leaves it behind; the next Install (or
// Cleanup) deletes every added object that was not aborted, newest first,
// ignoring objects that are already gone (the record is written before the
// change, so the change may never have happened). A last line without its
// newline is a record torn by the kill and is ignored: its change was
// never made. The file is removed when everything it lists has been
// removed. While a tungate runs it holds an exclusive flock on the file,
// so a second one sharing the path refuses to start instead of undoing the
// first one's routes.

// record is one line of the journal.
type record struct {
	Op  string `json:"op"`
	Seq int    `json:"seq,omitempty"`

	// begin: who wrote the journal, where, and the band it used.
	PID   int    `json:"pid,omitempty"`
	NetNS string `json:"netns,omitempty"`
	Table int    `json:"table,omitempty"`
	First int    `json:"first,omitempty"`
	Last  int    `json:"last,omitempty"`

	// add: exactly one of these.
	Route   *route    `json:"route,omitempty"`
	Rule    *rule     `json:"rule,omitempty"`
	NFTable *nftTable `json:"nftable,omitempty"`
}

// ErrJournalBusy is returned when another live tungate holds the journal.
var ErrJournalBusy = wal.ErrBusy

// journal is an open, locked journal file.
type journal struct{ *wal.File }

// openJournal opens (creating if needed) and locks the journal at path.
func openJournal(path string) (*journal, error) {
	f, err := wal.Open(path, "route.journal")
	if err != nil {
		return nil, err
	}
	return &journal{f}, nil
}

// add records that e (a route, rule or nftables table) is about to be
// added and returns the record's sequence number, for abort.
func (j *journal) add(e journalEntry) (int, error) {
	seq := j.NextSeq()
	return seq, j.Append(record{Op: wal.OpAdd, Seq: seq, Route: e.Route, Rule: e.Rule, NFTable: e.NFTable})
}

// abort records that the add with sequence seq failed.
func (j *journal) abort(seq int) error {
	return j.Append(record{Op: wal.OpAbort, Seq: seq})
}

// journalEntry is one added object to undo: exactly one of the fields is
// set.
type journalEntry struct {
	Route   *route
	Rule    *rule
	NFTable *nftTable
}

func (e journalEntry) String() string {
	switch {
	case e.Route != nil:
		return "route " + e.Route.String()
	case e.Rule != nil:
		return "rule " + e.Rule.String()
	default:
		return e.NFTable.String()
	}
}

// objects counts the entry's set fields (1 in a valid entry).
func (e journalEntry) objects() int {
	n := 0
	for _, set := range []bool{e.Route != nil, e.Rule != nil, e.NFTable != nil} {
		if set {
			n++
		}
	}
	return n
}

// parsedJournal is what a journal file says was done.
type parsedJournal struct {
	// Begin is the run's begin record (nil if the file had none).
	Begin *record
	// Entries are the objects added and not aborted, oldest first.
	Entries []journalEntry
	// Problems are lines that were skipped, for the log.
	Problems []string
}

// parseJournal reads a journal file's content. A last line without its
// newline (torn by a kill in mid-write) is ignored; any other line that is
// not a valid record is reported in Problems and skipped.
func parseJournal(data []byte) parsedJournal {
	var p parsedJournal
	lines := bytes.Split(data, []byte{'\n'})
	// After a complete file the last element is empty; otherwise it is
	// the torn last record.
	lines = lines[:len(lines)-1]
	type pending struct {
		seq   int
		entry journalEntry
	}
	var adds []pending
	aborted := map[int]bool{}
	for i, line := range lines {
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var rec record
		if err := json.Unmarshal(line, &rec); err != nil {
			p.Problems = append(p.Problems, fmt.Sprintf("line %d: %v", i+1, err))
			continue
		}
		switch rec.Op {
		case wal.OpBegin:
			if p.Begin == nil {
				b := rec
				p.Begin = &b
			}
		case wal.OpAdd:
			e := journalEntry{Route: rec.Route, Rule: rec.Rule, NFTable: rec.NFTable}
			if e.objects() != 1 {
				p.Problems = append(p.Problems, fmt.Sprintf("line %d: an add record needs exactly one route, rule or nftable", i+1))
				continue
			}
			adds = append(adds, pending{rec.Seq, e})
		case wal.OpAbort:
			aborted[rec.Seq] = true
		default:
			p.Problems = append(p.Problems, fmt.Sprintf("line %d: unknown op %q", i+1, rec.Op))
		}
	}
	for _, a := range adds {
		if !aborted[a.seq] {
			p.Entries = append(p.Entries, a.entry)
		}
	}
	return p
}
