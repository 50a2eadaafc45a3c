// Package tun opens the TUN device that the kernel routes traffic into:
// creating it (Linux, through golang.zx2c4.com/wireguard/tun) or adopting an
// already-open file descriptor, giving it its addresses and MTU, and moving
// packets in batches. It knows nothing of what the packets carry.
package tun
