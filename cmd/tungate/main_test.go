package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// check without --config checks the embedded default with the
// environment's overrides, as run would use it.
func TestCheckWithoutConfig(t *testing.T) {
	out, err := runRoot(t, "check")
	if err != nil || !strings.Contains(out, "embedded default configuration") || !strings.HasSuffix(out, ": ok\n") {
		t.Errorf("tungate check: %q, %v; want the embedded default ok", out, err)
	}
	t.Setenv("TUNGATE_LOG_LEVEL", "loud")
	out, err = runRoot(t, "check")
	if err == nil || !strings.Contains(err.Error(), "log.level") {
		t.Errorf("tungate check with TUNGATE_LOG_LEVEL=loud: %q, %v; want an error naming log.level", out, err)
	}
}

func TestCheckFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ok.yaml")
	if err := os.WriteFile(path, []byte("log: {level: debug}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runRoot(t, "check", "--config", path); err != nil || out != path+": ok\n" {
		t.Errorf("tungate check --config %s: %q, %v", path, out, err)
	}
}

// doctor --help shows --uid with its one default, doctor's own uid, and
// no made-up number.
func TestDoctorUIDUsage(t *testing.T) {
	out, err := runRoot(t, "doctor", "--help")
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for l := range strings.Lines(out) {
		if strings.Contains(l, "--uid") {
			line = l
		}
	}
	if !strings.Contains(line, "(default: doctor's own)") || strings.Contains(line, "(default -1)") || strings.Count(line, "default") != 1 {
		t.Errorf("doctor --help, the --uid line: %q", line)
	}
}

func TestUIDFlag(t *testing.T) {
	var f uidFlag
	if f.uid != nil || f.String() != "" {
		t.Fatalf("unset uidFlag = %v %q", f.uid, f.String())
	}
	for _, bad := range []string{"-1", "4294967296", "root", ""} {
		if err := f.Set(bad); err == nil {
			t.Errorf("Set(%q) = nil, want an error", bad)
		}
	}
	if err := f.Set("0"); err != nil || f.uid == nil || *f.uid != 0 || f.String() != "0" {
		t.Errorf("Set(\"0\"): %v, uid %v", err, f.uid)
	}
	if err := f.Set("4294967295"); err != nil || *f.uid != 4294967295 {
		t.Errorf("Set(\"4294967295\"): %v, uid %v", err, f.uid)
	}
}
