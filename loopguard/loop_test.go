package loopguard

import (
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/testlog"
)

func testLogger(*testing.T) (*slog.Logger, *testlog.Buffer) { return testlog.New() }

type fakeSockets struct {
	calls atomic.Int32
	info  sockInfo
	err   error
}

func (f *fakeSockets) find(string, netip.AddrPort, netip.AddrPort) (sockInfo, error) {
	f.calls.Add(1)
	return f.info, f.err
}

var (
	loopSrc = netip.MustParseAddrPort("172.19.0.1:40000")
	loopDst = netip.MustParseAddrPort("10.233.1.1:7")
)

func TestLoopDetector(t *testing.T) {
	tests := []struct {
		name     string
		cfg      Config
		info     sockInfo
		err      error
		owned    bool
		dialing  bool
		want     bool
		wantFind bool
	}{
		{"tracked, not dialling the destination: no lookup", Config{Marks: []uint32{0x2e7}, Tracked: true}, sockInfo{Mark: 0x2e7, HasMark: true}, nil, false, false, false, false},
		{"tracked, dialling the destination", Config{Marks: []uint32{0x2e7}, Tracked: true}, sockInfo{Mark: 0x2e7, HasMark: true}, nil, false, true, true, true},
		{"untracked: always asks", Config{Marks: []uint32{0x2e7}}, sockInfo{Mark: 0x2e7, HasMark: true}, nil, false, false, true, true},
		{"our mark", Config{Marks: []uint32{0x2e7}}, sockInfo{Mark: 0x2e7, HasMark: true}, nil, false, true, true, true},
		{"another outbound's mark", Config{Marks: []uint32{0x2e7, 0x100}}, sockInfo{Mark: 0x100, HasMark: true}, nil, false, true, true, true},
		{"an app's mark", Config{Marks: []uint32{0x2e7}}, sockInfo{Mark: 0x55, HasMark: true}, nil, true, true, false, true},
		{"no local socket (a LAN client)", Config{Marks: []uint32{0x2e7}}, sockInfo{}, errNoSocket, false, true, false, true},
		{"unmarked app socket", Config{Marks: []uint32{0x2e7}, Unmarked: true}, sockInfo{HasMark: true}, nil, false, true, false, true},
		{"unmarked socket of ours", Config{Marks: []uint32{0x2e7}, Unmarked: true}, sockInfo{HasMark: true}, nil, true, true, true, true},
		{"unmarked socket of ours, but every outbound is marked", Config{Marks: []uint32{0x2e7}}, sockInfo{HasMark: true}, nil, true, true, false, true},
		{"mark unknown (no CAP_NET_ADMIN), our file", Config{Unmarked: true}, sockInfo{}, nil, true, true, true, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fs := &fakeSockets{info: tc.info, err: tc.err}
			log, logs := testLogger(t)
			d := newLoopDetector(tc.cfg, log, fs.find, func(uint32) bool { return tc.owned })
			if tc.dialing {
				done := d.Dialing(netip.MustParseAddrPort("[::ffff:10.233.1.1]:7")) // mapped: same destination
				defer done()
			}
			if got := d.Loop("tcp", loopSrc, loopDst); got != tc.want {
				t.Errorf("Loop = %v, want %v", got, tc.want)
			}
			if (fs.calls.Load() > 0) != tc.wantFind {
				t.Errorf("socket lookups: %d, want some: %v", fs.calls.Load(), tc.wantFind)
			}
			if tc.want != strings.Contains(logs.String(), "routing loop") {
				t.Errorf("log:\n%s", logs)
			}
		})
	}
}

func TestLoopDialingDone(t *testing.T) {
	fs := &fakeSockets{info: sockInfo{Mark: 0x2e7, HasMark: true}}
	log, _ := testLogger(t)
	d := newLoopDetector(Config{Marks: []uint32{0x2e7}, Tracked: true}, log, fs.find, nil)
	done1 := d.Dialing(loopDst)
	done2 := d.Dialing(loopDst)
	done1()
	done1() // a second call is a no-op
	if !d.Loop("udp", loopSrc, loopDst) {
		t.Fatal("Loop = false while a second dial to the destination is under way")
	}
	done2()
	if d.Loop("udp", loopSrc, loopDst) {
		t.Fatal("Loop = true after every dial to the destination ended")
	}
	if len(d.pending) != 0 {
		t.Errorf("pending = %v, want empty", d.pending)
	}
	if d.Loops() != 1 {
		t.Errorf("Loops() = %d, want 1", d.Loops())
	}
	var nilD *Detector
	if nilD.Loop("tcp", loopSrc, loopDst) || nilD.Loops() != 0 || nilD.Close() != nil {
		t.Error("a nil detector must detect nothing")
	}
}

func TestLoopLogsOnceThenEveryMinute(t *testing.T) {
	fs := &fakeSockets{info: sockInfo{Mark: 0x999, HasMark: true}}
	log, logs := testLogger(t)
	d := newLoopDetector(Config{Marks: []uint32{0x999}, Excluded: []uint32{0x2e7}, Priority: 9000, Tun: "tg0"}, log, fs.find, nil)
	defer d.Dialing(loopDst)()
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() { d.Loop("tcp", loopSrc, loopDst) })
	}
	wg.Wait()
	if n := strings.Count(logs.String(), "routing loop"); n != 1 {
		t.Fatalf("%d log lines for 50 loops in a burst, want 1:\n%s", n, logs)
	}
	if !strings.Contains(logs.String(), "exclude fwmark 0x2e7, not 0x999") {
		t.Errorf("the log line lacks the fix:\n%s", logs)
	}
	d.logMu.Lock()
	d.logged = time.Now().Add(-2 * loopLogEvery)
	d.logMu.Unlock()
	d.Loop("tcp", loopSrc, loopDst)
	if !strings.Contains(logs.String(), "count=50") {
		t.Errorf("a minute later: want a line counting the 50 unlogged loops:\n%s", logs)
	}
}

func TestLoopAdvice(t *testing.T) {
	tests := []struct {
		cfg  Config
		info sockInfo
		want string
	}{
		{Config{Excluded: []uint32{0x2e7}}, sockInfo{HasMark: true}, "give the outbound a fwmark that route.auto excludes (0x2e7)"},
		{Config{}, sockInfo{}, "give the outbound a fwmark (outbounds[].fwmark)"},
		{Config{Excluded: []uint32{0x2e7}, Priority: 9000, Tun: "tg0"}, sockInfo{Mark: 0x2e7, HasMark: true}, "ip rule before priority 9000"},
		{Config{Excluded: []uint32{0x2e7}}, sockInfo{Mark: 0x5, HasMark: true}, "exclude fwmark 0x2e7, not 0x5"},
		{Config{Tun: "tg0"}, sockInfo{Mark: 0x5, HasMark: true}, "ip rule add fwmark 0x5 lookup main"},
	}
	for _, tc := range tests {
		d := newLoopDetector(tc.cfg, nil, nil, nil)
		if got := d.advice(tc.info); !strings.Contains(got, tc.want) {
			t.Errorf("advice(%+v, %+v) = %q, want it to contain %q", tc.cfg, tc.info, got, tc.want)
		}
	}
}
