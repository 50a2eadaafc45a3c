package sysroute

import (
	"fmt"
	"io/fs"
	"strings"
	"testing"

	"github.com/tungate/tungate/internal/wal"
)

// fakeHierarchy is a cgroup hierarchy of the given directories (paths
// below the mount point), each with an id of its own.
func fakeHierarchy(mount, root string, dirs ...string) cgroupHierarchy {
	ids := map[string]uint64{strings.TrimSuffix(mount, "/"): 1}
	for i, d := range dirs {
		ids[mount+"/"+d] = uint64(100 + i)
	}
	return cgroupHierarchy{Mount: mount, Root: root, stat: func(dir string) (uint64, error) {
		if id, ok := ids[dir]; ok {
			return id, nil
		}
		return 0, fmt.Errorf("stat %s: %w", dir, fs.ErrNotExist)
	}}
}

func TestCgroupLookup(t *testing.T) {
	const mount = "/sys/fs/cgroup/unified"
	dirs := []string{"user.slice", "user.slice/app.slice", "user.slice/app.slice/firefox.scope"}
	whole := fakeHierarchy(mount, "/", dirs...)
	// A subtree mounted: the mount point shows /user.slice's content.
	sub := fakeHierarchy(mount, "/user.slice", "app.slice", "app.slice/firefox.scope")
	tests := []struct {
		name  string
		h     cgroupHierarchy
		path  string
		level uint32
		id    uint64
		err   string
	}{
		{"relative", whole, "user.slice/app.slice/firefox.scope", 3, 102, ""},
		{"relative, top level", whole, "user.slice", 1, 100, ""},
		{"as /proc/PID/cgroup shows it", whole, "/user.slice/app.slice", 2, 101, ""},
		{"absolute under the mount point", whole, mount + "/user.slice/app.slice", 2, 101, ""},
		{"cleaned", whole, "user.slice//app.slice/./", 2, 101, ""},
		{"missing", whole, "user.slice/nope.scope", 0, 0, `cgroup "user.slice/nope.scope" not found under /sys/fs/cgroup/unified`},
		{"absolute elsewhere: a cgroup path", whole, "/sys/fs/cgroup/user.slice", 0, 0, `cgroup "/sys/fs/cgroup/user.slice" not found under /sys/fs/cgroup/unified`},
		{"dot-dot", whole, "user.slice/../../etc", 0, 0, `".." is not allowed`},
		{"the root", whole, "/", 0, 0, "the hierarchy's root"},
		{"the mount point", whole, mount, 0, 0, "the hierarchy's root"},
		{"subtree: relative to the mount point, levels from the root", sub, "app.slice/firefox.scope", 3, 101, ""},
		{"subtree: as /proc/PID/cgroup shows it", sub, "/user.slice/app.slice", 2, 100, ""},
		{"subtree: its own root", sub, "/user.slice", 1, 1, ""},
		{"subtree: outside it", sub, "/system.slice", 0, 0, "not in the part of the hierarchy mounted at"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			level, id, err := tc.h.lookup(tc.path)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("lookup(%q) = %d, %d, %v; want an error containing %q", tc.path, level, id, err, tc.err)
				}
				return
			}
			if err != nil || level != tc.level || id != tc.id {
				t.Fatalf("lookup(%q) = level %d, id %d, %v; want level %d, id %d", tc.path, level, id, err, tc.level, tc.id)
			}
		})
	}
}

func TestNFTableOwned(t *testing.T) {
	tests := []struct {
		t     nftTable
		table int
		want  bool
	}{
		{nftTable{Family: "inet", Name: "tungate2022"}, 2022, true},
		{nftTable{Family: "inet", Name: "tungate2022"}, 100, false},
		{nftTable{Family: "ip", Name: "tungate2022"}, 2022, false},
		{nftTable{Family: "inet", Name: "tungate2022"}, 0, true},
		{nftTable{Family: "inet", Name: "filter"}, 0, false},
		{nftTable{Family: "inet", Name: "tungate"}, 0, false},
		{nftTable{Family: "inet", Name: "tungatex"}, 0, false},
	}
	for _, tc := range tests {
		if got := tc.t.owned(tc.table); got != tc.want {
			t.Errorf("%s owned(%d) = %v, want %v", tc.t, tc.table, got, tc.want)
		}
	}
}

func TestOwnedEntryNFTable(t *testing.T) {
	begin := &record{Op: wal.OpBegin, Table: 2022, First: 9000, Last: 9003}
	for _, tc := range []struct {
		name  string
		begin *record
		nt    nftTable
		want  bool
	}{
		{"its own table", begin, nftTable{Family: "inet", Name: "tungate2022"}, true},
		{"another table's", begin, nftTable{Family: "inet", Name: "tungate100"}, false},
		{"someone else's", begin, nftTable{Family: "inet", Name: "filter"}, false},
		{"no begin record: any tungate table", nil, nftTable{Family: "inet", Name: "tungate100"}, true},
		{"no begin record: not someone else's", nil, nftTable{Family: "inet", Name: "nat"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nt := tc.nt
			if got := ownedEntry(journalEntry{NFTable: &nt}, tc.begin); got != tc.want {
				t.Errorf("ownedEntry(%s) = %v, want %v", nt, got, tc.want)
			}
		})
	}
}

func TestParseJournalNFTable(t *testing.T) {
	data := `{"op":"begin","table":2022,"first":9000,"last":9003}` + "\n" +
		`{"op":"add","seq":1,"nftable":{"family":"inet","name":"tungate2022"}}` + "\n" +
		`{"op":"add","seq":2,"nftable":{"family":"inet","name":"tungate2022"},"rule":{"family":4,"priority":9000,"action":"nop"}}` + "\n"
	p := parseJournal([]byte(data))
	if len(p.Entries) != 1 || p.Entries[0].NFTable == nil || p.Entries[0].NFTable.Name != "tungate2022" {
		t.Errorf("entries = %v, want the table", p.Entries)
	}
	if len(p.Problems) != 1 || !strings.Contains(p.Problems[0], "exactly one") {
		t.Errorf("problems = %q, want the record with two objects reported", p.Problems)
	}
}
