//go:build linux

package bpf

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
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
	root, err := cgroup2Mount()
	if err != nil {
		t.Skipf("no cgroup2: %v", err)
	}
	if !isCgroup2Root(root) {
		t.Skipf("the cgroup2 mount %s is a subtree (cgroup namespace or bind mount), not a hierarchy root", root)
	}
	t.Logf("cgroup2 root: %s", root)
	if err := checkCgroup(root, false); err == nil {
		t.Fatal("cgroup2 root accepted")
	}
	if err := checkCgroup(root, true); err != nil {
		t.Fatalf("AllowRootCgroup: %v", err)
	}
	if err := checkCgroup(t.TempDir(), false); err == nil {
		t.Fatal("non-cgroup directory accepted")
	}
	// Any child cgroup passes: an existing one, or (root, e.g. in the VM
	// where everything lives in the root) a temporary one.
	child := ""
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		if e.IsDir() {
			child = filepath.Join(root, e.Name())
			break
		}
	}
	if child == "" && os.Geteuid() == 0 {
		child, err = os.MkdirTemp(root, "kpfree-check-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.Remove(child) })
	}
	if child == "" {
		t.Log("no child cgroup to check (and no root to create one)")
		return
	}
	if err := checkCgroup(child, false); err != nil {
		t.Fatalf("child cgroup %s: %v", child, err)
	}
}

func TestKernelHas(t *testing.T) {
	for _, c := range []struct {
		v    [3]int
		spec string
		want bool
	}{
		{[3]int{5, 10, 262}, "5.8", true},
		{[3]int{5, 10, 0}, "5.18", false},
		{[3]int{6, 1, 0}, "5.18", true},
		{[3]int{5, 18, 0}, "5.18", true},
		{[3]int{4, 19, 0}, "4.19", true},
		{[3]int{4, 19, 56}, "5.2 or 4.19.57", false},
		{[3]int{4, 19, 57}, "5.2 or 4.19.57", true},
		{[3]int{4, 20, 0}, "5.2 or 4.19.57", false},
		{[3]int{5, 2, 0}, "5.2 or 4.19.57", true},
		{[3]int{6, 18, 44}, "3.19", true},
	} {
		got, err := kernelHas(c.v, c.spec)
		if err != nil || got != c.want {
			t.Errorf("kernelHas(%v, %q) = %v, %v; want %v", c.v, c.spec, got, err, c.want)
		}
	}
	for _, d := range featureDefs {
		if _, err := kernelHas([3]int{5, 10, 0}, d.kernel); err != nil {
			t.Errorf("%s: %v", d.feature, err)
		}
	}
	if _, err := kernelHas([3]int{5, 10, 0}, "5.x"); err == nil {
		t.Error("kernelHas accepted 5.x")
	}
	for s, want := range map[string][3]int{"5.10.0-46-cloud-amd64": {5, 10, 0}, "6.18.44-fc-v782": {6, 18, 44}, "6.1": {6, 1, 0}} {
		if got, ok := parseVersion(s); !ok || got != want {
			t.Errorf("parseVersion(%q) = %v", s, got)
		}
	}
	if got := unescapeMountField(`/a\040b\134c`); got != `/a b\c` {
		t.Errorf("unescape: %q", got)
	}
}

func requireIntegration(t *testing.T, why string) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root to " + why)
	}
}

// TestIntegrationProbe: the mandatory features are present; each optional one
// is present exactly when the running kernel's version says it should be, and
// a missing one is reported as Degraded (with its effect), never as Missing.
func TestIntegrationProbe(t *testing.T) {
	requireIntegration(t, "load probe programs")
	r, err := Probe()
	if err != nil {
		t.Fatal(err)
	}
	v, kernel, err := kernelVersion()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s, probe:\n%s", kernel, r)
	if len(r.Features) != len(featureDefs) {
		t.Fatalf("%d results for %d features", len(r.Features), len(featureDefs))
	}
	if m := r.Missing(); len(m) > 0 {
		t.Errorf("mandatory features missing on this kernel: %v", m)
	}
	if m := r.MissingForNodePort(); len(m) > 0 {
		t.Errorf("mandatory tc features missing on this kernel: %v", m)
	}
	degraded := append(r.Degraded(), r.DegradedForNodePort()...)
	for _, f := range r.Features {
		want, err := kernelHas(v, f.Kernel)
		if err != nil {
			t.Fatal(err)
		}
		if f.Available != want {
			t.Errorf("%s (Linux %s): probe says available=%v, kernel %s should be %v", f.Feature, f.Kernel, f.Available, kernel, want)
		}
		inDegraded := slices.Contains(degraded, f)
		switch {
		case !f.Mandatory && !f.Available && (!inDegraded || f.Effect == ""):
			t.Errorf("%s: missing optional feature not reported as Degraded with its effect", f.Feature)
		case (f.Mandatory || f.Available) && inDegraded:
			t.Errorf("%s: reported as Degraded", f.Feature)
		}
	}
	for _, f := range degraded {
		t.Logf("degraded: %s (Linux %s): %s", f.Feature, f.Kernel, f.Effect)
	}
}

