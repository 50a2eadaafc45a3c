package httpconnect

import (
	"bufio"
	"errors"
	"fmt"
	"io"
)

// maxResponseHeader bounds the bytes read for a response header (status
// lines and header fields of any interim responses included), so that a
// hostile proxy cannot make us buffer without end. A single line is
// bounded by the bufio.Reader's size.
const maxResponseHeader = 16 << 10

// readResponse reads the proxy's answer to a CONNECT up to the end of its
// header and returns the final status code and status line. Interim (1xx)
// responses are skipped. What follows the header stays in br: after a 2xx
// it is the first bytes of the tunnel.
func readResponse(br *bufio.Reader) (int, string, error) {
	total := 0
	for {
		line, err := readLine(br, &total)
		if err != nil {
			return 0, "", err
		}
		status := string(line)
		code, err := parseStatusLine(line)
		if err != nil {
			return 0, "", err
		}
		for {
			field, err := readLine(br, &total)
			if err != nil {
				return 0, "", err
			}
			if len(field) == 0 {
				break
			}
		}
		if code >= 200 {
			return code, status, nil
		}
	}
}

// readLine returns the next line without its CRLF (or bare LF). The slice
// is valid until the next read from br.
func readLine(br *bufio.Reader, total *int) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	*total += len(line)
	switch {
	case err == bufio.ErrBufferFull:
		return nil, fmt.Errorf("response line longer than %d bytes", br.Size())
	case err == io.EOF:
		return nil, errors.New("proxy closed the connection before the end of its response header")
	case err != nil:
		return nil, fmt.Errorf("reading response: %w", err)
	case *total > maxResponseHeader:
		return nil, fmt.Errorf("response header longer than %d bytes", maxResponseHeader)
	}
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// parseStatusLine parses "HTTP/1.x SP 3DIGIT [SP reason]" and returns the
// status code.
func parseStatusLine(line []byte) (int, error) {
	const proto = "HTTP/1."
	if len(line) < len(proto)+1+1+3 || string(line[:len(proto)]) != proto ||
		!isDigit(line[len(proto)]) || line[len(proto)+1] != ' ' {
		return 0, fmt.Errorf("not an HTTP/1.x status line: %q", truncate(line))
	}
	c := line[len(proto)+2:]
	if len(c) > 3 && c[3] != ' ' || !isDigit(c[0]) || !isDigit(c[1]) || !isDigit(c[2]) {
		return 0, fmt.Errorf("bad status code in %q", truncate(line))
	}
	code := int(c[0]-'0')*100 + int(c[1]-'0')*10 + int(c[2]-'0')
	if code < 100 || code > 599 {
		return 0, fmt.Errorf("bad status code in %q", truncate(line))
	}
	return code, nil
}

func isDigit(b byte) bool { return '0' <= b && b <= '9' }

// truncate shortens what a proxy sent to a length fit for an error.
func truncate(b []byte) []byte {
	if len(b) > 128 {
		return b[:128]
	}
	return b
}
