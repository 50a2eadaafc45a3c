package netstack_test

// The test harness, in the spirit of wireguard-go's tun/tuntest: an
// in-memory fake Device under the Stack, wired to a second, ordinary gVisor
// stack (the "client") that stands for the apps behind the TUN. Packets the
// client sends come out of its channel endpoint and are returned by the fake
// device's Read; packets the Stack writes to the fake device are injected
// into the client stack.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/tungate/tungate/netstack"
	"github.com/tungate/tungate/tun/virtio"
)

const (
	testMTU = 1500
	// waitFor bounds every wait for something that should happen promptly.
	waitFor = 5 * time.Second
)

var (
	client4 = netip.MustParseAddr("172.19.0.1")
	client6 = netip.MustParseAddr("fdfe:dcba:9876::1")
	remote4 = netip.MustParseAddrPort("10.233.1.5:80")
	remote6 = netip.MustParseAddrPort("[fd00:233:1::5]:80")
)

func defaultConfig() netstack.Config {
	return netstack.Config{MTU: testMTU, MaxInFlight: 16}
}

// errDeviceClosed is what the fake device returns once closed.
var errDeviceClosed = errors.New("fake device: closed")

func isClosed(err error) bool { return errors.Is(err, errDeviceClosed) }

// fakeDevice is an in-memory netstack.Device. Packets queued with inject
// are returned by ReadFrame; packets passed to WriteFrame go to out.
//
// With virtio set it plays the kernel's part of a TUN with offloads: frames
// carry a virtio-net header, injected packets get an empty one (complete
// checksums), and written frames are segmented and have their partial
// checksums completed before out sees them, as the kernel would before
// delivering them.
type fakeDevice struct {
	in        chan []byte
	closed    chan struct{}
	closeOnce sync.Once
	out       func(pkt []byte) // called with a copy of every written packet
	virtio    bool
	gsoFrames atomic.Int64 // written frames that asked for segmentation
}

func newFakeDevice(out func([]byte)) *fakeDevice {
	return &fakeDevice{
		in:     make(chan []byte, 4096),
		closed: make(chan struct{}),
		out:    out,
	}
}

// ReadFrame implements netstack.Device.ReadFrame.
func (d *fakeDevice) ReadFrame(b []byte) (int, error) {
	var p []byte
	select {
	case <-d.closed:
		return 0, errDeviceClosed
	case p = <-d.in:
	}
	if d.virtio && !isFrame(p) {
		clear(b[:virtio.HdrLen])
		return virtio.HdrLen + copy(b[virtio.HdrLen:], p), nil
	}
	if d.virtio {
		p = p[len(rawFrameTag):]
	}
	if len(b) < len(p) {
		return 0, fmt.Errorf("fake device: buffer of %d bytes too small for %d", len(b), len(p))
	}
	return copy(b, p), nil
}

// rawFrameTag marks an injected slice that is already a whole frame
// (virtio-net header included), for tests that build their own headers.
const rawFrameTag = "\x00frame:"

func isFrame(p []byte) bool { return bytes.HasPrefix(p, []byte(rawFrameTag)) }

// WriteFrame implements netstack.Device.WriteFrame.
func (d *fakeDevice) WriteFrame(b []byte) (int, error) {
	select {
	case <-d.closed:
		return 0, errDeviceClosed
	default:
	}
	if d.out == nil {
		return len(b), nil
	}
	if !d.virtio {
		d.out(bytes.Clone(b))
		return len(b), nil
	}
	h, err := virtio.Decode(b)
	if err != nil {
		return 0, err
	}
	if h.GSOType != virtio.GSONone {
		d.gsoFrames.Add(1)
	}
	segs, err := kernelSegment(h, b[virtio.HdrLen:])
	if err != nil {
		return 0, err
	}
	for _, seg := range segs {
		d.out(seg)
	}
	return len(b), nil
}

// VirtioHdr implements netstack.Device.VirtioHdr.
func (d *fakeDevice) VirtioHdr() bool { return d.virtio }

