package outbound

import (
	"errors"
	"net/netip"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

var _ BatchWriter = (*directUDP)(nil)

const (
	// udpMaxSegments is the most datagrams one UDP_SEGMENT send may carry
	// (the kernel's UDP_MAX_SEGMENTS before Linux 6.10 raised it).
	udpMaxSegments = 64
	// udpMaxGSOPayload bounds the bytes of one UDP_SEGMENT send, which is
	// a single IPv4 datagram until the kernel splits it.
	udpMaxGSOPayload = 65507
	// maxBatch bounds the messages of one sendmmsg call.
	maxBatch = 64
)

// mmsghdr is struct mmsghdr: a msghdr and the byte count the kernel
// writes back, padded to the msghdr's alignment.
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
	_   [unsafe.Sizeof(uintptr(0)) - 4]byte
}

// udpBatch is directUDP's WriteBatch state: the message arrays are kept
// between calls so that a batch allocates nothing.
type udpBatch struct {
	mu     sync.Mutex
	msgs   []mmsghdr
	iovs   []unix.Iovec
	names  []unix.RawSockaddrInet6 // large enough for either family
	cmsgs  []byte
	runs   []gsoRun
	gsoOff atomic.Bool // the kernel refused UDP_SEGMENT on this socket

	// The sendmmsg call's closure and its in and out values live here,
	// made once, so that a call allocates nothing.
	send      func(fd uintptr) bool
	sendMsgs  []mmsghdr
	sendN     int
	sendErrno unix.Errno
}

// gsoRun is one message of a batch: datagrams [first, first+count) of ds,
// of one size (the last may be shorter) to one destination, sent as one
// UDP_SEGMENT message when count > 1.
type gsoRun struct {
	first, count int
	to           netip.AddrPort
}

// cmsgSpace is the room one UDP_SEGMENT control message takes.
var cmsgSpace = unix.CmsgSpace(2)

// WriteBatch implements BatchWriter. Consecutive datagrams of one size to
// one destination leave as a single UDP_SEGMENT message (generic
// segmentation offload: one trip down the stack for up to 64 datagrams,
// split by the NIC or at the last moment), and all of a batch's messages
// leave in one sendmmsg. Where the kernel refuses segmentation offload the
// socket falls back to one message per datagram for good.
func (u *directUDP) WriteBatch(ds []Datagram) (int, error) {
	b := &u.batch
	b.mu.Lock()
	defer b.mu.Unlock()

	b.runs = b.runs[:0]
	var firstErr error
	gso := !b.gsoOff.Load()
	joinable := false // whether ds[i] may join the last run
	for i := range ds {
		to, err := u.dest(ds[i].Dst)
		if err != nil {
			firstErr = cmp(firstErr, err)
			joinable = false // a run's datagrams are consecutive in ds
			continue
		}
		if gso && joinable {
			r := &b.runs[len(b.runs)-1]
			size := len(ds[r.first].Payload)
			n := len(ds[i].Payload)
			if r.to == to && len(ds[i-1].Payload) == size && n <= size && n > 0 &&
				r.count < udpMaxSegments && (r.count+1)*size <= udpMaxGSOPayload {
				r.count++
				continue
			}
		}
		b.runs = append(b.runs, gsoRun{first: i, count: 1, to: to})
		joinable = true
	}

	sent, err := u.sendRuns(ds)
	if err != nil {
		firstErr = cmp(firstErr, err)
	}
	return sent, firstErr
}

// sendRuns sends b.runs, one message each. On a message the kernel refuses
// it drops that message's datagrams and goes on with the next, except that
// a refused UDP_SEGMENT message is split and retried one datagram at a
// time.
func (u *directUDP) sendRuns(ds []Datagram) (int, error) {
	b := &u.batch
	sent := 0
	var firstErr error
	for start := 0; start < len(b.runs); {
		end := min(start+maxBatch, len(b.runs))
		u.build(ds, b.runs[start:end])
		msgs := b.msgs[:end-start]
		retried := -1 // the message last sent again after an ICMP error
		for i := 0; i < len(msgs); {
			n, err := u.sendmmsg(msgs[i:])
			if err == nil {
				for _, r := range b.runs[start+i : start+i+n] {
					sent += r.count
				}
				i += n
				continue
			}
			if errors.Is(err, unix.EAGAIN) {
				// The socket buffer is full: the rest would fail alike.
				return sent, cmp(firstErr, err)
			}
			if retried != i && u.tookICMPError() {
				// An ICMP error about an earlier datagram failed this
				// call, not this message: send it again, once.
				retried = i
				continue
			}
			r := b.runs[start+i]
			if r.count > 1 {
				// The kernel takes UDP_SEGMENT only when the device can
				// checksum (EIO otherwise) and each datagram fits the
				// path MTU (EINVAL): send this run one by one.
				if errors.Is(err, unix.EIO) {
					b.gsoOff.Store(true)
				}
				for _, d := range ds[r.first : r.first+r.count] {
					if serr := u.sendOne(d.Payload, r.to); serr != nil {
						firstErr = cmp(firstErr, serr)
						continue
					}
					sent++
				}
				i++
				continue
			}
			firstErr = cmp(firstErr, err)
			i++
		}
		start = end
	}
	return sent, firstErr
}

