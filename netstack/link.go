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
)

// Device is the packet device under the stack: a TUN, or a fake in tests.
//
// Read fills up to len(bufs) packets, packet i at bufs[i][headroom:], and
// sets sizes[i]; it blocks until at least one packet arrives and returns
// ErrDeviceClosed-wrapping errors (anything for which closed() is true) once
// the device is closed. Write sends bufs[i][headroom:] for every i; it may
// coalesce packets into the spare capacity of the buffers. BatchSize is the
// most packets one call moves and never changes.
type Device interface {
	Read(bufs [][]byte, sizes []int) (int, error)
	Write(bufs [][]byte) (int, error)
	BatchSize() int
}

// maxPacket is the largest IP packet a buffer must hold.
const maxPacket = 65535

// outQueueLen bounds the packets gVisor may have queued for the device
// before WritePackets blocks its caller: about two full batches, so the
// writer always has a next batch ready without hoarding memory.
const outQueueLen = 256

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)

// linkEndpoint connects a Device to gVisor. Inbound, a reader goroutine
// reads batches from the device and delivers each packet to the stack.
// Outbound, WritePackets puts packets on a bounded queue (blocking when it is
// full, so that TCP's own flow control slows down instead of packets being
// lost) and a writer goroutine moves them to the device in batches.
type linkEndpoint struct {
	dev      Device
	headroom int
	log      *slog.Logger

	mtu atomic.Uint32

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher

	out     chan *stack.PacketBuffer
	done    chan struct{}
	closing sync.Once
	wg      sync.WaitGroup

	readErrors  atomic.Uint64
	writeErrors atomic.Uint64
	badVersion  atomic.Uint64
	packetsIn   atomic.Uint64
	packetsOut  atomic.Uint64
	// enqueued and settled (written or failed) tell Flush when every packet
	// handed to WritePackets has left.
	enqueued     atomic.Uint64
	settled      atomic.Uint64
	onFatalError func(error)
}

func newLinkEndpoint(dev Device, mtu uint32, headroom int, log *slog.Logger) *linkEndpoint {
	e := &linkEndpoint{
		dev:      dev,
		headroom: headroom,
		log:      log,
		out:      make(chan *stack.PacketBuffer, outQueueLen),
		done:     make(chan struct{}),
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

func (e *linkEndpoint) readLoop(isClosed func(error) bool) {
	defer e.wg.Done()
	batch := e.dev.BatchSize()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, e.headroom+maxPacket)
	}
	sizes := make([]int, batch)
	for {
		n, err := e.dev.Read(bufs, sizes)
		for i := 0; i < n; i++ {
			e.deliver(bufs[i][e.headroom : e.headroom+sizes[i]])
		}
		if err != nil {
			select {
			case <-e.done:
				return
			default:
			}
			if isClosed(err) {
				if e.onFatalError != nil {
					e.onFatalError(err)
				}
				return
			}
			// A malformed super-packet from the kernel costs that read,
			// not the device.
			if e.readErrors.Add(1) == 1 || e.log.Enabled(context.Background(), slog.LevelDebug) {
				e.log.Warn("tun read", "err", err)
			}
		}
	}
}

func (e *linkEndpoint) deliver(b []byte) {
	if len(b) == 0 {
		return
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
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	d.DeliverNetworkPacket(proto, pkt)
	pkt.DecRef()
}

func (e *linkEndpoint) writeLoop(isClosed func(error) bool) {
	defer e.wg.Done()
	batch := e.dev.BatchSize()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, e.headroom, e.headroom+maxPacket)
	}
	toWrite := make([][]byte, 0, batch)
	for {
		var pkt *stack.PacketBuffer
		select {
		case pkt = <-e.out:
		case <-e.done:
			return
		}
		toWrite = toWrite[:0]
		for {
			b := bufs[len(toWrite)][:e.headroom]
			for _, s := range pkt.AsSlices() {
				b = append(b, s...)
			}
			pkt.DecRef()
			toWrite = append(toWrite, b)
			if len(toWrite) == batch {
				break
			}
			select {
			case pkt = <-e.out:
				continue
			default:
			}
			break
		}
		_, err := e.dev.Write(toWrite)
		e.settled.Add(uint64(len(toWrite)))
		if err != nil {
			if isClosed(err) {
				return
			}
			if e.writeErrors.Add(1) == 1 {
				e.log.Warn("tun write", "err", err)
			}
			continue
		}
		e.packetsOut.Add(uint64(len(toWrite)))
	}
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

// Capabilities implements stack.LinkEndpoint.Capabilities. None: gVisor
// validates every checksum itself, since packets from a TUN are untrusted.
func (*linkEndpoint) Capabilities() stack.LinkEndpointCapabilities { return 0 }

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
