//go:build !linux

package sysroute

import "fmt"

// findCgroupHierarchy fails: cgroups are Linux's.
func findCgroupHierarchy(string) (cgroupHierarchy, error) {
	return cgroupHierarchy{}, fmt.Errorf("route.include_cgroups/route.exclude_cgroups: %w", ErrUnsupported)
}