// kernelSegment does what the kernel does with a frame from a TUN with
// offloads: cut a TSO super-packet into MSS-sized segments and complete
// the partial checksums.
func kernelSegment(h virtio.Hdr, pkt []byte) ([][]byte, error) {
	if h.GSOType == virtio.GSONone {
		p := bytes.Clone(pkt)
		if h.Flags&virtio.FlagNeedsCsum != 0 {
			at := int(h.CsumStart) + int(h.CsumOffset)
			if at+2 > len(p) {
				return nil, fmt.Errorf("fake device: checksum offset %d beyond %d bytes", at, len(p))
			}
			binary.BigEndian.PutUint16(p[at:], ^checksum.Checksum(p[h.CsumStart:], 0))
		}
		return [][]byte{p}, nil
	}
	if h.GSOType != virtio.GSOTCPv4 && h.GSOType != virtio.GSOTCPv6 {
		return nil, fmt.Errorf("fake device: GSO type %d", h.GSOType)
	}
	hdrLen, mss := int(h.HdrLen), int(h.GSOSize)
	if hdrLen > len(pkt) || mss == 0 || h.Flags&virtio.FlagNeedsCsum == 0 {
		return nil, fmt.Errorf("fake device: bad GSO frame %+v for %d bytes", h, len(pkt))
	}
	l3 := int(h.CsumStart)
	payload := pkt[hdrLen:]
	var segs [][]byte
	for off := 0; off < len(payload); off += mss {
		end := min(off+mss, len(payload))
		seg := append(bytes.Clone(pkt[:hdrLen]), payload[off:end]...)
		tcp := header.TCP(seg[l3:])
		tcp.SetSequenceNumber(tcp.SequenceNumber() + uint32(off))
		if end < len(payload) {
			tcp.SetFlags(uint8(tcp.Flags() &^ (header.TCPFlagFin | header.TCPFlagPsh)))
		}
		var src, dst tcpip.Address
		if h.GSOType == virtio.GSOTCPv4 {
			ip := header.IPv4(seg)
			ip.SetTotalLength(uint16(len(seg)))
			ip.SetID(ip.ID() + uint16(len(segs)))
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
			src, dst = ip.SourceAddress(), ip.DestinationAddress()
		} else {
			ip := header.IPv6(seg)
			ip.SetPayloadLength(uint16(len(seg) - header.IPv6MinimumSize))
			src, dst = ip.SourceAddress(), ip.DestinationAddress()
		}
		tcp.SetChecksum(0)
		xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, src, dst, uint16(len(seg)-l3))
		tcp.SetChecksum(^checksum.Checksum(seg[l3:], xsum))
		segs = append(segs, seg)
	}
	return segs, nil
}

// inject queues pkt to be read by the stack, as if an app sent it. It
// gives up, returning false, when the device is closed or the stack has
// not read for waitFor.
func (d *fakeDevice) inject(pkt []byte) bool {
	select {
	case d.in <- pkt:
		return true
	default:
	}
	timer := time.NewTimer(waitFor)
	defer timer.Stop()
	select {
	case d.in <- pkt:
		return true
	case <-d.closed:
		return false
	case <-timer.C:
		return false
	}
}

// Close makes a blocked Read return errDeviceClosed.
func (d *fakeDevice) Close() { d.closeOnce.Do(func() { close(d.closed) }) }

// clientStack is an ordinary gVisor stack on the app side of the TUN.
type clientStack struct {
	s      *stack.Stack
	ep     *channel.Endpoint
	cancel context.CancelFunc
	done   chan struct{}
}

func newClientStack(t testing.TB) *clientStack {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	ep := channel.New(4096, testMTU, "")
	if err := s.CreateNIC(1, ep); err != nil {
		t.Fatalf("client CreateNIC(1, _): %s", err)
	}
	for _, a := range []struct {
		proto  tcpip.NetworkProtocolNumber
		addr   netip.Addr
		prefix int
	}{
		{ipv4.ProtocolNumber, client4, 30},
		{ipv6.ProtocolNumber, client6, 126},
	} {
		pa := tcpip.ProtocolAddress{
			Protocol:          a.proto,
			AddressWithPrefix: tcpip.AddressWithPrefix{Address: toTCPIP(a.addr), PrefixLen: a.prefix},
		}
		if err := s.AddProtocolAddress(1, pa, stack.AddressProperties{}); err != nil {
			t.Fatalf("client AddProtocolAddress(1, %s): %s", a.addr, err)
		}
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: 1},
		{Destination: header.IPv6EmptySubnet, NIC: 1},
	})
	return &clientStack{s: s, ep: ep, done: make(chan struct{})}
}

// pump moves the client's outbound packets to the device until stopped.
func (c *clientStack) pump(dev *fakeDevice) {
	ctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	go func() {
		defer close(c.done)
		for {
			pkt := c.ep.ReadContext(ctx)
			if pkt == nil {
				return
			}
			b := pkt.ToView().AsSlice()
			b = bytes.Clone(b)
			pkt.DecRef()
			if !dev.inject(b) {
				return
			}
		}
	}()
}

