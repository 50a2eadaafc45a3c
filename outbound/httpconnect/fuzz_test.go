package httpconnect

import (
	"bufio"
	"bytes"
	"io"
	"strings"
	"testing"
	"time"
)

// FuzzHTTPConnectResponse: the response parser returns an error or a
// final status with its line, never panics, hangs or reads past the
// header limit.
func FuzzHTTPConnectResponse(f *testing.F) {
	f.Add([]byte("HTTP/1.1 200 Connection established\r\n\r\n"))
	f.Add([]byte("HTTP/1.0 200 OK\r\nProxy-Agent: x\r\n\r\nearly"))
	f.Add([]byte("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 502\n\n"))
	f.Add([]byte("HTTP/1.1 200 OK\r\nX: "))
	f.Add([]byte("HTTP/2 200\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 99 x\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 2000\r\n\r\n"))
	f.Add([]byte(""))
	// Oversized headers are in TestReadResponseLimits: as seeds they make
	// the fuzzer spend its time minimizing.
	f.Fuzz(func(t *testing.T, data []byte) {
		done := make(chan struct{})
		timer := time.AfterFunc(5*time.Second, func() {
			select {
			case <-done:
			default:
				panic("parser hung on a bytes.Reader")
			}
		})
		defer timer.Stop()
		defer close(done)

		// A small buffer too, so that short inputs reach the
		// line-too-long path.
		for _, size := range []int{16, 4096} {
			r := bytes.NewReader(data)
			br := bufio.NewReaderSize(r, size)
			code, status, err := readResponse(br)
			if err != nil {
				continue
			}
			if code < 200 || code > 599 || !strings.HasPrefix(status, "HTTP/1.") {
				t.Fatalf("readResponse(%q) = %d, %q", data, code, status)
			}
			if consumed := len(data) - r.Len() - br.Buffered(); consumed > maxResponseHeader {
				t.Fatalf("readResponse consumed %d header bytes, over the %d limit", consumed, maxResponseHeader)
			}
		}
	})
}

func TestReadResponseLimits(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		code     int    // 0: an error containing err
		err      string //
		rest     string // left in the reader after a success
	}{
		{"ok", "HTTP/1.1 200 Connection established\r\n\r\n", 200, "", ""},
		{"bare LF and no reason", "HTTP/1.0 200\n\nhello", 200, "", "hello"},
		{"interim then final", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX: y\r\n\r\nrest", 204, "", "rest"},
		{"truncated header", "HTTP/1.1 200 OK\r\nX: y\r\n", 0, "before the end of its response header", ""},
		{"empty", "", 0, "before the end of its response header", ""},
		{"not http", "SSH-2.0-OpenSSH_9.6\r\n", 0, "not an HTTP/1.x status line", ""},
		{"http/2", "HTTP/2 200\r\n\r\n", 0, "not an HTTP/1.x status line", ""},
		{"code too short", "HTTP/1.1 20 OK\r\n\r\n", 0, "bad status code", ""},
		{"code too long", "HTTP/1.1 2000\r\n\r\n", 0, "bad status code", ""},
		{"code out of range", "HTTP/1.1 099 x\r\n\r\n", 0, "bad status code", ""},
		{"line too long", "HTTP/1.1 200 " + strings.Repeat("a", 5000) + "\r\n\r\n", 0, "response line longer than 4096 bytes", ""},
		{"header too long", "HTTP/1.1 200 OK\r\n" + strings.Repeat("X-Pad: "+strings.Repeat("a", 1000)+"\r\n", 20) + "\r\n", 0, "response header longer than 16384 bytes", ""},
		{"endless interim responses", strings.Repeat("HTTP/1.1 100 Continue\r\n\r\n", 1000), 0, "response header longer than 16384 bytes", ""},
	} {
		br := bufio.NewReader(strings.NewReader(tc.in))
		code, _, err := readResponse(br)
		if tc.code == 0 {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: readResponse = %d, %v; want an error containing %q", tc.name, code, err, tc.err)
			}
			continue
		}
		rest, _ := io.ReadAll(br)
		if err != nil || code != tc.code || string(rest) != tc.rest {
			t.Errorf("%s: readResponse = %d, %v, rest %q; want %d, rest %q", tc.name, code, err, rest, tc.code, tc.rest)
		}
	}
}
