package dnsproxy

import (
	"context"
	"encoding/binary"
	"net"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// DNS-over-TCP serving limits.
const (
	tcpIdleTimeout  = 10 * time.Second // no new query for this long closes the connection
	tcpWriteTimeout = 10 * time.Second
	tcpPipeline     = 16 // queries of one connection answered at once
)

const headerLen = 12

// HandleUDP answers one DNS query datagram asynchronously: it never blocks
// the caller and does not keep query after it returns. reply is called at
// most once, from another goroutine, with the answer (which the callee may
// keep). Datagrams shorter than a DNS header, responses, and datagrams
// beyond the in-flight limit (or after Close) are dropped and counted; other
// unreadable queries get FORMERR.
func (p *Proxy) HandleUDP(query []byte, reply func(answer []byte)) {
	if len(query) < headerLen {
		p.stats.dropped.Add(1)
		return
	}
	select {
	case p.udpSlots <- struct{}{}:
	default:
		p.stats.dropped.Add(1)
		return
	}
	q := append([]byte(nil), query...)
	ok := p.goAsync(func() {
		defer func() { <-p.udpSlots }()
		if answer := p.serveWire(q, true); answer != nil {
			reply(answer)
		}
	})
	if !ok {
		<-p.udpSlots
		p.stats.dropped.Add(1)
	}
}

// ServeTCP serves DNS over TCP on conn (RFC 7766: two-byte length prefix,
// several queries per connection, answered concurrently and possibly out of
// order) until EOF, an error, tcpIdleTimeout without a query, or Close. It
// closes conn before returning.
func (p *Proxy) ServeTCP(conn net.Conn) {
	p.lifeMu.Lock()
	if p.closed {
		p.lifeMu.Unlock()
		conn.Close()
		return
	}
	p.conns[conn] = struct{}{}
	p.wg.Add(1)
	p.lifeMu.Unlock()
	defer func() {
		conn.Close()
		p.lifeMu.Lock()
		delete(p.conns, conn)
		p.lifeMu.Unlock()
		p.wg.Done()
	}()

	var (
		writeMu  sync.Mutex
		inFlight sync.WaitGroup
		slots    = make(chan struct{}, tcpPipeline)
	)
	defer inFlight.Wait()
	for {
		conn.SetReadDeadline(time.Now().Add(tcpIdleTimeout))
		query, err := readFramed(conn)
		if err != nil {
			return
		}
		if len(query) < headerLen {
			p.stats.dropped.Add(1)
			continue
		}
		slots <- struct{}{}
		inFlight.Add(1)
		go func() {
			defer inFlight.Done()
			defer func() { <-slots }()
			answer := p.serveWire(query, false)
			if answer == nil {
				return
			}
			framed := make([]byte, 2+len(answer))
			binary.BigEndian.PutUint16(framed, uint16(len(answer)))
			copy(framed[2:], answer)
			writeMu.Lock()
			defer writeMu.Unlock()
			conn.SetWriteDeadline(time.Now().Add(tcpWriteTimeout))
			if _, err := conn.Write(framed); err != nil {
				conn.Close() // unblocks the reader
			}
		}()
	}
}

// serveWire answers one query in wire format, or returns nil to drop it.
func (p *Proxy) serveWire(b []byte, udp bool) []byte {
	if len(b) < headerLen {
		p.stats.dropped.Add(1)
		return nil
	}
	if b[2]&0x80 != 0 { // QR: a response, never answered (no loops, no reflection)
		p.stats.dropped.Add(1)
		return nil
	}
	q := new(dns.Msg)
	if err := q.Unpack(b); err != nil {
		p.stats.queries.Add(1)
		p.stats.formErr.Add(1)
		return headerOnly(b, dns.RcodeFormatError)
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.budget)
	defer cancel()
	resp, err := p.Exchange(ctx, q)
	if err != nil {
		p.log.Debug("dns answer failed", "err", err)
		resp = replyTo(q, dns.RcodeServerFailure)
	}
	limit := dns.MaxMsgSize
	if udp {
		limit = dns.MinMsgSize
		if opt := q.IsEdns0(); opt != nil {
			limit = min(max(int(opt.UDPSize()), dns.MinMsgSize), maxUDPAnswer)
		}
	}
	resp.Compress = true
	resp.Truncate(limit)
	out, err := resp.Pack()
	if err != nil {
		p.log.Debug("dns answer unpackable", "err", err)
		return headerOnly(b, dns.RcodeServerFailure)
	}
	return out
}

// headerOnly returns a bare header answering the query header in b: its ID,
// opcode and RD bit, with rcode.
func headerOnly(b []byte, rcode int) []byte {
	h := make([]byte, headerLen)
	copy(h[:2], b[:2])
	h[2] = 0x80 | b[2]&0x79 // QR, opcode, RD
	h[3] = 0x80 | byte(rcode&0x0f)
	return h
}
