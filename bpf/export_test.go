//go:build linux

package bpf

// Internals for the integration tests of package bpf_test.
var (
	InVM          = inVM
	Cgroup2Mount  = cgroup2Mount
	IsCgroup2Root = isCgroup2Root
	NewCollection = newCollection
	KernelVersion = kernelVersion
	Polyfill      = polyfillHelpers
)
