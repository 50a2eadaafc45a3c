package api

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"time"

	"github.com/coder/websocket"
)

// sink is where a stream's frames go: a WebSocket, or the response body as
// newline-delimited JSON flushed per frame.
type sink interface {
	send(ctx context.Context, v any) error
	close()
}

// openStream answers r as a stream: a WebSocket when the request asks to
// upgrade, NDJSON otherwise. ctx ends when the client goes or the server
// closes.
func (s *Server) openStream(w http.ResponseWriter, r *http.Request) (ctx context.Context, out sink, ok bool) {
	base, cancel := context.WithCancel(r.Context())
	go func() {
		select {
		case <-s.done:
		case <-base.Done():
		}
		cancel()
	}()
	if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{OriginPatterns: s.originPatterns})
		if err != nil {
			cancel()
			return nil, nil, false // Accept answered the client
		}
		// The client sends nothing; reading is how its close is seen.
		return c.CloseRead(base), &wsSink{c: c, cancel: cancel}, true
	}
	f, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	if f != nil {
		f.Flush()
	}
	return base, &ndjsonSink{w: w, f: f, enc: json.NewEncoder(w), cancel: cancel}, true
}

type wsSink struct {
	c      *websocket.Conn
	cancel context.CancelFunc
}

// wsWriteTimeout bounds one frame to a reader that stopped reading.
const wsWriteTimeout = 5 * time.Second

func (s *wsSink) send(ctx context.Context, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, wsWriteTimeout)
	defer cancel()
	return s.c.Write(ctx, websocket.MessageText, b)
}

func (s *wsSink) close() {
	s.c.Close(websocket.StatusNormalClosure, "")
	s.cancel()
}

type ndjsonSink struct {
	w      http.ResponseWriter
	f      http.Flusher
	enc    *json.Encoder
	cancel context.CancelFunc
}

func (s *ndjsonSink) send(_ context.Context, v any) error {
	if err := s.enc.Encode(v); err != nil {
		return err
	}
	if s.f != nil {
		s.f.Flush()
	}
	return nil
}

func (s *ndjsonSink) close() { s.cancel() }

// tick streams frame() every interval, the first at once, until the
// client goes.
func (s *Server) tick(w http.ResponseWriter, r *http.Request, interval time.Duration, frame func() any) {
	ctx, out, ok := s.openStream(w, r)
	if !ok {
		return
	}
	defer out.close()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := out.send(ctx, frame()); err != nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
