package loopguard

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// New returns a detector for cfg. It opens two netlink sockets (sock_diag,
// and rtnetlink to find the TUN) in the calling thread's network
// namespace, tungate's, where the TUN is or will be; Close releases them.
func New(cfg Config, log *slog.Logger) (*Detector, error) {
	sd, err := newSockDiag(cfg.Tun)
	if err != nil {
		return nil, fmt.Errorf("loop detection: %w", err)
	}
	d := newLoopDetector(cfg, log, sd.find, ownsInode)
	d.closeFn = sd.close
	return d, nil
}

// sock_diag constants (linux/inet_diag.h).
const (
	inetDiagReqV2Len = 56 // struct inet_diag_req_v2
	inetDiagMsgLen   = 72 // struct inet_diag_msg
	inetDiagMark     = 15 // INET_DIAG_MARK
	diagTimeout      = time.Second
)

// sockDiag asks the kernel about single sockets (exact lookups, not dumps),
// one question at a time over one netlink socket.
type sockDiag struct {
	tun      string
	links    *netlink.Handle // finds the TUN's index, in the same namespace
	tunIndex atomic.Int32    // 0 until resolved

	mu  sync.Mutex
	fd  int
	seq uint32
	buf []byte
}

func newSockDiag(tun string) (*sockDiag, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	tv := unix.NsecToTimeval(diagTimeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	links, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink: %w", err)
	}
	if err := links.SetSocketTimeout(diagTimeout); err != nil {
		links.Close()
		unix.Close(fd)
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return &sockDiag{tun: tun, links: links, fd: fd, buf: make([]byte, 8192)}, nil
}

func (s *sockDiag) close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd < 0 {
		return nil
	}
	err := unix.Close(s.fd)
	s.fd = -1
	s.links.Close()
	return err
}

// find returns the local socket that sends src→dst. The lookup is made on
// the TUN (where the flow arrived): it finds an unbound socket as well as
// one bound to the TUN (a socket bound to a device is only found by a
// lookup on that device).
func (s *sockDiag) find(network string, src, dst netip.AddrPort) (sockInfo, error) {
	var proto uint8
	switch network {
	case "tcp":
		proto = unix.IPPROTO_TCP
	case "udp":
		proto = unix.IPPROTO_UDP
	default:
		return sockInfo{}, fmt.Errorf("network %q: %w", network, errNoSocket)
	}
	return s.query(proto, src, dst, uint32(s.tunIndexOf()))
}

func (s *sockDiag) tunIndexOf() int {
	if idx := s.tunIndex.Load(); idx > 0 {
		return int(idx)
	}
	if s.tun == "" {
		return 0
	}
	link, err := s.links.LinkByName(s.tun)
	if err != nil {
		return 0
	}
	s.tunIndex.Store(int32(link.Attrs().Index))
	return link.Attrs().Index
}

