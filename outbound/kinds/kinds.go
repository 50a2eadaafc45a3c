// Package kinds links every outbound kind into the binary: each import
// registers one (see outbound.Register). Adding a kind is its folder and
// one line here.
package kinds

import (
	_ "github.com/tungate/tungate/outbound/direct"      // direct
	_ "github.com/tungate/tungate/outbound/httpconnect" // http
	_ "github.com/tungate/tungate/outbound/reject"      // reject
	_ "github.com/tungate/tungate/outbound/socks5"      // socks5
)
