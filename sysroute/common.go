package sysroute

import (
	"errors"
	"log/slog"
)

// ErrUnsupported is returned by Install and Cleanup on an OS where
// auto-route is not built yet.
var ErrUnsupported = errors.New("auto-route is not supported on this OS yet")

func orDiscard(log *slog.Logger) *slog.Logger {
	if log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return log
}
