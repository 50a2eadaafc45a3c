package tun

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Device is an open TUN device.
//
// Read and Write follow golang.zx2c4.com/wireguard/tun.Device: Read fills up
// to len(bufs) packets, each starting at bufs[i][Offset:], and sets sizes[i];
// Write sends bufs[i][Offset:] for every i and may coalesce TCP segments, so
// each buffer needs a capacity of Offset+MaxPacketSize. Reads may run
// concurrently with writes; two concurrent Reads (or Writes) serialize.
type Device struct {
	dev     wgtun.Device
	name    string
	mtu     int
	offload bool
	owned   bool // tungate created the link and removes it on Close
	log     *slog.Logger
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
		if err != nil {
			return nil, fmt.Errorf("tun: create %s: %w", cfg.Name, err)
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
	d := &Device{dev: dev, name: name, mtu: cfg.MTU, offload: dev.BatchSize() > 1, owned: cfg.FD <= 0, log: log}
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
	log.Info("tun device up", "name", name, "mtu", d.mtu, "offload", d.offload, "batch", dev.BatchSize(), "adopted_fd", cfg.FD > 0)
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

// Offload reports whether the device moves virtio-net framed batches.
func (d *Device) Offload() bool { return d.offload }

// BatchSize is the most packets one Read returns or one Write takes.
func (d *Device) BatchSize() int { return d.dev.BatchSize() }

// Read reads one or more packets; see Device.
func (d *Device) Read(bufs [][]byte, sizes []int) (int, error) {
	n, err := d.dev.Read(bufs, sizes, Offset)
	if errors.Is(err, os.ErrClosed) {
		return n, ErrClosed
	}
	return n, err
}

// Write writes packets; see Device.
func (d *Device) Write(bufs [][]byte) (int, error) {
	n, err := d.dev.Write(bufs, Offset)
	if errors.Is(err, os.ErrClosed) {
		return n, ErrClosed
	}
	return n, err
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
