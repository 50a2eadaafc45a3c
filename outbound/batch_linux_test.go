//go:build linux

package outbound

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// batchFamily is one address family the batch tests run over.
type batchFamily struct {
	name     string
	network  string     // of the receivers
	loopback netip.Addr // where the receivers listen
	other    netip.Addr // an address of the other family
	v6       bool
}

var batchFamilies = []batchFamily{
	{"IPv4", "udp4", netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1"), false},
	{"IPv6", "udp6", netip.MustParseAddr("::1"), netip.MustParseAddr("127.0.0.1"), true},
}

// batchReceiver listens on a loopback address of f with a receive buffer
// big enough for the largest case, and is closed when the test ends.
func batchReceiver(t testing.TB, f batchFamily) (*net.UDPConn, netip.AddrPort) {
	t.Helper()
	c, err := net.ListenUDP(f.network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(f.loopback, 0)))
	if err != nil {
		t.Skipf("no %s loopback here: %v", f.name, err)
	}
	t.Cleanup(func() { c.Close() })
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20)
	}); err != nil {
		t.Fatal(err)
	}
	if serr != nil { // not privileged: take what rmem_max allows
		if err := c.SetReadBuffer(16 << 20); err != nil {
			t.Fatal(err)
		}
	}
	return c, netip.MustParseAddrPort(c.LocalAddr().String())
}

