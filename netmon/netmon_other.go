//go:build !linux

package netmon

// follow fails: only Linux is followed so far. (macOS would read the
// routing socket, PF_ROUTE: RTM_ADD, RTM_DELETE, RTM_CHANGE and
// RTM_IFINFO.) The Monitor then reports no default interface, and the
// outbounds that ask it bind to none.
func (m *Monitor) follow() (stop func(), err error) { return nil, ErrNotSupported }
