//go:build !linux

package sysroute

import (
	"fmt"
	"log/slog"
)

// Install fails with ErrUnsupported: auto-route is Linux-only for now.
func Install(c Config, log *slog.Logger) (*Routes, error) {
	return nil, fmt.Errorf("route.auto: %w", ErrUnsupported)
}

// Cleanup fails with ErrUnsupported: auto-route is Linux-only for now.
func Cleanup(c Config, log *slog.Logger) (int, error) {
	return 0, fmt.Errorf("cleanup: %w", ErrUnsupported)
}
