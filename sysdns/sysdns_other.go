//go:build !linux

package sysdns

import "log/slog"

// Set fails with ErrUnsupported: it is Linux-only for now.
func Set(c Config, log *slog.Logger) (*SystemDNS, error) {
	return nil, ErrUnsupported
}

// Restore does nothing on this OS: Set never changes anything here.
func Restore(journal string, log *slog.Logger) (int, error) {
	return 0, nil
}

// isMountPoint is not needed where Set is not built.
func isMountPoint(path string) bool { return false }
