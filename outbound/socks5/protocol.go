package socks5

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"

	"github.com/tungate/tungate/outbound"
)

// RFC 1928 and RFC 1929 constants.
const (
	socksVersion = 0x05
	authVersion  = 0x01

	methodNoAuth   = 0x00
	methodUserPass = 0x02
	methodNone     = 0xff

	cmdConnect      = 0x01
	cmdUDPAssociate = 0x03

	atypIPv4   = 0x01
	atypDomain = 0x03
	atypIPv6   = 0x04
)

// socksAddr is an address as it travels in a request, a reply or a UDP
// header: an IP or a name, and a port.
type socksAddr struct {
	ip   netip.Addr
	name string
	port uint16
}

func (a socksAddr) String() string {
	if a.name != "" {
		return fmt.Sprintf("%s:%d", a.name, a.port)
	}
	return netip.AddrPortFrom(a.ip, a.port).String()
}

// appendAddr appends ATYP, DST.ADDR and DST.PORT for dst: its name when
// known, else its IP.
func appendAddr(b []byte, dst outbound.Target) ([]byte, error) {
	if dst.Domain != "" {
		if len(dst.Domain) > 255 {
			return b, fmt.Errorf("name is %d bytes, SOCKS5 carries 255", len(dst.Domain))
		}
		b = append(b, atypDomain, byte(len(dst.Domain)))
		b = append(b, dst.Domain...)
	} else {
		ip := dst.Addr.Addr().Unmap()
		switch {
		case ip.Is4():
			a := ip.As4()
			b = append(b, atypIPv4)
			b = append(b, a[:]...)
		case ip.Is6():
			a := ip.As16()
			b = append(b, atypIPv6)
			b = append(b, a[:]...)
		default:
			return b, errors.New("destination has neither an address nor a name")
		}
	}
	return binary.BigEndian.AppendUint16(b, dst.Addr.Port()), nil
}

