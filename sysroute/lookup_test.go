package sysroute

import (
	"net/netip"
	"testing"
)

func TestRouteAnswerString(t *testing.T) {
	if got := (RouteAnswer{Table: 254, Dev: "eth0", Gateway: netip.MustParseAddr("192.168.1.1")}).String(); got != "table main via 192.168.1.1 dev eth0" {
		t.Errorf("RouteAnswer.String = %q", got)
	}
}