// build fills b.msgs for runs.
func (u *directUDP) build(ds []Datagram, runs []gsoRun) {
	b := &u.batch
	iovCount := 0
	for _, r := range runs {
		iovCount += r.count
	}
	b.msgs = grow(b.msgs, len(runs))
	b.iovs = grow(b.iovs, iovCount)
	b.names = grow(b.names, len(runs))
	b.cmsgs = grow(b.cmsgs, len(runs)*cmsgSpace)
	iov := 0
	for i, r := range runs {
		m := &b.msgs[i]
		*m = mmsghdr{}
		for j, d := range ds[r.first : r.first+r.count] {
			v := &b.iovs[iov+j]
			v.Base = unsafe.SliceData(d.Payload)
			v.SetLen(len(d.Payload))
		}
		m.hdr.Iov = &b.iovs[iov]
		m.hdr.SetIovlen(r.count)
		iov += r.count
		m.hdr.Name, m.hdr.Namelen = putSockaddr(&b.names[i], r.to)
		if r.count > 1 {
			c := b.cmsgs[i*cmsgSpace : (i+1)*cmsgSpace]
			clear(c)
			h := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
			h.Level = unix.SOL_UDP
			h.Type = unix.UDP_SEGMENT
			h.SetLen(unix.CmsgLen(2))
			*(*uint16)(unsafe.Pointer(&c[unix.CmsgLen(0)])) = uint16(len(ds[r.first].Payload))
			m.hdr.Control = &c[0]
			m.hdr.SetControllen(cmsgSpace)
		}
	}
}

// sendmmsg sends msgs and returns how many left. It never waits: with
// the socket buffer full it fails with EAGAIN.
func (u *directUDP) sendmmsg(msgs []mmsghdr) (int, error) {
	b := &u.batch
	if b.send == nil {
		b.send = func(fd uintptr) bool {
			r, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.sendMsgs[0])), uintptr(len(b.sendMsgs)), unix.MSG_DONTWAIT, 0, 0)
			b.sendN, b.sendErrno = int(r), errno
			return true
		}
	}
	b.sendMsgs = msgs
	err := u.raw.Write(b.send)
	b.sendMsgs = nil
	if err != nil {
		return 0, err
	}
	if b.sendErrno != 0 {
		return 0, b.sendErrno
	}
	if b.sendN == 0 {
		return 0, unix.EIO // no progress and no error: never expected
	}
	return b.sendN, nil
}

// putSockaddr writes ap into sa as a struct sockaddr_in or sockaddr_in6
// and returns the pointer and length a msghdr takes.
func putSockaddr(sa *unix.RawSockaddrInet6, ap netip.AddrPort) (*byte, uint32) {
	*sa = unix.RawSockaddrInet6{}
	port := (*[2]byte)(unsafe.Pointer(&sa.Port))
	port[0], port[1] = byte(ap.Port()>>8), byte(ap.Port())
	if ap.Addr().Is4() {
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		sa4.Family = unix.AF_INET
		sa4.Addr = ap.Addr().As4()
		return (*byte)(unsafe.Pointer(sa)), unix.SizeofSockaddrInet4
	}
	sa.Family = unix.AF_INET6
	sa.Addr = ap.Addr().As16()
	return (*byte)(unsafe.Pointer(sa)), unix.SizeofSockaddrInet6
}

// grow returns s with length n, reusing its array when it is big enough.
func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	return s[:n]
}

// cmp keeps the first error.
func cmp(first, err error) error {
	if first != nil {
		return first
	}
	return err
}