// The oldest supported kernel (4.19) refuses programs of BPF_MAXINSNS (4096)
// instructions or more and stops verifying after BPF_COMPLEXITY_LIMIT_INSNS
// (131072) processed instructions; stacks are at most 512 bytes everywhere.
// "Well under" is an eighth: 4.19 prunes less than the kernels measured here.
const (
	maxInsns419        = 4096
	complexityLimit419 = 131072
	maxStack           = 512
	headroom           = 8
)

var (
	logProcessed = regexp.MustCompile(`processed (\d+) insns`)
	logPeak      = regexp.MustCompile(`peak_states (\d+)`)
	logStack     = regexp.MustCompile(`stack depth ([\d+]+)`)
)

type verifierStats struct {
	processed, peakStates, stack int // -1: not in the log
}

// parseVerifierLog reads the statistics line of a verifier log (BPF_LOG_STATS,
// 5.2+: "processed N insns (limit L) max_states_per_insn M total_states T
// peak_states P mark_read R" and "stack depth S[+S...]"; 4.19: "processed N
// insns (limit L), stack depth S").
func parseVerifierLog(log string) verifierStats {
	s := verifierStats{-1, -1, -1}
	if m := logProcessed.FindStringSubmatch(log); m != nil {
		s.processed, _ = strconv.Atoi(m[1])
	}
	if m := logPeak.FindStringSubmatch(log); m != nil {
		s.peakStates, _ = strconv.Atoi(m[1])
	}
	if m := logStack.FindStringSubmatch(log); m != nil {
		s.stack = 0
		for _, part := range strings.Split(m[1], "+") {
			n, _ := strconv.Atoi(part)
			s.stack = max(s.stack, n)
		}
	}
	return s
}

func TestParseVerifierLog(t *testing.T) {
	for log, want := range map[string]verifierStats{
		"verification time 60 usec\nstack depth 56\nprocessed 372 insns (limit 1000000) max_states_per_insn 1 total_states 30 peak_states 30 mark_read 9\n": {372, 30, 56},
		"processed 120 insns (limit 131072), stack depth 48\n":                                                               {120, -1, 48},
		"stack depth 8+16\nprocessed 5 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0": {5, 0, 16},
		"": {-1, -1, -1},
	} {
		if got := parseVerifierLog(log); got != want {
			t.Errorf("%q: %+v, want %+v", log, got, want)
		}
	}
}

// TestIntegrationVerifier loads every program into the kernel, full and with
// every optional helper polyfilled, and checks (and logs) what the verifier
// processed against the 4.19 limits.
func TestIntegrationVerifier(t *testing.T) {
	requireIntegration(t, "load programs")
	r, err := Probe()
	if err != nil {
		t.Fatal(err)
	}
	_, kernel, err := kernelVersion()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		report Report
	}{
		{"full", r},
		{"polyfill", r.Without(FeatHelperSetRetval, FeatHelperNetnsCook, FeatHelperSockCook)},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec, err := Spec(MapSizes{Services: 64, Backends: 64, RevNat: 64, Affinity: 64, AffinityMatch: 64, SockRevNat: 64})
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range spec.Maps {
				m.Pinning = ebpf.PinNone
			}
			emulated := polyfillHelpers(spec, c.report)
			coll, err := newCollection(spec, ebpf.CollectionOptions{
				Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats},
			})
			if err != nil {
				t.Fatalf("load: %+v", err)
			}
			defer coll.Close()
			t.Logf("kernel %s, emulated %v", kernel, emulated)
			for _, n := range ProgramNames() {
				raw := int(spec.Programs[n].Instructions.Size() / asm.InstructionSize)
				st := parseVerifierLog(coll.Programs[n].VerifierLog)
				info, err := coll.Programs[n].Info()
				if err != nil {
					t.Fatal(err)
				}
				// bpf_prog_info.verified_insns exists from 5.16 on; the log has it everywhere.
				fromInfo, haveInfo := info.VerifiedInstructions()
				t.Logf("%-14s %4d insns (4.19 limit %d), verifier processed %4d (4.19 limit %d), peak states %d, stack %d B",
					n, raw, maxInsns419, st.processed, complexityLimit419, st.peakStates, st.stack)
				switch {
				case st.processed < 0:
					t.Errorf("%s: no instruction count in the verifier log:\n%s", n, coll.Programs[n].VerifierLog)
				case haveInfo && int(fromInfo) != st.processed:
					t.Errorf("%s: verifier log says %d processed, prog info %d", n, st.processed, fromInfo)
				case st.processed*headroom > complexityLimit419:
					t.Errorf("%s: %d processed instructions, more than 1/%d of the 4.19 limit %d", n, st.processed, headroom, complexityLimit419)
				}
				if raw*headroom > maxInsns419 {
					t.Errorf("%s: %d instructions, more than 1/%d of the 4.19 limit %d", n, raw, headroom, maxInsns419)
				}
				if st.stack > maxStack {
					t.Errorf("%s: stack %d B > %d", n, st.stack, maxStack)
				}
			}
		})
	}
}
