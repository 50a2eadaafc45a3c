package netstack

// Hooks for the tests in package netstack_test.

// DeliverFrame hands one device frame to s synchronously, as the reader
// goroutine does. It is for a stack that was not started: the reader
// goroutine is the only other caller, and the link's refusing flag assumes
// one.
func DeliverFrame(s *Stack, frame []byte) { s.link.deliverFrame(frame) }

// GVisorIPStats are gVisor's own IP-layer counters (IPv4 and IPv6
// together), which tell whether a packet went through gVisor at all: one the
// UDP fast path took moves none of them.
type GVisorIPStats struct {
	// Received counts packets handed to gVisor's IP layer, each fragment
	// on its own.
	Received uint64
	// InvalidSource and InvalidDestination count packets gVisor dropped
	// for their addresses (loopback, multicast not joined, ...).
	InvalidSource, InvalidDestination uint64
}

// IPStats returns gVisor's IP-layer counters for s.
func IPStats(s *Stack) GVisorIPStats {
	ip := s.stack.Stats().IP
	return GVisorIPStats{
		Received:           ip.PacketsReceived.Value(),
		InvalidSource:      ip.InvalidSourceAddressesReceived.Value(),
		InvalidDestination: ip.InvalidDestinationAddressesReceived.Value(),
	}
}
