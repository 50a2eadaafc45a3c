//go:build linux && race

package bench

// Under -race gVisor spins and every figure would measure the detector.
func init() { raceEnabled = true }
