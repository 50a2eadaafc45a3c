package netstack

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/tungate/tungate/tun/virtio"
)

// Device is the packet device under the stack: a TUN, or a fake in tests.
//
// ReadFrame reads one frame into b (which holds virtio.HdrLen+65535 bytes)
// and blocks until one arrives; WriteFrame writes one. When VirtioHdr is
// true every frame starts with a virtio-net header and may be a TCP
// super-packet (TSO) of up to 64 KiB, in both directions; otherwise a frame
// is one bare IP packet. Once the device is closed both return an error for
// which the isClosed function given to Stack.Start is true.
type Device interface {
	ReadFrame(b []byte) (int, error)
	WriteFrame(b []byte) (int, error)
	VirtioHdr() bool
}

// maxPacket is the largest IP packet a frame carries.
const maxPacket = 65535

// outQueueLen bounds the packets gVisor may have queued for the device
// before WritePackets blocks its caller: enough for the writer to always
// have a next packet ready without hoarding memory.
const outQueueLen = 256

var (
	_ stack.LinkEndpoint = (*linkEndpoint)(nil)
	_ stack.GSOEndpoint  = (*linkEndpoint)(nil)
)

// linkEndpoint connects a Device to gVisor. Inbound, a reader goroutine
// reads frames and delivers each packet to the stack. Outbound,
// WritePackets puts packets on a bounded queue (blocking when it is full,
// so that TCP's own flow control slows down instead of packets being lost)
// and a writer goroutine moves them to the device.
//
// With a virtio-net header the endpoint offloads in both directions: a TCP
// super-packet the kernel sends (TSO) reaches gVisor whole instead of as
// MTU-sized segments, and gVisor hands over super-packets of up to 64 KiB
// (host GSO) with partial checksums that the kernel completes and
// segments. gVisor then trusts every received checksum
// (CapabilityRXChecksumOffload), so the endpoint verifies those the kernel
// did not mark as partial itself.
type linkEndpoint struct {
	dev    Device
	virtio bool
	log    *slog.Logger

	mtu atomic.Uint32

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher

	// fastUDP, when set, is offered each packet before gVisor (see
	// udpfast.go). refusing is set while a datagram it refused goes
	// through gVisor, for the UDP handler to refuse again without asking.
	fastUDP  func(pkt []byte, trusted bool) udpVerdict
	refusing atomic.Bool
	// flush, when set, is called on the reader goroutine whenever the
	// device has nothing more to read (see UDPFlusher).
	flush func()

	out     chan *stack.PacketBuffer
	done    chan struct{}
	closing sync.Once
	wg      sync.WaitGroup

	readErrors  atomic.Uint64
	writeErrors atomic.Uint64
	badVersion  atomic.Uint64
	badFrame    atomic.Uint64 // bad virtio header, unsupported GSO type, bad checksum
	packetsIn   atomic.Uint64
	packetsOut  atomic.Uint64
	// enqueued and settled (written or failed) tell Flush when every packet
	// handed to WritePackets has left.
	enqueued atomic.Uint64
	settled  atomic.Uint64
}

func newLinkEndpoint(dev Device, mtu uint32, log *slog.Logger) *linkEndpoint {
	e := &linkEndpoint{
		dev:    dev,
		virtio: dev.VirtioHdr(),
		log:    log,
		out:    make(chan *stack.PacketBuffer, outQueueLen),
		done:   make(chan struct{}),
	}
	e.mtu.Store(mtu)
	return e
}

// start launches the reader and writer goroutines. isClosed reports whether
// a device error means the device is gone.
func (e *linkEndpoint) start(isClosed func(error) bool) {
	e.wg.Add(2)
	go e.readLoop(isClosed)
	go e.writeLoop(isClosed)
}

// IdleReader is implemented by devices that can say when they have no
// frame waiting: ReadFrameIdle reads like ReadFrame and calls idle before
// each wait.
type IdleReader interface {
	ReadFrameIdle(b []byte, idle func()) (int, error)
}

func (e *linkEndpoint) readLoop(isClosed func(error) bool) {
	defer e.wg.Done()
	buf := make([]byte, virtio.HdrLen+maxPacket)
	ir, _ := e.dev.(IdleReader)
	read := e.dev.ReadFrame
	flushEvery := 0 // frames between flushes when the device never runs dry
	sinceFlush := 0
	if e.flush != nil {
		flushEvery = 1 // a device that cannot tell when it is idle
		if ir != nil {
			// A busy TUN may not run dry for a long time (a bulk upload
			// keeps it full); a datagram waits for at most this many
			// frames, well under a millisecond.
			flushEvery = 64
			idle := func() {
				sinceFlush = 0
				e.flush()
			}
			read = func(b []byte) (int, error) { return ir.ReadFrameIdle(b, idle) }
		}
	}
	for {
		n, err := read(buf)
		if err == nil {
			e.deliverFrame(buf[:n])
			if sinceFlush++; flushEvery > 0 && sinceFlush >= flushEvery {
				sinceFlush = 0
				e.flush()
			}
			continue
		}
		select {
		case <-e.done:
			return
		default:
		}
		if isClosed(err) {
			return
		}
		if e.readErrors.Add(1) == 1 || e.log.Enabled(context.Background(), slog.LevelDebug) {
			e.log.Warn("tun read", "err", err)
		}
	}
}

