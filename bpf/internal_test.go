//go:build linux

package bpf

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// 4.19 refuses programs of 4096 instructions or more (BPF_MAXINSNS).
func TestInstructionCounts(t *testing.T) {
	spec, err := Spec(MapSizes{})
	if err != nil {
		t.Fatal(err)
	}
	if len(spec.Programs) != len(progDefs) {
		t.Fatalf("%d programs in the object, %d known to the loader", len(spec.Programs), len(progDefs))
	}
	for _, name := range ProgramNames() {
		p := spec.Programs[name]
		if p == nil {
			t.Fatalf("program %s missing from the object", name)
		}
		n := int(p.Instructions.Size() / asm.InstructionSize)
		t.Logf("%-14s %-22s %4d instructions", name, p.SectionName, n)
		if n >= 4096 {
			t.Errorf("%s: %d instructions, 4.19 allows < 4096", name, n)
		}
	}
}

func TestPolyfillReplacesMissingHelpers(t *testing.T) {
	spec, err := Spec(MapSizes{})
	if err != nil {
		t.Fatal(err)
	}
	before := map[string]uint64{}
	for name, p := range spec.Programs {
		before[name] = p.Instructions.Size()
	}
	full := Report{}
	for _, d := range featureDefs {
		full.Features = append(full.Features, FeatureStatus{Feature: d.feature, Mandatory: d.mandatory, Available: true})
	}
	if got := polyfillHelpers(spec, full); len(got) != 0 {
		t.Fatalf("polyfilled %v on a full kernel", got)
	}
	old := full.Without(FeatHelperSetRetval, FeatHelperNetnsCook, FeatHelperSockCook)
	got := polyfillHelpers(spec, old)
	if len(got) != 3 {
		t.Fatalf("polyfilled %v", got)
	}
	for name, p := range spec.Programs {
		if p.Instructions.Size() != before[name] {
			t.Errorf("%s changed size", name)
		}
		for _, ins := range p.Instructions {
			if !ins.IsBuiltinCall() {
				continue
			}
			switch asm.BuiltinFunc(ins.Constant) {
			case asm.FnSetRetval, asm.FnGetNetnsCookie, asm.FnGetSocketCookie:
				t.Errorf("%s still calls %v", name, asm.BuiltinFunc(ins.Constant))
			}
		}
	}
}

func TestReportWithout(t *testing.T) {
	r := Report{Features: []FeatureStatus{
		{Feature: FeatConnect4, Mandatory: true, Available: true},
		{Feature: FeatHelperSetRetval, Available: true},
	}}
	w := r.Without(FeatConnect4, FeatHelperSetRetval)
	if !r.Has(FeatConnect4) {
		t.Fatal("Without changed the original")
	}
	if len(w.Missing()) != 1 || len(w.Degraded()) != 1 {
		t.Fatalf("missing %v degraded %v", w.Missing(), w.Degraded())
	}
}

func TestCheckCgroupRefusesRoot(t *testing.T) {
	root := "/sys/fs/cgroup/unified"
	if err := checkFS(root, cgroup2Magic, "cgroup2"); err != nil {
		t.Skipf("no cgroup2 at %s", root)
	}
	if err := checkCgroup(root, false); err == nil {
		t.Fatal("cgroup2 root accepted")
	}
	if err := checkCgroup(root, true); err != nil {
		t.Fatalf("AllowRootCgroup: %v", err)
	}
	if err := checkCgroup(t.TempDir(), false); err == nil {
		t.Fatal("non-cgroup directory accepted")
	}
	// Any child cgroup passes; find one without creating anything.
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		if e.IsDir() {
			if err := checkCgroup(filepath.Join(root, e.Name()), false); err != nil {
				t.Fatalf("child cgroup %s: %v", e.Name(), err)
			}
			break
		}
	}
}

func TestIntegrationProbe(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root to load probe programs")
	}
	r, err := Probe()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("probe:\n%s", r)
	if len(r.Features) != len(featureDefs) {
		t.Fatalf("%d results for %d features", len(r.Features), len(featureDefs))
	}
	if m := r.Missing(); len(m) > 0 {
		t.Errorf("mandatory features missing on this kernel: %v", m)
	}
	if d := r.Degraded(); len(d) > 0 {
		t.Errorf("optional features missing on this kernel: %v", d)
	}
}

// TestIntegrationVerifier loads every program into the kernel, full and with
// every optional helper polyfilled, and logs what the verifier processed.
func TestIntegrationVerifier(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root to load programs")
	}
	r, err := Probe()
	if err != nil {
		t.Fatal(err)
	}
	for name, report := range map[string]Report{
		"full":     r,
		"polyfill": r.Without(FeatHelperSetRetval, FeatHelperNetnsCook, FeatHelperSockCook),
	} {
		t.Run(name, func(t *testing.T) {
			spec, err := Spec(MapSizes{Services: 64, Backends: 64, RevNat: 64, Affinity: 64, AffinityMatch: 64, SockRevNat: 64})
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range spec.Maps {
				m.Pinning = ebpf.PinNone
			}
			polyfillHelpers(spec, report)
			coll, err := ebpf.NewCollection(spec)
			if err != nil {
				t.Fatalf("load: %+v", err)
			}
			defer coll.Close()
			for _, n := range ProgramNames() {
				info, err := coll.Programs[n].Info()
				if err != nil {
					t.Fatal(err)
				}
				v, _ := info.VerifiedInstructions()
				t.Logf("%-14s verifier processed %d instructions", n, v)
			}
		})
	}
}
