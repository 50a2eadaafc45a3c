//go:build !linux

package sysroute

import "errors"

// RouteLookup fails: it is Linux-only for now.
func RouteLookup(q RouteQuery) RouteAnswer {
	return RouteAnswer{Err: errors.New("route lookups are not supported on this OS yet")}
}