// batchSession opens a Direct UDP session of f's family, closed when the
// test ends.
func batchSession(t testing.TB, f batchFamily, first netip.AddrPort) *directUDP {
	t.Helper()
	d, err := NewDirect(DirectConfig{Name: "direct"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := d.ListenUDP(context.Background(), Target{Addr: first})
	if err != nil {
		t.Fatalf("ListenUDP: %v", err)
	}
	t.Cleanup(func() { pc.Close() })
	u := pc.(*directUDP)
	if u.v6 != f.v6 {
		t.Fatalf("ListenUDP towards %s opened a v6=%v session", first, u.v6)
	}
	return u
}

// item is one datagram of a case: to receiver 'A' or 'B'; to 'X', an
// address of the other family, which the session cannot reach; or to 'Z',
// port 0 of the loopback address, which the kernel refuses (EINVAL).
type item struct {
	to   byte
	size int
}

func rep(n int, to byte, size int) []item {
	s := make([]item, n)
	for i := range s {
		s[i] = item{to, size}
	}
	return s
}

func cat(parts ...[]item) []item { return slices.Concat(parts...) }

// batchPayload is datagram seq's bytes: the sequence number, then a pattern
// that differs from one datagram to the next and along the datagram.
func batchPayload(seq, size int) []byte {
	p := make([]byte, size)
	for i := range p {
		p[i] = byte(seq*131 + i*7 + i>>8)
	}
	if size >= 4 {
		binary.BigEndian.PutUint32(p, uint32(seq))
	}
	return p
}

// batchCase is one WriteBatch call and what it must do.
type batchCase struct {
	name  string
	items []item
	// runs are the datagram counts of the messages WriteBatch builds
	// with segmentation offload on (off, every message is one datagram).
	runs []int
}

func alternate(n, size int) []item {
	s := make([]item, n)
	for i := range s {
		s[i] = item{"AB"[i%2], size + i%3*100}
	}
	return s
}

func ones(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = 1
	}
	return s
}

var batchCases = []batchCase{
	{"empty batch", nil, nil},
	{"40x1200 to A: one run", rep(40, 'A', 1200), []int{40}},
	{"short datagram ends its run", cat(rep(3, 'A', 1200), rep(1, 'A', 700), rep(1, 'A', 1200)), []int{4, 1}},
	{"short after short", cat(rep(1, 'A', 1200), rep(2, 'A', 700)), []int{2, 1}},
	{"a larger datagram starts a new run", []item{{'A', 500}, {'A', 1000}, {'A', 1000}, {'A', 1500}}, []int{1, 2, 1}},
	{"alternating A/B", alternate(20, 1200), ones(20)},
	{"same size, other destination", cat(rep(3, 'A', 1200), rep(3, 'B', 1200), rep(2, 'A', 1200)), []int{3, 3, 2}},
	{"run over 64 datagrams splits at 64", rep(150, 'A', 1000), []int{64, 64, 22}},
	{"run over 65507 bytes splits", rep(60, 'A', 1400), []int{46, 14}},
	{"largest datagrams", rep(3, 'B', 65507), []int{1, 1, 1}},
	{"zero-length datagrams", cat(rep(3, 'A', 1200), rep(1, 'A', 0), rep(2, 'A', 1200), rep(1, 'A', 0), rep(1, 'B', 0), rep(2, 'B', 9)), []int{3, 1, 2, 1, 1, 2}},
	{"wrong family in the middle", cat(rep(10, 'A', 1200), rep(1, 'X', 1200), rep(10, 'A', 1200)), []int{10, 10}},
	{"wrong family only", rep(3, 'X', 100), nil},
	{"refused destination in the middle", cat(rep(5, 'A', 1000), rep(1, 'Z', 1000), rep(5, 'A', 1000)), []int{5, 1, 5}},
	{"refused run", cat(rep(3, 'A', 1000), rep(4, 'Z', 1000), rep(2, 'B', 1000)), []int{3, 4, 2}},
	{"more than 64 messages", cat(alternate(150, 300), rep(70, 'B', 512), rep(1, 'X', 512), rep(5, 'A', 1)), catRuns(ones(150), []int{64, 6, 5})},
}

func catRuns(parts ...[]int) []int { return slices.Concat(parts...) }

// batchResult is what one WriteBatch call did, as seen from outside.
type batchResult struct {
	sent int
	err  error
	runs []int
	got  map[byte][][]byte // per receiver, in arrival order
}

// runBatchCase sends tc through u and checks what A and B receive.
func runBatchCase(t *testing.T, f batchFamily, u *directUDP, recv map[byte]*net.UDPConn, addrs map[byte]netip.AddrPort, tc batchCase) batchResult {
	t.Helper()
	var (
		ds       []Datagram
		want     = map[byte][][]byte{}
		valid    int // datagrams that must arrive
		routable int // datagrams to this session's family
	)
	for seq, it := range tc.items {
		p := batchPayload(seq, it.size)
		var dst netip.AddrPort
		switch it.to {
		case 'A', 'B':
			dst = addrs[it.to]
			want[it.to] = append(want[it.to], p)
			valid++
			routable++
		case 'X':
			dst = netip.AddrPortFrom(f.other, addrs['A'].Port())
		case 'Z':
			dst = netip.AddrPortFrom(f.loopback, 0)
			routable++
		default:
			t.Fatalf("item to %q", it.to)
		}
		ds = append(ds, Datagram{Payload: p, Dst: Target{Addr: dst}})
	}
	before := slices.Clone(ds)

	sent, err := u.WriteBatch(ds)

	res := batchResult{sent: sent, err: err, got: map[byte][][]byte{}}
	for _, r := range u.batch.runs {
		res.runs = append(res.runs, r.count)
	}
	if sent != valid {
		t.Errorf("WriteBatch sent %d, want %d", sent, valid)
	}
	if wrong := len(tc.items) - valid; wrong > 0 && err == nil {
		t.Errorf("WriteBatch with %d datagrams it cannot send: no error", wrong)
	} else if wrong == 0 && err != nil {
		t.Errorf("WriteBatch: %v", err)
	}
	if routable == len(tc.items) && valid < routable && !errors.Is(err, unix.EINVAL) {
		t.Errorf("WriteBatch with datagrams to port 0: err %v, want EINVAL", err)
	}
	for i := range ds {
		if !bytes.Equal(ds[i].Payload, before[i].Payload) || ds[i].Dst != before[i].Dst {
			t.Fatalf("WriteBatch changed datagram %d", i)
		}
	}
	wantRuns := tc.runs
	if u.batch.gsoOff.Load() {
		wantRuns = ones(routable)
	}
	if !slices.Equal(res.runs, wantRuns) {
		t.Errorf("messages of %v datagrams, want %v", res.runs, wantRuns)
	}

	local := netip.MustParseAddrPort(u.conn.LocalAddr().String())
	buf := make([]byte, 1<<16)
	for _, name := range []byte("AB") {
		c := recv[name]
		for len(res.got[name]) < len(want[name]) {
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("receiver %c: %d of %d datagrams, then %v", name, len(res.got[name]), len(want[name]), err)
			}
			if from.Port() != local.Port() {
				t.Fatalf("receiver %c: datagram from %s, not the session (port %d)", name, from, local.Port())
			}
			res.got[name] = append(res.got[name], bytes.Clone(buf[:n]))
		}
		// Nothing more came of the batch: the next datagram is one sent
		// after it.
		sentinel := []byte("sentinel " + tc.name)
		if err := u.WritePacket(sentinel, Target{Addr: addrs[name]}); err != nil {
			t.Fatalf("WritePacket(sentinel): %v", err)
		}
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("receiver %c: sentinel: %v", name, err)
		}
		if !bytes.Equal(buf[:n], sentinel) {
			t.Errorf("receiver %c: after the %d datagrams expected, got another: %s", name, len(want[name]), describe(buf[:n]))
		}
		if !slices.EqualFunc(res.got[name], want[name], bytes.Equal) {
			t.Errorf("receiver %c got %s,\nwant %s", name, describeAll(res.got[name]), describeAll(want[name]))
		}
	}
	return res
}

