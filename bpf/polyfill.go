//go:build linux

package bpf

import (
	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// optionalHelpers are the helpers sock_lb.c calls that older kernels lack.
// Each call returns 0 when "missing", which the C code treats as: no cookie
// (shared key), or no custom error (the kernel's EPERM).
var optionalHelpers = []struct {
	feature Feature
	fn      asm.BuiltinFunc
}{
	{FeatHelperSockCook, asm.FnGetSocketCookie},
	{FeatHelperNetnsCook, asm.FnGetNetnsCookie},
	{FeatHelperSetRetval, asm.FnSetRetval},
}

// polyfillHelpers replaces every call to a helper the kernel lacks by
// "r0 = 0". Both are one 8-byte instruction, so no jump offset moves, and the
// instruction keeps its metadata (BTF line info, symbols). The verifier only
// rejects helpers it does not know, so this is what lets one object file load
// from 4.19 to current kernels without .rodata (global data needs 5.2).
// It returns the features it emulated.
func polyfillHelpers(spec *ebpf.CollectionSpec, r Report) []Feature {
	var done []Feature
	for _, h := range optionalHelpers {
		if r.Has(h.feature) {
			continue
		}
		for _, p := range spec.Programs {
			replaceHelperCalls(p.Instructions, h.fn)
		}
		done = append(done, h.feature)
	}
	return done
}

func replaceHelperCalls(insns asm.Instructions, fn asm.BuiltinFunc) int {
	n := 0
	for i, ins := range insns {
		if ins.IsBuiltinCall() && ins.Constant == int64(fn) {
			insns[i] = asm.Mov.Imm(asm.R0, 0).WithMetadata(ins.Metadata)
			n++
		}
	}
	return n
}
