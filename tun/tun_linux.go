package tun

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Device is an open TUN device that moves one frame per call.
//
// With Offload() true a frame is a 10-byte virtio-net header (virtio.Hdr)
// followed by the IP packet, which may be a TSO super-packet of up to 64 KiB
// in either direction; the device negotiates checksum and TCP segmentation
// offloads (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6) but not UDP segmentation,
// so a frame never carries several UDP datagrams. Without offloads a frame
// is the bare IP packet. ReadFrame may run concurrently with WriteFrame.
type Device struct {
	dev     wgtun.Device
	file    *os.File
	name    string
	mtu     int
	offload bool
	owned   bool // tungate created the link and removes it on Close
	raw     syscall.RawConn
	log     *slog.Logger

	// ReadFrameIdle's and WriteFrameVec's system-call closures and their
	// in and out values, made once so that a frame allocates nothing.
	// Each is used by one goroutine at a time (the link's reader and
	// writer).
	rd struct {
		fn   func(fd uintptr) bool
		b    []byte
		idle func()
		n    int
		err  unix.Errno
	}
	wr struct {
		fn   func(fd uintptr) bool
		iovs []unix.Iovec
		n    int
		err  unix.Errno
	}
}

// Open creates (or adopts) the device and brings it up with its addresses.
func Open(cfg Config, log *slog.Logger) (*Device, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var (
		dev  wgtun.Device
		name string
		err  error
	)
	switch {
	case cfg.FD > 0:
		dev, name, err = wgtun.CreateUnmonitoredTUNFromFD(cfg.FD)
		if err != nil {
			return nil, fmt.Errorf("tun: adopt fd %d: %w", cfg.FD, err)
		}
	case cfg.Offload:
		dev, err = wgtun.CreateTUN(cfg.Name, cfg.MTU)
		if err == nil && dev.BatchSize() > 1 {
			err = tcpOffloadsOnly(dev.File())
		}
		if err != nil {
			// Offloads break on some kernels: a plain device still
			// works, one packet per system call.
			if dev != nil {
				dev.Close()
			}
			log.Warn("tun: the kernel refused offloads; continuing as with tun.offload: off", "name", cfg.Name, "err", err)
			dev, err = createPlain(cfg.Name, cfg.MTU)
			if err != nil {
				return nil, fmt.Errorf("tun: create %s: %w", cfg.Name, err)
			}
		}
		name = cfg.Name
	default:
		dev, err = createPlain(cfg.Name, cfg.MTU)
		if err != nil {
			return nil, fmt.Errorf("tun: create %s: %w", cfg.Name, err)
		}
		name = cfg.Name
	}
	if n, err := dev.Name(); err == nil {
		name = n
	}
	// wireguard-go's device set the virtio-net header up exactly when it
	// reads in batches.
	d := &Device{dev: dev, file: dev.File(), name: name, mtu: cfg.MTU, offload: dev.BatchSize() > 1, owned: cfg.FD <= 0, log: log}
	raw, err := d.file.SyscallConn()
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("tun %s: %w", name, err)
	}
	d.raw = raw
	if d.owned {
		if err := d.configure(cfg); err != nil {
			dev.Close()
			return nil, err
		}
	} else if mtu, err := dev.MTU(); err == nil {
		d.mtu = mtu
	}
	// The device reports link events on a channel with blocking sends:
	// someone must drain it or its netlink goroutine stalls.
	go func() {
		for ev := range dev.Events() {
			log.Debug("tun event", "name", name, "event", ev)
		}
	}()
	if d.offload && cfg.FD > 0 {
		if err := tcpOffloadsOnly(d.file); err != nil {
			dev.Close()
			return nil, fmt.Errorf("tun: adopt fd %d: %w", cfg.FD, err)
		}
	}
	log.Info("tun device up", "name", name, "mtu", d.mtu, "offload", d.offload, "adopted_fd", cfg.FD > 0)
	return d, nil
}