// deliverFrame hands the packet in one frame to the stack.
func (e *linkEndpoint) deliverFrame(frame []byte) {
	if !e.virtio {
		e.deliver(frame, false)
		return
	}
	h, err := virtio.Decode(frame)
	if err != nil {
		e.badFrame.Add(1)
		return
	}
	pkt := frame[virtio.HdrLen:]
	switch h.GSOType &^ virtio.GSOECN {
	case virtio.GSONone:
		// A partial checksum is the kernel's promise to fill it in
		// later (the packet was built on this host); anything else is
		// checked here, since gVisor will not.
		if h.Flags&(virtio.FlagNeedsCsum|virtio.FlagDataValid) == 0 && !checksumsValid(pkt) {
			e.badFrame.Add(1)
			return
		}
	case virtio.GSOTCPv4, virtio.GSOTCPv6:
		// A TSO super-packet, built by this host's kernel with a
		// partial checksum: gVisor takes it whole.
	default:
		// UDP segmentation is not negotiated; a frame of this kind is
		// a kernel we do not understand.
		e.badFrame.Add(1)
		return
	}
	// Checksums are right by now: verified above, or vouched for by the
	// kernel.
	e.deliver(pkt, true)
}

// deliver hands one packet to the stack. trusted says its checksums need
// no checking.
func (e *linkEndpoint) deliver(b []byte, trusted bool) {
	if len(b) == 0 {
		return
	}
	if e.fastUDP != nil {
		switch e.fastUDP(b, trusted) {
		case udpHandled:
			e.packetsIn.Add(1)
			return
		case udpRefusing:
			// gVisor's delivery below is synchronous: the flag is
			// seen by this packet's UDP handler call and no other.
			e.refusing.Store(true)
			defer e.refusing.Store(false)
		}
	}
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(b) {
	case header.IPv4Version:
		proto = ipv4.ProtocolNumber
	case header.IPv6Version:
		proto = ipv6.ProtocolNumber
	default:
		e.badVersion.Add(1)
		return
	}
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		return
	}
	e.packetsIn.Add(1)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: packetData(b)})
	d.DeliverNetworkPacket(proto, pkt)
	pkt.DecRef()
}

// VectorWriter is implemented by devices that write one frame gathered
// from several buffers (writev), sparing the copy into one.
type VectorWriter interface {
	WriteFrameVec(bufs [][]byte) (int, error)
}

// headView is how much of a large packet goes into a view of its own:
// room for IPv4 or IPv6 and TCP headers with options.
const headView = 128

// packetData copies a received packet into gVisor buffers. A large one is
// split into its first bytes and the rest: gVisor holds a second reference
// to the network header's view while it handles a packet, and reading a
// later header out of a shared view copies the view's whole chunk. With
// TSO super-packets in one view that was a 64 KiB clear and copy per
// packet, 8 % of tungate's CPU in an upload; now it copies 128 bytes.
func packetData(b []byte) buffer.Buffer {
	if len(b) <= 4*headView {
		return buffer.MakeWithData(b)
	}
	data := buffer.MakeWithData(b[:headView])
	data.Append(buffer.NewViewWithData(b[headView:])) // never fails for a fresh view
	return data
}

func (e *linkEndpoint) writeLoop(isClosed func(error) bool) {
	defer e.wg.Done()
	buf := make([]byte, 0, virtio.HdrLen+maxPacket)
	vw, _ := e.dev.(VectorWriter)
	var hdr [virtio.HdrLen]byte
	var bufs [][]byte
	for {
		var pkt *stack.PacketBuffer
		select {
		case pkt = <-e.out:
		case <-e.done:
			return
		}
		// One frame: a virtio-net header describing gVisor's offload
		// request when the device has one, then the packet's views.
		bufs = bufs[:0]
		if e.virtio {
			virtioHdrFor(pkt).Encode(hdr[:])
			bufs = append(bufs, hdr[:])
		}
		bufs = appendViews(bufs, pkt)
		var err error
		if vw != nil {
			_, err = vw.WriteFrameVec(bufs)
		} else {
			frame := buf[:0]
			for _, b := range bufs {
				frame = append(frame, b...)
			}
			_, err = e.dev.WriteFrame(frame)
		}
		clear(bufs) // no reference to the packet's views once it is released
		pkt.DecRef()
		e.settled.Add(1)
		if err != nil {
			if isClosed(err) {
				return
			}
			if e.writeErrors.Add(1) == 1 {
				e.log.Warn("tun write", "err", err)
			}
			continue
		}
		e.packetsOut.Add(1)
	}
}

// appendViews appends the slices that make up pkt, headers first, to
// bufs, without the allocation PacketBuffer.AsSlices makes.
func appendViews(bufs [][]byte, pkt *stack.PacketBuffer) [][]byte {
	views, skip := pkt.AsViewList()
	for v := views.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		bufs = append(bufs, b[skip:])
		skip = 0
	}
	return bufs
}

