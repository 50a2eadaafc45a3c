package sysroute

import "errors"

// ErrUnsupported is returned by Install and Cleanup on an OS where
// auto-route is not built yet.
var ErrUnsupported = errors.New("auto-route is not supported on this OS yet")