// deliver injects a packet the Stack wrote into the client stack.
func (c *clientStack) deliver(b []byte) {
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(b) {
	case header.IPv4Version:
		proto = ipv4.ProtocolNumber
	case header.IPv6Version:
		proto = ipv6.ProtocolNumber
	default:
		return
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	c.ep.InjectInbound(proto, pkt)
	pkt.DecRef()
}

func (c *clientStack) close() {
	if c.cancel != nil {
		c.cancel()
		<-c.done
	}
	c.s.Close()
	c.s.Wait()
	c.ep.Close()
}

// testHandler is a netstack.Handler whose behaviour each test sets.
type testHandler struct {
	tcp func(r *netstack.TCPRequest)
	udp func(src, dst netip.AddrPort, payload []byte) bool
}

func (h *testHandler) HandleTCP(r *netstack.TCPRequest) {
	if h.tcp != nil {
		h.tcp(r)
		return
	}
	r.Refuse()
}

func (h *testHandler) HandleUDP(src, dst netip.AddrPort, payload []byte) bool {
	if h.udp != nil {
		return h.udp(src, dst, payload)
	}
	return false
}

// env is a Stack over a fake device, with a client stack behind it.
type env struct {
	t      testing.TB
	dev    *fakeDevice
	s      *netstack.Stack
	client *clientStack

	// taps receive a copy of every packet the Stack writes.
	tapMu sync.Mutex
	taps  []chan []byte

	// handlers counts goroutines the test's handler started, so that
	// teardown can check they ended.
	handlers sync.WaitGroup

	closeOnce sync.Once
}

// newEnv builds and starts the Stack and the client, and tears both down
// in t.Cleanup.
func newEnv(t testing.TB, cfg netstack.Config, h netstack.Handler) *env {
	t.Helper()
	return newEnvMode(t, cfg, h, false)
}

// newEnvMode is newEnv with the device framing packets with a virtio-net
// header (offloads) or not.
func newEnvMode(t testing.TB, cfg netstack.Config, h netstack.Handler, virtio bool) *env {
	t.Helper()
	e := &env{t: t}
	e.client = newClientStack(t)
	e.dev = newFakeDevice(e.fromStack)
	e.dev.virtio = virtio
	s, err := netstack.New(e.dev, h, cfg, nil)
	if err != nil {
		e.client.close()
		t.Fatalf("netstack.New(_, _, %+v, nil): %v", cfg, err)
	}
	e.s = s
	e.client.pump(e.dev)
	s.Start(isClosed)
	t.Cleanup(e.close)
	return e
}

func (e *env) fromStack(b []byte) {
	e.tapMu.Lock()
	for _, c := range e.taps {
		select {
		case c <- b:
		default:
		}
	}
	e.tapMu.Unlock()
	e.client.deliver(b)
}

// tap returns a channel that receives (up to its buffer) the packets the
// Stack writes from now on.
func (e *env) tap() <-chan []byte {
	c := make(chan []byte, 4096)
	e.tapMu.Lock()
	e.taps = append(e.taps, c)
	e.tapMu.Unlock()
	return c
}

// close tears down in the documented order: device, then stack. It checks
// that the handler's goroutines ended (their conns were aborted).
func (e *env) close() { e.closeOnce.Do(e.teardown) }

func (e *env) teardown() {
	e.dev.Close()
	e.s.Close()
	e.client.close()
	done := make(chan struct{})
	go func() { e.handlers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(waitFor):
		e.t.Errorf("handler goroutines still running %v after Stack.Close", waitFor)
	}
}

// echo accepts r and echoes until EOF, then half-closes.
func (e *env) echo(r *netstack.TCPRequest) {
	c, err := r.Accept()
	if err != nil {
		e.t.Errorf("TCPRequest.Accept() for %s → %s: %v", r.Src(), r.Dst(), err)
		return
	}
	e.handlers.Add(1)
	go func() {
		defer e.handlers.Done()
		defer c.Close()
		if _, err := io.Copy(c, c); err != nil {
			return
		}
		c.CloseWrite()
	}()
}

func toTCPIP(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

func fromTCPIP(a tcpip.FullAddress) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.Addr.AsSlice())
	return netip.AddrPortFrom(ip, a.Port)
}

func fullAddr(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{Addr: toTCPIP(ap.Addr()), Port: ap.Port()}
}

func netProto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func clientAddrFor(dst netip.Addr) netip.Addr {
	if dst.Is4() {
		return client4
	}
	return client6
}

