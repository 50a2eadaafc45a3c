package main

import "testing"

func TestParseExplain(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"1.2.3.4:443/tcp", "1.2.3.4:443/tcp", true},
		{"[2001:db8::1]:53/udp", "[2001:db8::1]:53/udp", true},
		{"[::ffff:1.2.3.4]:80/tcp", "1.2.3.4:80/tcp", true},
		{"1.2.3.4:443", "", false},
		{"1.2.3.4:443/icmp", "", false},
		{"example.org:443/tcp", "", false},
		{"1.2.3.4/tcp", "", false},
	} {
		q, err := parseExplain(tc.in)
		if (err == nil) != tc.ok || (tc.ok && q.String() != tc.want) {
			t.Errorf("parseExplain(%q) = %v, %v; want %q (ok %v)", tc.in, q, err, tc.want, tc.ok)
		}
	}
}
