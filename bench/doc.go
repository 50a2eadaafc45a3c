// Package bench is tungate's benchmark harness. `make bench` runs TestBench
// (Linux, root, TUNGATE_BENCH=1): it builds a namespace lab
// (internal/netlab), starts the real tungate binary in the app namespace and
// measures the same clients and servers twice, over tungate and over the
// kernel path (the veth, no TUN), alternating, for several rounds. It
// writes the medians and the ratio tungate/kernel to bench/results/latest.md
// and bench/results/latest.json.
//
// A benchmark is not a test: it never fails on a figure's value, only when a
// figure could not be measured, and then it says which and why. The Go
// micro-benchmarks of the packet and rule code live beside that code, not
// here.
package bench
