//go:build !linux

package doctor

// Inspect fails with ErrUnsupported: it is Linux-only for now.
func Inspect(c Config) (*HostState, error) {
	return nil, ErrUnsupported
}