// readFull is io.ReadFull where a connection closed before the first byte
// is an unexpected EOF too: every caller expects a complete message.
func readFull(r io.Reader, b []byte) error {
	_, err := io.ReadFull(r, b)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// readAddr reads DST.ADDR and DST.PORT of type atyp.
func readAddr(r io.Reader, atyp byte) (socksAddr, error) {
	var buf [255 + 2]byte
	var a socksAddr
	switch atyp {
	case atypIPv4:
		if err := readFull(r, buf[:4+2]); err != nil {
			return a, err
		}
		a.ip = netip.AddrFrom4([4]byte(buf[:4]))
		a.port = binary.BigEndian.Uint16(buf[4:])
	case atypIPv6:
		if err := readFull(r, buf[:16+2]); err != nil {
			return a, err
		}
		a.ip = netip.AddrFrom16([16]byte(buf[:16])).Unmap()
		a.port = binary.BigEndian.Uint16(buf[16:])
	case atypDomain:
		if err := readFull(r, buf[:1]); err != nil {
			return a, err
		}
		n := int(buf[0])
		if n == 0 {
			return a, errors.New("empty name in address")
		}
		if err := readFull(r, buf[:n+2]); err != nil {
			return a, err
		}
		a.name = string(buf[:n])
		a.port = binary.BigEndian.Uint16(buf[n:])
	default:
		return a, fmt.Errorf("unknown address type %#02x", atyp)
	}
	return a, nil
}

// readMethodReply reads the server's method selection (VER, METHOD).
func readMethodReply(r io.Reader) (byte, error) {
	var b [2]byte
	if err := readFull(r, b[:]); err != nil {
		return 0, fmt.Errorf("reading method selection: %w", err)
	}
	if b[0] != socksVersion {
		return 0, fmt.Errorf("method selection has version %#02x, not SOCKS5", b[0])
	}
	return b[1], nil
}

// refusal is an error that satisfies errors.Is(err, outbound.ErrRefused)
// without "connection refused" in its text: a failed authentication or a
// session this outbound does not carry. Retrying will not help; the app
// gets a RST (or an ICMP unreachable).
type refusal string

func (r refusal) Error() string        { return string(r) }
func (r refusal) Is(target error) bool { return target == outbound.ErrRefused }

// authFailed returns the refusal for a failed authentication.
func authFailed(format string, a ...any) error {
	return refusal("authentication failed: " + fmt.Sprintf(format, a...))
}

// readAuthReply reads the RFC 1929 status (VER, STATUS).
func readAuthReply(r io.Reader) error {
	var b [2]byte
	if err := readFull(r, b[:]); err != nil {
		return fmt.Errorf("reading authentication status: %w", err)
	}
	// RFC 1929 says VER 0x01; some servers answer with 0x05.
	if b[0] != authVersion && b[0] != socksVersion {
		return fmt.Errorf("authentication status has version %#02x", b[0])
	}
	if b[1] != 0 {
		return authFailed("wrong username or password (status %#02x)", b[1])
	}
	return nil
}

// ReplyError is a SOCKS5 reply code other than success. Code 0x05
// (connection refused) satisfies errors.Is(err, outbound.ErrRefused).
type ReplyError byte

var replyText = [...]string{
	1: "general SOCKS server failure",
	2: "connection not allowed by ruleset",
	3: "network unreachable",
	4: "host unreachable",
	5: "connection refused",
	6: "TTL expired",
	7: "command not supported",
	8: "address type not supported",
}

func (e ReplyError) Error() string {
	if int(e) < len(replyText) && replyText[e] != "" {
		return fmt.Sprintf("proxy replied %#02x: %s", byte(e), replyText[e])
	}
	return fmt.Sprintf("proxy replied %#02x: unassigned reply code", byte(e))
}

// Is reports a refusal as outbound.ErrRefused.
func (e ReplyError) Is(target error) bool { return e == 0x05 && target == outbound.ErrRefused }

// readReply reads a CONNECT or UDP ASSOCIATE reply and returns BND.ADDR
// and BND.PORT. A failure code is returned as a ReplyError without reading
// the rest, which failing servers do not always send.
func readReply(r io.Reader) (socksAddr, error) {
	var b [4]byte
	if err := readFull(r, b[:]); err != nil {
		return socksAddr{}, fmt.Errorf("reading reply: %w", err)
	}
	if b[0] != socksVersion {
		return socksAddr{}, fmt.Errorf("reply has version %#02x, not SOCKS5", b[0])
	}
	if b[1] != 0 {
		return socksAddr{}, ReplyError(b[1])
	}
	a, err := readAddr(r, b[3])
	if err != nil {
		return socksAddr{}, fmt.Errorf("reading reply: %w", err)
	}
	return a, nil
}

// UDP header parse failures; each is counted by its own counter.
var (
	errFragment   = errors.New("fragmented datagram")
	errNameSource = errors.New("source is a name, not an address")
)

// udpHeaderMax is the longest RFC 1928 §7 header: RSV, FRAG, ATYP, a
// 255-byte name and its length, DST.PORT.
const udpHeaderMax = 2 + 1 + 1 + 1 + 255 + 2

// appendUDPHeader appends the RFC 1928 §7 header for a datagram to dst.
func appendUDPHeader(b []byte, dst outbound.Target) ([]byte, error) {
	b = append(b, 0, 0, 0) // RSV, FRAG
	return appendAddr(b, dst)
}

// parseUDPHeader parses the RFC 1928 §7 header at the start of b and
// returns the datagram's remote and where its payload starts. Fragments
// give errFragment and names errNameSource.
func parseUDPHeader(b []byte) (netip.AddrPort, int, error) {
	if len(b) < 4 {
		return netip.AddrPort{}, 0, errors.New("datagram shorter than a SOCKS5 header")
	}
	if b[2] != 0 {
		return netip.AddrPort{}, 0, errFragment
	}
	var ip netip.Addr
	var n int
	switch b[3] {
	case atypIPv4:
		n = 4 + 4 + 2
		if len(b) < n {
			return netip.AddrPort{}, 0, errors.New("truncated SOCKS5 header")
		}
		ip = netip.AddrFrom4([4]byte(b[4:8]))
	case atypIPv6:
		n = 4 + 16 + 2
		if len(b) < n {
			return netip.AddrPort{}, 0, errors.New("truncated SOCKS5 header")
		}
		ip = netip.AddrFrom16([16]byte(b[4:20])).Unmap()
	case atypDomain:
		return netip.AddrPort{}, 0, errNameSource
	default:
		return netip.AddrPort{}, 0, fmt.Errorf("unknown address type %#02x", b[3])
	}
	return netip.AddrPortFrom(ip, binary.BigEndian.Uint16(b[n-2:n])), n, nil
}
