//go:build linux

package bpf

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"
)

// RemoveMemlock lifts RLIMIT_MEMLOCK where the kernel needs it: before 5.11
// every BPF map and program is charged to the owner's locked memory (64 KiB by
// default before 5.16, the uid's total across processes), so loading the
// datapath fails with EPERM ("MEMLOCK may be too low") unless the limit is
// gone. From 5.11 on BPF memory is charged to the memory cgroup and this is a
// no-op (cilium/ebpf detects that with a probe, not a version check).
//
// Every path of this package that creates a map or loads a program ([Probe],
// [Load], [NewMaps], the loader's collection) calls it first; code that loads
// BPF objects by other means (tools, tests) should call it too. It may be
// called any number of times.
func RemoveMemlock() error {
	if err := rlimit.RemoveMemlock(); err != nil {
		return fmt.Errorf("bpf: remove memlock limit: %w", err)
	}
	return nil
}

// newCollection is ebpf.NewCollectionWithOptions after RemoveMemlock: [Load]
// and the tests load collections only through it (NewMaps and Probe, which
// create single objects, call RemoveMemlock themselves).
func newCollection(spec *ebpf.CollectionSpec, opts ebpf.CollectionOptions) (*ebpf.Collection, error) {
	if err := RemoveMemlock(); err != nil {
		return nil, err
	}
	return ebpf.NewCollectionWithOptions(spec, opts)
}
