package tun

import (
	"errors"
	"net/netip"
)

// Config says which device to open and how to set it up.
type Config struct {
	// Name of the device to create ("tungate0"); ignored when FD is set.
	Name string
	MTU  int
	// Addresses are assigned to the device when tungate creates it. An
	// adopted FD keeps whatever its creator assigned.
	Addresses []netip.Prefix
	// Offload asks for the virtio-net header with TSO/checksum offloads, so
	// that reads and writes move several segments per system call.
	Offload bool
	// FD, when > 0, is an already-open TUN file descriptor to use instead of
	// creating a device.
	FD int
}

// MaxPacketSize is the largest packet Read can return or Write can take.
const MaxPacketSize = 65535

// ErrNotSupported is returned on systems where tungate cannot open a TUN
// device yet.
var ErrNotSupported = errors.New("TUN devices are not supported on this OS yet")
