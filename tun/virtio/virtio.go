// Package virtio encodes and decodes the virtio-net header that frames
// packets on a TUN device with offloads (struct virtio_net_hdr of
// include/uapi/linux/virtio_net.h). It is shared by the device (tun) and the
// netstack link that reads and writes the frames.
package virtio

import (
	"encoding/binary"
	"errors"
)

// HdrLen is the size of the virtio-net header that starts every frame
// of a device with offloads (struct virtio_net_hdr).
const HdrLen = 10

// Virtio-net header flags and GSO types (include/uapi/linux/virtio_net.h).
const (
	FlagNeedsCsum = 1 // the checksum at CsumStart+CsumOffset is partial: the pseudo-header sum only
	FlagDataValid = 2 // the checksums were verified

	GSONone  = 0
	GSOTCPv4 = 1
	GSOUDP   = 3
	GSOTCPv6 = 4
	GSOUDPL4 = 5
	GSOECN   = 0x80
)

// Hdr is the virtio-net header of a frame.
type Hdr struct {
	Flags      uint8
	GSOType    uint8
	HdrLen     uint16 // length of the headers (IP + transport) of a GSO frame
	GSOSize    uint16 // payload bytes per segment of a GSO frame
	CsumStart  uint16 // where checksumming starts (the transport header)
	CsumOffset uint16 // offset of the checksum field from CsumStart
}

var errShortFrame = errors.New("virtio: frame shorter than its virtio-net header")

// Decode reads the header at the start of b.
func Decode(b []byte) (Hdr, error) {
	if len(b) < HdrLen {
		return Hdr{}, errShortFrame
	}
	return Hdr{
		Flags:      b[0],
		GSOType:    b[1],
		HdrLen:     binary.LittleEndian.Uint16(b[2:]),
		GSOSize:    binary.LittleEndian.Uint16(b[4:]),
		CsumStart:  binary.LittleEndian.Uint16(b[6:]),
		CsumOffset: binary.LittleEndian.Uint16(b[8:]),
	}, nil
}

// Encode writes h at the start of b, which must hold HdrLen bytes.
func (h Hdr) Encode(b []byte) {
	b[0] = h.Flags
	b[1] = h.GSOType
	binary.LittleEndian.PutUint16(b[2:], h.HdrLen)
	binary.LittleEndian.PutUint16(b[4:], h.GSOSize)
	binary.LittleEndian.PutUint16(b[6:], h.CsumStart)
	binary.LittleEndian.PutUint16(b[8:], h.CsumOffset)
}
