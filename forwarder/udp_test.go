package forwarder

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/tungate/tungate/internal/leakcheck"
	"github.com/tungate/tungate/outbound"
)

var (
	appSrc  = ap("10.0.0.2:40000")
	remote1 = ap("10.233.1.1:9001")
	remote2 = ap("10.233.1.2:9002")
	remote3 = ap("10.233.1.3:9003")
)

func longUDPConfig() UDPConfig {
	return UDPConfig{IdleTimeout: time.Minute, DNSIdleTimeout: time.Minute, MaxSessions: 64}
}

// newUDPTable returns a table that replies into a recorder and is closed
// when the test ends.
func newUDPTable(t *testing.T, cfg UDPConfig, route Route) (*UDPTable, *replyRecorder) {
	t.Helper()
	rec := &replyRecorder{}
	tbl, err := NewUDPTable(cfg, route, rec.reply, nil)
	if err != nil {
		t.Fatalf("NewUDPTable(%+v): %v", cfg, err)
	}
	t.Cleanup(func() { tbl.Close() })
	return tbl, rec
}

func sortDatagrams(ds []fakeDatagram) []fakeDatagram {
	slices.SortFunc(ds, func(a, b fakeDatagram) int {
		if a.payload < b.payload {
			return -1
		}
		if a.payload > b.payload {
			return 1
		}
		return 0
	})
	return ds
}

func TestNewUDPTableChecksConfig(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	reply := (&replyRecorder{}).reply
	good := longUDPConfig()
	for _, tc := range []struct {
		name  string
		cfg   UDPConfig
		route Route
		reply UDPReply
	}{
		{"nil route", good, nil, reply},
		{"nil reply", good, routeTo(d), nil},
		{"zero idle", UDPConfig{DNSIdleTimeout: time.Second, MaxSessions: 1}, routeTo(d), reply},
		{"zero dns idle", UDPConfig{IdleTimeout: time.Second, MaxSessions: 1}, routeTo(d), reply},
		{"zero max sessions", UDPConfig{IdleTimeout: time.Second, DNSIdleTimeout: time.Second}, routeTo(d), reply},
	} {
		if tbl, err := NewUDPTable(tc.cfg, tc.route, tc.reply, nil); err == nil {
			tbl.Close()
			t.Errorf("NewUDPTable with %s: got no error", tc.name)
		}
	}
}

// One app source reaching two destinations uses one upstream session, and
// a reply from a third remote the app never sent to reaches the app with
// that remote as its source (full cone).
func TestUDPEndpointIndependentMapping(t *testing.T) {
	leakcheck.Check(t)
	d := &fakeDialer{name: "fake"}
	tbl, rec := newUDPTable(t, longUDPConfig(), routeTo(d))

	if !tbl.Handle(appSrc, remote1, []byte("to-1")) {
		t.Fatalf("Handle(%s, %s): refused", appSrc, remote1)
	}
	if !tbl.Handle(appSrc, remote2, []byte("to-2")) {
		t.Fatalf("Handle(%s, %s): refused", appSrc, remote2)
	}
	waitFor(t, 2*time.Second, "one session with two writes", func() bool {
		s := d.sessions()
		return len(s) == 1 && len(s[0].written()) == 2
	})
	if n, _ := d.listenCount(); n != 1 {
		t.Fatalf("ListenUDP called %d times for one app source, want 1", n)
	}
	if got := tbl.Len(); got != 1 {
		t.Errorf("Len() = %d, want 1", got)
	}
	sess := d.sessions()[0]
	if sess.first != remote1 {
		t.Errorf("session opened towards %s, want the first destination %s", sess.first, remote1)
	}
	want := []fakeDatagram{{"to-1", remote1}, {"to-2", remote2}}
	if got := sortDatagrams(sess.written()); !slices.Equal(got, want) {
		t.Errorf("upstream writes = %v, want %v", got, want)
	}

	sess.inject(t, remote3, "from-3")
	sess.inject(t, remote1, "from-1")
	waitFor(t, 2*time.Second, "two replies at the app", func() bool { return len(rec.received()) == 2 })
	wantApp := []appDatagram{{"from-3", remote3, appSrc}, {"from-1", remote1, appSrc}}
	if got := rec.received(); !slices.Equal(got, wantApp) {
		t.Errorf("app received %v, want %v", got, wantApp)
	}
	st := tbl.Stats()
	if st.Opened.Load() != 1 || st.PacketsUp.Load() != 2 || st.PacketsDown.Load() != 2 || st.Dropped.Load() != 0 {
		t.Errorf("stats: opened %d up %d down %d dropped %d, want 1 2 2 0",
			st.Opened.Load(), st.PacketsUp.Load(), st.PacketsDown.Load(), st.Dropped.Load())
	}
}
