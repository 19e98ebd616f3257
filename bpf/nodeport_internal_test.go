//go:build linux

package bpf

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// tcHeadroom: the tc programs are bigger than the socket LB's; each must stay
// under a quarter of the 4.19 limits (raw instructions and verifier work).
const tcHeadroom = 4

// TestIntegrationVerifierTC loads the four tc programs and checks (and logs)
// their size and what the verifier processed against the 4.19 limits.
func TestIntegrationVerifierTC(t *testing.T) {
	requireIntegration(t, "load programs")
	_, kernel, err := kernelVersion()
	if err != nil {
		t.Fatal(err)
	}
	spec, err := NodePortSpec()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range spec.Maps {
		m.Pinning = ebpf.PinNone
	}
	coll, err := newCollection(spec, ebpf.CollectionOptions{
		Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats},
	})
	if err != nil {
		t.Fatalf("load: %+v", err)
	}
	defer coll.Close()
	t.Logf("kernel %s", kernel)
	for _, h := range tcHooks {
		n := h.prog
		raw := int(spec.Programs[n].Instructions.Size() / asm.InstructionSize)
		st := parseVerifierLog(coll.Programs[n].VerifierLog)
		t.Logf("%-12s %4d insns (4.19 limit %d), verifier processed %5d (4.19 limit %d), peak states %d, stack %d B",
			n, raw, maxInsns419, st.processed, complexityLimit419, st.peakStates, st.stack)
		switch {
		case st.processed < 0:
			t.Errorf("%s: no instruction count in the verifier log:\n%s", n, coll.Programs[n].VerifierLog)
		case st.processed*tcHeadroom > complexityLimit419:
			t.Errorf("%s: %d processed instructions, more than 1/%d of the 4.19 limit %d", n, st.processed, tcHeadroom, complexityLimit419)
		}
		if raw*tcHeadroom > maxInsns419 {
			t.Errorf("%s: %d instructions, more than 1/%d of the 4.19 limit %d", n, raw, tcHeadroom, maxInsns419)
		}
		if st.stack > maxStack {
			t.Errorf("%s: stack %d B > %d", n, st.stack, maxStack)
		}
	}
}
