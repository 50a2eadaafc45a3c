//go:build !linux

package loopguard

import "log/slog"

// NewLoopDetector returns a detector that never reports a loop: this OS
// has no socket lookup for it yet.
func NewLoopDetector(cfg LoopConfig, log *slog.Logger) (*LoopDetector, error) {
	return newLoopDetector(cfg, log, nil, nil), nil
}
