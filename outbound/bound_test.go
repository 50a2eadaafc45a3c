package outbound

import (
	"slices"
	"testing"
)

type fakeBound struct {
	iface string
	v6    bool
	ended int
}

func (f *fakeBound) bound() (string, bool) { return f.iface, f.v6 }
func (f *fakeBound) end()                  { f.ended++ }

func TestBoundSockets(t *testing.T) {
	var b boundSockets
	a4 := &fakeBound{iface: "eth0"}
	a6 := &fakeBound{iface: "eth0", v6: true}
	w4 := &fakeBound{iface: "wlan0"}
	for _, s := range []*fakeBound{a4, a6, w4} {
		b.add(s)
	}
	if n := b.count(); n != 3 {
		t.Fatalf("count = %d, want 3", n)
	}
	if got := b.take("eth0", false); !slices.Equal(got, []boundSocket{a4}) {
		t.Errorf("take(eth0, IPv4) = %v, want only the IPv4 socket", got)
	}
	if got := b.take("eth0", false); len(got) != 0 {
		t.Errorf("second take(eth0, IPv4) = %v, want none", got)
	}
	b.remove(a4) // already taken: a no-op
	b.remove(w4)
	if n := b.count(); n != 1 {
		t.Errorf("count = %d, want 1 (eth0's IPv6 socket)", n)
	}
	if got := b.take("wlan0", false); len(got) != 0 {
		t.Errorf("take(wlan0) after its socket closed = %v", got)
	}
	b.remove(a6)
	if n := b.count(); n != 0 || len(b.by) != 0 {
		t.Errorf("after every remove: count %d, %d interfaces kept", n, len(b.by))
	}
}