// virtioHdrFor translates gVisor's GSO options into a virtio-net header.
// With host GSO every TCP packet gVisor sends, even a bare ACK, carries only
// the pseudo-header sum in its checksum field (NeedsCsum); one longer than
// its MSS is a super-packet for the kernel to segment.
func virtioHdrFor(pkt *stack.PacketBuffer) virtio.Hdr {
	g := pkt.GSOOptions
	if g.Type != stack.GSOTCPv4 && g.Type != stack.GSOTCPv6 {
		return virtio.Hdr{}
	}
	l3 := uint16(len(pkt.NetworkHeader().Slice()))
	l4 := uint16(len(pkt.TransportHeader().Slice()))
	var h virtio.Hdr
	if g.NeedsCsum {
		h.Flags = virtio.FlagNeedsCsum
		h.CsumStart = l3
		h.CsumOffset = g.CsumOffset
	}
	if payload := pkt.Size() - int(l3) - int(l4); g.MSS > 0 && payload > int(g.MSS) {
		h.GSOType = virtio.GSOTCPv4
		if g.Type == stack.GSOTCPv6 {
			h.GSOType = virtio.GSOTCPv6
		}
		h.GSOSize = g.MSS
		h.HdrLen = l3 + l4
	}
	return h
}

// close stops both goroutines and drops queued packets. The device must be
// closed by the caller first so that a blocked Read returns.
func (e *linkEndpoint) close() {
	e.closing.Do(func() { close(e.done) })
	e.wg.Wait()
	for {
		select {
		case pkt := <-e.out:
			pkt.DecRef()
			e.settled.Add(1)
		default:
			return
		}
	}
}

// WritePackets implements stack.LinkWriter.WritePackets.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n := 0
	for _, pkt := range pkts.AsSlice() {
		// Checked first: select picks at random among ready cases, and
		// a packet queued after close would never be released.
		select {
		case <-e.done:
			if n == 0 {
				return 0, &tcpip.ErrClosedForSend{}
			}
			return n, nil
		default:
		}
		select {
		case e.out <- pkt.IncRef():
			e.enqueued.Add(1)
			n++
		case <-e.done:
			pkt.DecRef()
			if n == 0 {
				return 0, &tcpip.ErrClosedForSend{}
			}
			return n, nil
		}
	}
	return n, nil
}

// MTU implements stack.LinkEndpoint.MTU.
func (e *linkEndpoint) MTU() uint32 { return e.mtu.Load() }

// SetMTU implements stack.LinkEndpoint.SetMTU.
func (e *linkEndpoint) SetMTU(mtu uint32) { e.mtu.Store(mtu) }

// MaxHeaderLength implements stack.LinkEndpoint.MaxHeaderLength. A TUN
// carries bare IP packets.
func (*linkEndpoint) MaxHeaderLength() uint16 { return 0 }

// LinkAddress implements stack.LinkEndpoint.LinkAddress. A TUN has none.
func (*linkEndpoint) LinkAddress() tcpip.LinkAddress { return "" }

// SetLinkAddress implements stack.LinkEndpoint.SetLinkAddress.
func (*linkEndpoint) SetLinkAddress(tcpip.LinkAddress) {}

// Capabilities implements stack.LinkEndpoint.Capabilities. With a
// virtio-net header, receive checksums are the endpoint's business (see
// deliverFrame): a TSO super-packet carries only a partial checksum, and
// gVisor would drop it as corrupt. Without one, gVisor checks them all.
func (e *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	if e.virtio {
		return stack.CapabilityRXChecksumOffload
	}
	return 0
}

// GSOMaxSize implements stack.GSOEndpoint: the largest IP packet a frame
// can carry.
func (*linkEndpoint) GSOMaxSize() uint32 { return maxPacket }

// SupportedGSO implements stack.GSOEndpoint: the kernel segments what
// gVisor hands over when the device has a virtio-net header.
func (e *linkEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.virtio {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

// Attach implements stack.LinkEndpoint.Attach.
func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	e.dispatcher = d
	e.mu.Unlock()
}

// IsAttached implements stack.LinkEndpoint.IsAttached.
func (e *linkEndpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait implements stack.LinkEndpoint.Wait.
func (e *linkEndpoint) Wait() {}

// ARPHardwareType implements stack.LinkEndpoint.ARPHardwareType.
func (*linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }

// AddHeader implements stack.LinkEndpoint.AddHeader.
func (*linkEndpoint) AddHeader(*stack.PacketBuffer) {}

// ParseHeader implements stack.LinkEndpoint.ParseHeader.
func (*linkEndpoint) ParseHeader(*stack.PacketBuffer) bool { return true }

// Close implements stack.LinkEndpoint.Close. The goroutines are stopped by
// Stack.Close, which owns the order of shutdown.
func (*linkEndpoint) Close() {}

// SetOnCloseAction implements stack.LinkEndpoint.SetOnCloseAction.
func (*linkEndpoint) SetOnCloseAction(func()) {}
