package tun

import "errors"

// ErrClosed is returned by Read and Write after Close.
var ErrClosed = errors.New("tun: device closed")
