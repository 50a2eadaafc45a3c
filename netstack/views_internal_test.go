package netstack

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// testPacket is a packet as gVisor hands it to the link: headers pushed in
// front of a payload of several views.
func testPacket() *stack.PacketBuffer {
	var payload buffer.Buffer
	payload.Append(buffer.NewViewWithData(bytes.Repeat([]byte{1}, 1000)))
	payload.Append(buffer.NewViewWithData(bytes.Repeat([]byte{2}, 3000)))
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 80, Payload: payload})
	copy(pkt.TransportHeader().Push(20), bytes.Repeat([]byte{3}, 20))
	copy(pkt.NetworkHeader().Push(20), bytes.Repeat([]byte{4}, 20))
	return pkt
}

func TestAppendViewsIsAsSlices(t *testing.T) {
	pkt := testPacket()
	defer pkt.DecRef()
	got := bytes.Join(appendViews(nil, pkt), nil)
	want := bytes.Join(pkt.AsSlices(), nil)
	if !bytes.Equal(got, want) || len(want) != 4040 {
		t.Fatalf("appendViews gave %d bytes, AsSlices %d (want 4040), equal=%v", len(got), len(want), bytes.Equal(got, want))
	}
}

// BenchmarkAppendViews: the writer's per-packet gather allocates nothing.
func BenchmarkAppendViews(b *testing.B) {
	pkt := testPacket()
	defer pkt.DecRef()
	bufs := make([][]byte, 0, 8)
	b.ReportAllocs()
	for b.Loop() {
		bufs = appendViews(bufs[:0], pkt)
	}
}