// query is one SOCK_DIAG_BY_FAMILY exact lookup of the socket whose local
// address is local and whose peer is remote.
func (s *sockDiag) query(proto uint8, local, remote netip.AddrPort, ifindex uint32) (sockInfo, error) {
	fam := uint8(unix.AF_INET)
	if local.Addr().Is6() {
		fam = unix.AF_INET6
	}
	// The kernel's exact lookups read the request's "src" as the local
	// end for TCP (inet_diag_find_one_icsk) but as the remote end for
	// UDP (udp_dump_one: "src and dst are swapped for historical
	// reasons").
	reqSrc, reqDst := local, remote
	if proto == unix.IPPROTO_UDP {
		reqSrc, reqDst = remote, local
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fd < 0 {
		return sockInfo{}, errors.New("sock_diag socket closed")
	}
	s.seq++
	seq := s.seq
	msg := make([]byte, unix.NLMSG_HDRLEN+inetDiagReqV2Len)
	ne := binary.NativeEndian
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint16(msg[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(msg[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(msg[8:], seq)
	req := msg[unix.NLMSG_HDRLEN:]
	req[0] = fam
	req[1] = proto
	ne.PutUint32(req[4:], 0xffffffff) // every state
	id := req[8:]
	binary.BigEndian.PutUint16(id[0:], reqSrc.Port())
	binary.BigEndian.PutUint16(id[2:], reqDst.Port())
	putAddr(id[4:20], reqSrc.Addr())
	putAddr(id[20:36], reqDst.Addr())
	ne.PutUint32(id[36:], ifindex)
	ne.PutUint32(id[40:], 0xffffffff) // INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], 0xffffffff)
	if err := unix.Sendto(s.fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return sockInfo{}, fmt.Errorf("sock_diag send: %w", err)
	}
	for {
		n, _, err := unix.Recvfrom(s.fd, s.buf, 0)
		if err != nil {
			return sockInfo{}, fmt.Errorf("sock_diag receive: %w", err)
		}
		info, done, err := parseDiagReply(s.buf[:n], seq)
		if done {
			return info, err
		}
		// A late reply to an earlier, timed-out question: read on.
	}
}

func putAddr(b []byte, a netip.Addr) {
	if a.Is4() {
		v4 := a.As4()
		copy(b, v4[:])
		return
	}
	v6 := a.As16()
	copy(b, v6[:])
}

// parseDiagReply reads the answer to question seq from one datagram. done
// is false when the datagram answers another question.
func parseDiagReply(b []byte, seq uint32) (info sockInfo, done bool, err error) {
	ne := binary.NativeEndian
	for len(b) >= unix.NLMSG_HDRLEN {
		l := int(ne.Uint32(b[0:]))
		typ := ne.Uint16(b[4:])
		mseq := ne.Uint32(b[8:])
		if l < unix.NLMSG_HDRLEN || l > len(b) {
			return sockInfo{}, true, errors.New("sock_diag: malformed reply")
		}
		body := b[unix.NLMSG_HDRLEN:l]
		next := (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
		if mseq != seq {
			b = b[min(next, len(b)):]
			continue
		}
		switch typ {
		case unix.NLMSG_ERROR:
			if len(body) < 4 {
				return sockInfo{}, true, errors.New("sock_diag: short error")
			}
			errno := -int32(ne.Uint32(body))
			switch unix.Errno(errno) {
			case 0:
				return sockInfo{}, true, errNoSocket
			case unix.ENOENT:
				return sockInfo{}, true, errNoSocket
			default:
				return sockInfo{}, true, fmt.Errorf("sock_diag: %w", unix.Errno(errno))
			}
		case unix.SOCK_DIAG_BY_FAMILY:
			if len(body) < inetDiagMsgLen {
				return sockInfo{}, true, errors.New("sock_diag: short answer")
			}
			info.Inode = ne.Uint32(body[68:])
			attrs := body[inetDiagMsgLen:]
			for len(attrs) >= 4 {
				al := int(ne.Uint16(attrs[0:]))
				at := ne.Uint16(attrs[2:])
				if al < 4 || al > len(attrs) {
					break
				}
				if at == inetDiagMark && al >= 8 {
					info.Mark, info.HasMark = ne.Uint32(attrs[4:]), true
				}
				attrs = attrs[min((al+3)&^3, len(attrs)):]
			}
			return info, true, nil
		default:
			b = b[min(next, len(b)):]
		}
	}
	return sockInfo{}, false, nil
}

// ownsInode reports whether one of this process's open files is the
// socket with this inode.
func ownsInode(inode uint32) bool {
	dir, err := os.Open("/proc/self/fd")
	if err != nil {
		return false
	}
	defer dir.Close()
	want := "socket:[" + strconv.FormatUint(uint64(inode), 10) + "]"
	for {
		names, err := dir.Readdirnames(256)
		for _, n := range names {
			if l, err := os.Readlink("/proc/self/fd/" + n); err == nil && l == want {
				return true
			}
		}
		if err != nil {
			return false
		}
	}
}
