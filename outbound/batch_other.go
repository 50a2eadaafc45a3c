//go:build !linux

package outbound

// udpBatch is empty where directUDP has no WriteBatch: the caller sends
// one datagram at a time.
type udpBatch struct{}