func describe(p []byte) string {
	if len(p) < 4 {
		return fmt.Sprintf("[%d B %x]", len(p), p)
	}
	return fmt.Sprintf("[seq %d, %d B]", binary.BigEndian.Uint32(p), len(p))
}

func describeAll(ps [][]byte) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = describe(p)
	}
	return fmt.Sprint(s)
}

// TestWriteBatch sends each case with segmentation offload and without,
// over both families, and checks that every datagram the session can
// reach arrives as a datagram of its own, byte for byte and in order, and
// that the two ways agree.
func TestWriteBatch(t *testing.T) {
	for _, f := range batchFamilies {
		t.Run(f.name, func(t *testing.T) {
			a, aAddr := batchReceiver(t, f)
			b, bAddr := batchReceiver(t, f)
			recv := map[byte]*net.UDPConn{'A': a, 'B': b}
			addrs := map[byte]netip.AddrPort{'A': aAddr, 'B': bAddr}

			gso := batchSession(t, f, aAddr)
			noGSO := batchSession(t, f, aAddr)
			noGSO.batch.gsoOff.Store(true)
			for _, tc := range batchCases {
				t.Run(tc.name, func(t *testing.T) {
					var with, without batchResult
					t.Run("gso", func(t *testing.T) {
						with = runBatchCase(t, f, gso, recv, addrs, tc)
						if gso.batch.gsoOff.Load() {
							t.Fatal("the kernel refused UDP_SEGMENT on loopback: segmentation offload is off")
						}
					})
					t.Run("no gso", func(t *testing.T) {
						without = runBatchCase(t, f, noGSO, recv, addrs, tc)
					})
					if with.sent != without.sent || (with.err == nil) != (without.err == nil) {
						t.Errorf("with GSO sent %d (err %v), without %d (err %v)", with.sent, with.err, without.sent, without.err)
					}
					for _, name := range []byte("AB") {
						if !slices.EqualFunc(with.got[name], without.got[name], bytes.Equal) {
							t.Errorf("receiver %c got %s with GSO, %s without", name, describeAll(with.got[name]), describeAll(without.got[name]))
						}
					}
				})
			}
		})
	}
}

