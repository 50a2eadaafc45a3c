//go:build !linux

package tun

import "log/slog"

// Device is an open TUN device; see the Linux implementation for the
// contract. On this OS Open always fails.
type Device struct{}

// Open returns ErrNotSupported on this OS.
func Open(Config, *slog.Logger) (*Device, error) { return nil, ErrNotSupported }

func (*Device) Name() string                   { return "" }
func (*Device) MTU() int                       { return 0 }
func (*Device) Offload() bool                  { return false }
func (*Device) VirtioHdr() bool                { return false }
func (*Device) ReadFrame([]byte) (int, error)  { return 0, ErrNotSupported }
func (*Device) WriteFrame([]byte) (int, error) { return 0, ErrNotSupported }
func (*Device) Close() error                   { return nil }
