package sysdns

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPointsAtResolved(t *testing.T) {
	dir := t.TempDir()
	etc := filepath.Join(dir, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, content, link string
		want                bool
	}{
		{name: "stub", content: "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n", want: true},
		{name: "stub and another", content: "nameserver 127.0.0.53\nnameserver 1.1.1.1\n"},
		{name: "plain", content: "nameserver 192.168.1.1\n"},
		{name: "empty", content: ""},
		{name: "link", link: "/run/systemd/resolve/stub-resolv.conf", want: true},
		// As Ubuntu's ../run/systemd/resolve/stub-resolv.conf from /etc.
		{name: "relative link", link: strings.Repeat("../", 30) + "run/systemd/resolve/resolv.conf", want: true},
		{name: "other link", link: "/run/NetworkManager/resolv.conf"},
	} {
		path := filepath.Join(etc, tc.name)
		var err error
		if tc.link != "" {
			err = os.Symlink(tc.link, path) // dangling here: only its target is read
		} else {
			err = os.WriteFile(path, []byte(tc.content), 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
		if got := PointsAtResolved(path); got != tc.want {
			t.Errorf("%s: PointsAtResolved = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestIsMountPoint(t *testing.T) {
	if !isMountPoint("/proc") {
		t.Error("isMountPoint(/proc) = false")
	}
	f := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if isMountPoint(f) {
		t.Errorf("isMountPoint(%s) = true", f)
	}
	if got := unescapeMountinfo(`/mnt/a\040b\134c`); got != `/mnt/a b\c` {
		t.Errorf("unescapeMountinfo = %q", got)
	}
}