// clientTCP is an app's TCP connection on the client stack: a net.Conn,
// plus the endpoint for typed errors, resets and socket options.
type clientTCP struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
	wq *waiter.Queue
}

// dialTCP connects from the client stack to dst. The error is gVisor's own
// so that its kind can be checked.
func (c *clientStack) dialTCP(ctx context.Context, dst netip.AddrPort) (*clientTCP, tcpip.Error) {
	return c.dialTCPFrom(ctx, 0, dst)
}

// dialTCPFrom is dialTCP from a chosen local port (0: any).
func (c *clientStack) dialTCPFrom(ctx context.Context, port uint16, dst netip.AddrPort) (*clientTCP, tcpip.Error) {
	wq := new(waiter.Queue)
	ep, err := c.s.NewEndpoint(tcp.ProtocolNumber, netProto(dst.Addr()), wq)
	if err != nil {
		return nil, err
	}
	if port != 0 {
		ep.SocketOptions().SetReuseAddress(true)
		if err := ep.Bind(tcpip.FullAddress{Port: port}); err != nil {
			ep.Close()
			return nil, err
		}
	}
	entry, ch := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	err = ep.Connect(fullAddr(dst))
	if _, ok := err.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-ch:
			err = ep.LastError()
		case <-ctx.Done():
			ep.Abort()
			return nil, &tcpip.ErrTimeout{}
		}
	}
	if err != nil {
		ep.Close()
		return nil, err
	}
	return &clientTCP{TCPConn: gonet.NewTCPConn(wq, ep), ep: ep, wq: wq}, nil
}

func (c *clientStack) mustDialTCP(t testing.TB, dst netip.AddrPort) *clientTCP {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	conn, err := c.dialTCP(ctx, dst)
	if err != nil {
		t.Fatalf("client dialTCP(%s): %s", dst, err)
	}
	t.Cleanup(func() { conn.ep.Abort() })
	return conn
}

func (c *clientTCP) localAddr() netip.AddrPort {
	a, err := c.ep.GetLocalAddress()
	if err != nil {
		panic(err.String())
	}
	return fromTCPIP(a)
}

// readEndpoint reads once from a client endpoint, waiting up to timeout.
// It returns gVisor's own error, so that its kind can be checked.
func readEndpoint(ep tcpip.Endpoint, wq *waiter.Queue, b []byte, timeout time.Duration) (tcpip.ReadResult, tcpip.Error) {
	entry, ch := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		w := tcpip.SliceWriter(b)
		res, err := ep.Read(&w, tcpip.ReadOptions{NeedRemoteAddr: true})
		if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
			return res, err
		}
		select {
		case <-ch:
		case <-timer.C:
			return res, &tcpip.ErrTimeout{}
		}
	}
}

// clientUDP is an app's UDP socket on the client stack.
type clientUDP struct {
	ep tcpip.Endpoint
	wq *waiter.Queue
}

// udpSocket opens a UDP endpoint, bound to local if valid and connected to
// remote if valid.
func (c *clientStack) udpSocket(t testing.TB, family netip.Addr, local, remote netip.AddrPort) *clientUDP {
	t.Helper()
	wq := new(waiter.Queue)
	ep, err := c.s.NewEndpoint(udp.ProtocolNumber, netProto(family), wq)
	if err != nil {
		t.Fatalf("client NewEndpoint(udp): %s", err)
	}
	t.Cleanup(ep.Close)
	// Room for a few maximum-size datagrams.
	ep.SocketOptions().SetReceiveBufferSize(4<<20, true)
	if local.IsValid() {
		if err := ep.Bind(fullAddr(local)); err != nil {
			t.Fatalf("client udp Bind(%s): %s", local, err)
		}
	}
	if remote.IsValid() {
		if err := ep.Connect(fullAddr(remote)); err != nil {
			t.Fatalf("client udp Connect(%s): %s", remote, err)
		}
	}
	return &clientUDP{ep: ep, wq: wq}
}

func (u *clientUDP) localAddr() netip.AddrPort {
	a, err := u.ep.GetLocalAddress()
	if err != nil {
		panic(err.String())
	}
	return fromTCPIP(a)
}

// write sends b to the connected peer, or to to if valid.
func (u *clientUDP) write(b []byte, to netip.AddrPort) tcpip.Error {
	var opts tcpip.WriteOptions
	if to.IsValid() {
		fa := fullAddr(to)
		opts.To = &fa
	}
	var r bytes.Reader
	r.Reset(b)
	_, err := u.ep.Write(&r, opts)
	return err
}

