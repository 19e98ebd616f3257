//go:build !linux

package preflight

import "runtime"

func probeKernel() *ProbeReport {
	return &ProbeReport{Note: "probing needs Linux, this is " + runtime.GOOS}
}
