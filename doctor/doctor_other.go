//go:build !linux

package doctor

// Inspect fails with ErrDoctorUnsupported: it is Linux-only for now.
func Inspect(c DoctorConfig) (*HostState, error) {
	return nil, ErrDoctorUnsupported
}