func (u *clientUDP) read(b []byte, timeout time.Duration) (int, netip.AddrPort, tcpip.Error) {
	res, err := readEndpoint(u.ep, u.wq, b, timeout)
	if err != nil {
		return 0, netip.AddrPort{}, err
	}
	return res.Count, fromTCPIP(res.RemoteAddr), nil
}

// Packet builders, for injecting raw packets.

// buildIP wraps a transport segment (checksum field zero) in an IP header
// and fills in the transport checksum.
func buildIP(src, dst netip.Addr, proto tcpip.TransportProtocolNumber, seg []byte) []byte {
	s, d := toTCPIP(src), toTCPIP(dst)
	sum := ^checksum.Checksum(seg, header.PseudoHeaderChecksum(proto, s, d, uint16(len(seg))))
	switch proto {
	case header.UDPProtocolNumber:
		if sum == 0 {
			sum = 0xffff
		}
		header.UDP(seg).SetChecksum(sum)
	case header.TCPProtocolNumber:
		header.TCP(seg).SetChecksum(sum)
	}
	if src.Is4() {
		pkt := make([]byte, header.IPv4MinimumSize+len(seg))
		ip := header.IPv4(pkt)
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(len(pkt)),
			ID:          1,
			TTL:         64,
			Protocol:    uint8(proto),
			SrcAddr:     s,
			DstAddr:     d,
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		copy(pkt[header.IPv4MinimumSize:], seg)
		return pkt
	}
	pkt := make([]byte, header.IPv6MinimumSize+len(seg))
	header.IPv6(pkt).Encode(&header.IPv6Fields{
		PayloadLength:     uint16(len(seg)),
		TransportProtocol: proto,
		HopLimit:          64,
		SrcAddr:           s,
		DstAddr:           d,
	})
	copy(pkt[header.IPv6MinimumSize:], seg)
	return pkt
}

func buildUDP(src, dst netip.AddrPort, payload []byte) []byte {
	seg := make([]byte, header.UDPMinimumSize+len(payload))
	header.UDP(seg).Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(len(seg))})
	copy(seg[header.UDPMinimumSize:], payload)
	return buildIP(src.Addr(), dst.Addr(), header.UDPProtocolNumber, seg)
}

func buildTCPSYN(src, dst netip.AddrPort) []byte {
	seg := make([]byte, header.TCPMinimumSize)
	header.TCP(seg).Encode(&header.TCPFields{
		SrcPort:    src.Port(),
		DstPort:    dst.Port(),
		SeqNum:     1000,
		DataOffset: header.TCPMinimumSize,
		Flags:      header.TCPFlagSyn,
		WindowSize: 65535,
	})
	return buildIP(src.Addr(), dst.Addr(), header.TCPProtocolNumber, seg)
}

// Goroutine accounting, for leak checks.

// goroutines returns the stacks of all goroutines by id.
func goroutines() map[int]string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	m := make(map[int]string)
	for _, g := range strings.Split(string(buf), "\n\n") {
		rest, ok := strings.CutPrefix(g, "goroutine ")
		if !ok {
			continue
		}
		idStr, _, _ := strings.Cut(rest, " ")
		id, err := strconv.Atoi(idStr)
		if err != nil {
			continue
		}
		m[id] = g
	}
	return m
}

// checkNoNewGoroutines waits up to timeout for every goroutine that is not
// in before (and is not the caller) to end, and fails listing those left.
func checkNoNewGoroutines(t testing.TB, before map[int]string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var left []string
		for id, g := range goroutines() {
			if _, ok := before[id]; ok {
				continue
			}
			if strings.Contains(g, "checkNoNewGoroutines") {
				continue // this one
			}
			left = append(left, g)
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			sort.Strings(left)
			t.Fatalf("%d goroutines left %v after Stack.Close:\n\n%s", len(left), timeout, strings.Join(left, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stackDump is every goroutine's stack, for a failure that looks like a
// hang.
func stackDump() string {
	var gs []string
	for _, g := range goroutines() {
		gs = append(gs, g)
	}
	sort.Strings(gs)
	return strings.Join(gs, "\n\n")
}

// waitUntil polls cond until it holds or waitFor passes.
func waitUntil(cond func() bool) bool {
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

var portSeq atomic.Uint32

// nextPort hands out distinct client ports for bound sockets.
func nextPort() uint16 { return uint16(40000 + portSeq.Add(1)%20000) }
