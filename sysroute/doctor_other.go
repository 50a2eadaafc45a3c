//go:build !linux

package sysroute

// Inspect fails with ErrDoctorUnsupported: it is Linux-only for now.
func Inspect(c DoctorConfig) (*HostState, error) {
	return nil, ErrDoctorUnsupported
}

// RouteLookup fails with ErrDoctorUnsupported: it is Linux-only for now.
func RouteLookup(q RouteQuery) RouteAnswer {
	return RouteAnswer{Err: ErrDoctorUnsupported}
}
