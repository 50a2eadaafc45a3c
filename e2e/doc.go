//go:build linux

// Package e2e holds the end-to-end tests: each builds a two-namespace lab
// (internal/netlab), runs the real tungate binary in the "app" namespace
// with a TUN device, sends the app's traffic into it by policy routing, and
// checks what real clients and servers see. Nothing here is imported by
// tungate itself.
package e2e
