//go:build !linux

package sysdns

import "log/slog"

// SetSystemDNS fails with ErrSystemDNSUnsupported: it is Linux-only for
// now.
func SetSystemDNS(c SystemDNSConfig, log *slog.Logger) (*SystemDNS, error) {
	return nil, ErrSystemDNSUnsupported
}

// RestoreSystemDNS does nothing on this OS: SetSystemDNS never changes
// anything here.
func RestoreSystemDNS(journal string, log *slog.Logger) (int, error) {
	return 0, nil
}

// isMountPoint is not needed where SetSystemDNS is not built.
func isMountPoint(path string) bool { return false }