// createPlain opens a TUN without the virtio-net header: one packet per
// read, no offloads, for kernels where offloads misbehave.
func createPlain(name string, mtu int) (wgtun.Device, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("TUNSETIFF: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return wgtun.CreateTUNFromFile(os.NewFile(uintptr(fd), "/dev/net/tun"), mtu)
}

func (d *Device) configure(cfg Config) error {
	link, err := netlink.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("tun: %s: %w", d.name, err)
	}
	for _, p := range cfg.Addresses {
		addr := &netlink.Addr{IPNet: prefixToIPNet(p)}
		if p.Addr().Is6() {
			// Duplicate address detection would hold the address
			// "tentative" for a second or more; a point-to-point TUN has
			// no one to collide with.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrReplace(link, addr); err != nil {
			return fmt.Errorf("tun: %s: add address %s: %w", d.name, p, err)
		}
	}
	if err := netlink.LinkSetMTU(link, cfg.MTU); err != nil {
		return fmt.Errorf("tun: %s: set mtu %d: %w", d.name, cfg.MTU, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("tun: %s: set up: %w", d.name, err)
	}
	return nil
}

// Name returns the interface name.
func (d *Device) Name() string { return d.name }

// MTU returns the device MTU.
func (d *Device) MTU() int { return d.mtu }

// Offload reports whether the device offloads checksums and TCP
// segmentation, which frames every packet with a virtio-net header.
func (d *Device) Offload() bool { return d.offload }

// VirtioHdr reports whether frames start with a virtio-net header: the same
// as Offload, under the name the netstack's Device contract uses.
func (d *Device) VirtioHdr() bool { return d.offload }

// ReadFrame reads one frame into b, which must hold virtio.HdrLen+MaxPacketSize
// bytes; see Device.
func (d *Device) ReadFrame(b []byte) (int, error) {
	n, err := d.file.Read(b)
	if errors.Is(err, os.ErrClosed) {
		return n, ErrClosed
	}
	return n, err
}

// WriteFrame writes one frame; see Device.
func (d *Device) WriteFrame(b []byte) (int, error) {
	n, err := d.file.Write(b)
	if errors.Is(err, os.ErrClosed) {
		return n, ErrClosed
	}
	return n, err
}

// WriteFrameVec writes one frame gathered from bufs with writev: gVisor's
// packets are chains of views, and copying a 64 KiB super-packet into one
// buffer first was 4 % of tungate's CPU in a download.
func (d *Device) WriteFrameVec(bufs [][]byte) (int, error) {
	w := &d.wr
	if w.fn == nil {
		w.fn = func(fd uintptr) bool {
			r, _, errno := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(unsafe.SliceData(w.iovs))), uintptr(len(w.iovs)))
			if errno == unix.EAGAIN {
				return false
			}
			w.n, w.err = int(r), errno
			return true
		}
	}
	w.iovs = w.iovs[:0]
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		v := unix.Iovec{Base: unsafe.SliceData(b)}
		v.SetLen(len(b))
		w.iovs = append(w.iovs, v)
	}
	// The raw conn fails only when the file is closing (there are no
	// deadlines), with an error os does not export.
	err := d.raw.Write(w.fn)
	clear(w.iovs) // no reference to the caller's buffers
	if err != nil {
		return 0, ErrClosed
	}
	if w.err != 0 {
		return 0, w.err
	}
	return w.n, nil
}

// ReadFrameIdle reads one frame like ReadFrame, and calls idle each time
// the device turns out to have no frame waiting, before it waits for one:
// the moment to send what the frames read so far produced.
func (d *Device) ReadFrameIdle(b []byte, idle func()) (int, error) {
	r := &d.rd
	if r.fn == nil {
		r.fn = func(fd uintptr) bool {
			n, _, errno := unix.Syscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(r.b))), uintptr(len(r.b)))
			if errno == unix.EAGAIN {
				r.idle()
				return false
			}
			r.n, r.err = int(n), errno
			return true
		}
	}
	r.b, r.idle = b, idle
	err := d.raw.Read(r.fn)
	r.b, r.idle = nil, nil
	if err != nil {
		return 0, ErrClosed // closing, as in WriteFrameVec
	}
	if r.err != 0 {
		return 0, r.err
	}
	return r.n, nil
}

// tcpOffloadsOnly keeps the checksum and TCP segmentation offloads that
// wireguard-go negotiated and drops UDP segmentation (USO), which would
// pack several datagrams into one frame.
func tcpOffloadsOnly(f *os.File) error {
	sc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ioErr error
	if err := sc.Control(func(fd uintptr) {
		ioErr = unix.IoctlSetInt(int(fd), unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6)
	}); err != nil {
		return err
	}
	if ioErr != nil {
		return fmt.Errorf("TUNSETOFFLOAD: %w", ioErr)
	}
	return nil
}

// Close closes the device. A device tungate created disappears with its
// last file descriptor; an adopted one is left to its creator.
func (d *Device) Close() error {
	return d.dev.Close()
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	bits := 32
	if p.Addr().Is6() {
		bits = 128
	}
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), bits)}
}
