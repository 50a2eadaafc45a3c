package tun

import (
	"bytes"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// seqpacketDevice is a Device over one end of a SOCK_SEQPACKET socketpair,
// which keeps frame boundaries as a TUN does; the other end is returned as
// the peer.
func seqpacketDevice(t testing.TB) (*Device, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	f := os.NewFile(uintptr(fds[0]), "dev")
	peer := os.NewFile(uintptr(fds[1]), "peer")
	raw, err := f.SyscallConn()
	if err != nil {
		t.Fatalf("SyscallConn: %v", err)
	}
	t.Cleanup(func() { f.Close(); peer.Close() })
	return &Device{file: f, raw: raw}, peer
}

func TestFrameVecAndIdleRead(t *testing.T) {
	d, peer := seqpacketDevice(t)
	parts := [][]byte{[]byte("virtio-hdr"), {}, []byte("ip-header"), bytes.Repeat([]byte{7}, 3000)}
	n, err := d.WriteFrameVec(parts)
	if want := len(bytes.Join(parts, nil)); err != nil || n != want {
		t.Fatalf("WriteFrameVec = %d, %v; want %d, nil", n, err, want)
	}
	got := make([]byte, 65536)
	m, err := peer.Read(got)
	if err != nil || !bytes.Equal(got[:m], bytes.Join(parts, nil)) {
		t.Fatalf("peer read %d bytes (%v), not the gathered frame", m, err)
	}

	// Nothing waiting: idle runs before the read waits, and the frame
	// written from idle is the one read.
	idles := 0
	m, err = d.ReadFrameIdle(got, func() {
		idles++
		if idles == 1 {
			if _, err := peer.Write([]byte("after idle")); err != nil {
				t.Errorf("peer write: %v", err)
			}
		}
	})
	if err != nil || string(got[:m]) != "after idle" {
		t.Fatalf("ReadFrameIdle = %q, %v; want %q", got[:m], err, "after idle")
	}
	if idles != 1 {
		t.Fatalf("idle ran %d times before one frame, want 1", idles)
	}
	// A frame already waiting is read without calling idle.
	peer.Write([]byte("waiting"))
	m, err = d.ReadFrameIdle(got, func() { t.Error("idle called with a frame waiting") })
	if err != nil || string(got[:m]) != "waiting" {
		t.Fatalf("ReadFrameIdle = %q, %v; want %q", got[:m], err, "waiting")
	}

	d.file.Close()
	if _, err := d.ReadFrameIdle(got, func() {}); err != ErrClosed {
		t.Fatalf("ReadFrameIdle after close = %v, want ErrClosed", err)
	}
	if _, err := d.WriteFrameVec(parts); err != ErrClosed {
		t.Fatalf("WriteFrameVec after close = %v, want ErrClosed", err)
	}
}

// BenchmarkFrameIO: one gathered write and one idle-aware read a frame, in
// steady state without allocations.
func BenchmarkFrameIO(b *testing.B) {
	d, peer := seqpacketDevice(b)
	hdr := make([]byte, 10)
	payload := bytes.Repeat([]byte{1}, 1400)
	parts := [][]byte{hdr, payload}
	buf := make([]byte, 65536)
	idle := func() {}
	b.ReportAllocs()
	b.SetBytes(int64(len(hdr) + len(payload)))
	for b.Loop() {
		if _, err := d.WriteFrameVec(parts); err != nil {
			b.Fatal(err)
		}
		n, err := peer.Read(buf)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := peer.Write(buf[:n]); err != nil {
			b.Fatal(err)
		}
		if _, err := d.ReadFrameIdle(buf, idle); err != nil {
			b.Fatal(err)
		}
	}
}