// TestWriteBatchGSORefused: where the kernel refuses a UDP_SEGMENT
// message for its destination (not with EIO, which means never on this
// socket), that run's datagrams go one at a time, the rest of the batch
// still in one sendmmsg, and segmentation offload stays on.
func TestWriteBatchGSORefused(t *testing.T) {
	for _, f := range batchFamilies {
		t.Run(f.name, func(t *testing.T) {
			a, aAddr := batchReceiver(t, f)
			b, bAddr := batchReceiver(t, f)
			u := batchSession(t, f, aAddr)
			// IPv4: no checksums, which UDP_SEGMENT needs (EINVAL).
			// IPv6: a path MTU below the segment size (EINVAL or
			// EMSGSIZE); a datagram on its own is fragmented.
			level, opt, val := unix.SOL_SOCKET, unix.SO_NO_CHECK, 1
			if f.v6 {
				level, opt, val = unix.IPPROTO_IPV6, unix.IPV6_MTU, 1280
			}
			raw, _ := u.conn.SyscallConn()
			var serr error
			raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, val) })
			if serr != nil {
				t.Skipf("setsockopt: %v", serr)
			}
			// The kernel must refuse the same message sent by hand, or
			// this test proves nothing.
			if err := sendGSOByHand(u, aAddr, 1400, 4); err == nil {
				t.Fatal("the kernel took a UDP_SEGMENT message it should refuse; the test needs another way to make it")
			} else {
				t.Logf("UDP_SEGMENT by hand: %v", err)
			}

			recv := map[byte]*net.UDPConn{'A': a, 'B': b}
			addrs := map[byte]netip.AddrPort{'A': aAddr, 'B': bAddr}
			tc := batchCase{
				name:  "refused runs",
				items: cat(rep(10, 'A', 1400), rep(1, 'B', 1400), rep(5, 'A', 1400), rep(3, 'B', 1300)),
				runs:  []int{10, 1, 5, 3},
			}
			runBatchCase(t, f, u, recv, addrs, tc)
			if u.batch.gsoOff.Load() {
				t.Error("segmentation offload turned off for good on an error other than EIO")
			}
		})
	}
}

// sendGSOByHand sends count datagrams of size to dst as one UDP_SEGMENT
// message, the way build does, and returns the kernel's answer.
func sendGSOByHand(u *directUDP, dst netip.AddrPort, size, count int) error {
	oob := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], uint16(size))
	raw, err := u.conn.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		_, serr = unix.SendmsgN(int(fd), make([]byte, size*count), oob, sockaddr(dst), unix.MSG_DONTWAIT)
	}); err != nil {
		return err
	}
	return serr
}

// TestWriteBatchClosed: a batch on a closed session sends nothing and
// says why, without waiting.
func TestWriteBatchClosed(t *testing.T) {
	f := batchFamilies[0]
	_, aAddr := batchReceiver(t, f)
	u := batchSession(t, f, aAddr)
	u.Close()
	ds := []Datagram{
		{Payload: batchPayload(0, 100), Dst: Target{Addr: aAddr}},
		{Payload: batchPayload(1, 100), Dst: Target{Addr: aAddr}},
		{Payload: batchPayload(2, 50), Dst: Target{Addr: aAddr}},
		{Payload: batchPayload(3, 100), Dst: Target{Addr: aAddr}},
	}
	done := make(chan struct{})
	var (
		sent int
		err  error
	)
	go func() {
		defer close(done)
		sent, err = u.WriteBatch(ds)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("WriteBatch on a closed session still waiting after 2 s")
	}
	if sent != 0 || err == nil {
		t.Errorf("WriteBatch on a closed session: sent %d, err %v; want 0 and an error", sent, err)
	}
}

// BenchmarkWriteBatch sends batches of 32 datagrams of 1400 B, one
// UDP_SEGMENT message each, to a loopback receiver.
func BenchmarkWriteBatch(b *testing.B) {
	for _, gso := range []bool{true, false} {
		name := "gso"
		if !gso {
			name = "no gso"
		}
		b.Run(name, func(b *testing.B) {
			f := batchFamilies[0]
			rc, addr := batchReceiver(b, f)
			u := batchSession(b, f, addr)
			u.batch.gsoOff.Store(!gso)
			drained := make(chan struct{})
			go func() {
				defer close(drained)
				buf := make([]byte, 1<<16)
				for {
					if _, err := rc.Read(buf); err != nil {
						return
					}
				}
			}()
			b.Cleanup(func() { rc.Close(); <-drained })

			const n, size = 32, 1400
			ds := make([]Datagram, n)
			for i := range ds {
				ds[i] = Datagram{Payload: batchPayload(i, size), Dst: Target{Addr: addr}}
			}
			b.SetBytes(n * size)
			b.ReportAllocs()
			for b.Loop() {
				if sent, err := u.WriteBatch(ds); sent != n || err != nil {
					b.Fatalf("WriteBatch: sent %d of %d: %v", sent, n, err)
				}
			}
			if u.batch.gsoOff.Load() != !gso {
				b.Fatalf("gsoOff = %v", u.batch.gsoOff.Load())
			}
		})
	}
}
