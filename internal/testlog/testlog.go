// Package testlog gives tests a logger whose output they can read back.
package testlog

import (
	"bytes"
	"log/slog"
	"sync"
)

// Buffer collects log lines for assertions; it is safe for concurrent use.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

// String returns everything logged so far.
func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// New returns a text logger at debug level writing into a new Buffer.
func New() (*slog.Logger, *Buffer) {
	var lb Buffer
	return slog.New(slog.NewTextHandler(&lb, &slog.HandlerOptions{Level: slog.LevelDebug})), &lb
}
