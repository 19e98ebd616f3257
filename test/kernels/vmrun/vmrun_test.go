package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

type cpioEntry struct {
	name         string
	mode         uint32
	rmaj, rmin   uint32
	data         string
	dataAligned4 bool
}

// readCpio parses a newc archive strictly (magic, padding, trailer).
func readCpio(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	for {
		if off%4 != 0 {
			t.Fatalf("header at %d is not 4-aligned", off)
		}
		if len(b) < off+110 || string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic at %d", off)
		}
		field := func(i int) uint32 {
			v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
			if err != nil {
				t.Fatal(err)
			}
			return uint32(v)
		}
		mode, size, rmaj, rmin, nsize := field(1), field(6), field(9), field(10), field(11)
		name := string(b[off+110 : off+110+int(nsize)-1])
		if b[off+110+int(nsize)-1] != 0 {
			t.Fatalf("%s: name not NUL-terminated", name)
		}
		off += 110 + int(nsize)
		off = (off + 3) &^ 3
		data := string(b[off : off+int(size)])
		e := cpioEntry{name: name, mode: mode, rmaj: rmaj, rmin: rmin, data: data, dataAligned4: off%4 == 0}
		off += int(size)
		off = (off + 3) &^ 3
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out = append(out, e)
	}
}

func TestCpioRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	w := newCpioWriter(&buf)
	w.File("a/b/c.txt", 0o644, []byte("hello"))
	w.File("/a/odd", 0o755, []byte("123"))
	w.Symlink("bin/sh", "busybox")
	w.CharDev("dev/console", 0o600, 5, 1)
	w.FileFrom("big", 0o600, 7, strings.NewReader("1234567extra"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	got := map[string]cpioEntry{}
	var names []string
	for _, e := range readCpio(t, buf.Bytes()) {
		if !e.dataAligned4 {
			t.Errorf("%s: data not aligned", e.name)
		}
		if _, dup := got[e.name]; dup {
			t.Errorf("duplicate entry %s", e.name)
		}
		got[e.name] = e
		names = append(names, e.name)
	}
	// Parents come before children.
	want := []string{"a", "a/b", "a/b/c.txt", "a/odd", "bin", "bin/sh", "dev", "dev/console", "big"}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("entries %v, want %v", names, want)
	}
	for name, w := range map[string]struct {
		mode uint32
		data string
	}{
		"a":           {sIFDIR | 0o755, ""},
		"a/b/c.txt":   {sIFREG | 0o644, "hello"},
		"a/odd":       {sIFREG | 0o755, "123"},
		"bin/sh":      {sIFLNK | 0o777, "busybox"},
		"dev/console": {sIFCHR | 0o600, ""},
		"big":         {sIFREG | 0o600, "1234567"},
	} {
		if e := got[name]; e.mode != w.mode || e.data != w.data {
			t.Errorf("%s: mode %o data %q, want %o %q", name, e.mode, e.data, w.mode, w.data)
		}
	}
	if e := got["dev/console"]; e.rmaj != 5 || e.rmin != 1 {
		t.Errorf("console rdev %d:%d", e.rmaj, e.rmin)
	}
}

// TestCpioAcceptedByCpio cross-checks with GNU cpio when it is installed.
func TestCpioAcceptedByCpio(t *testing.T) {
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("cpio not installed")
	}
	dir := t.TempDir()
	var buf bytes.Buffer
	w := newCpioWriter(&buf)
	w.File("x/y", 0o644, []byte("data"))
	w.Symlink("x/l", "y")
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(cpio, "-idm", "--quiet")
	cmd.Dir, cmd.Stdin = dir, &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v\n%s", err, out)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "x/l")); err != nil || string(b) != "data" {
		t.Fatalf("extracted %q, %v", b, err)
	}
}

func TestInitScript(t *testing.T) {
	s := initScript(initConfig{
		Token:       "abcd",
		Kernel:      "5.10",
		Modules:     []string{"sch_ingress.ko", "cls_bpf.ko"},
		Env:         []string{"FOO=it's"},
		Binaries:    []testBinary{{Name: "bpf.test"}, {Name: "smoke.test"}},
		TestFlags:   []string{"-test.run", "Integration|Smoke"},
		TestTimeout: "4m15s",
	})
	for _, want := range []string{
		"mount -t bpf bpf /sys/fs/bpf",
		"mount -t cgroup2 cgroup2 /sys/fs/cgroup",
		"ip link set lo up",
		`echo "@@KPFREE-VMTEST abcd UNAME $(uname -r)"`,
		"insmod '/lib/modules/kpfree/sch_ingress.ko' || echo \"@@KPFREE-VMTEST abcd INSMOD-FAILED sch_ingress.ko\"",
		"export KPFREE_IN_VM=1",
		"export FOO='it'\\''s'",
		"'/tests/bpf.test' -test.v -test.timeout=4m15s '-test.run' 'Integration|Smoke' </dev/null 2>&1",
		`echo "@@KPFREE-VMTEST abcd END smoke.test exit=$rc"`,
		"poweroff -f",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("init script lacks %q:\n%s", want, s)
		}
	}
	if strings.Index(s, "sch_ingress.ko") > strings.Index(s, "cls_bpf.ko") {
		t.Error("modules out of order")
	}
	if strings.Index(s, "insmod") > strings.Index(s, "BEGIN bpf.test") {
		t.Error("modules loaded after the tests started")
	}
}

func TestInitScriptRunsInShell(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	s := initScript(initConfig{Token: "t", Kernel: "6.1", Binaries: []testBinary{{Name: "x.test"}}})
	cmd := exec.Command(sh, "-n")
	cmd.Stdin = strings.NewReader(s)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sh -n: %v\n%s\n%s", err, out, s)
	}
}

func feed(r *vmResult, tok, text string) {
	now := time.Unix(0, 0)
	for _, l := range strings.Split(text, "\n") {
		now = now.Add(time.Second)
		r.Feed(l, tok, now)
	}
}

func TestVerdicts(t *testing.T) {
	bins := []testBinary{{Name: "a.test"}, {Name: "b.test"}, {Name: "c.test"}, {Name: "d.test"}}
	r := newVMResult("5.10", "5.10.0-46-cloud-amd64", bins, time.Unix(0, 0))
	feed(r, "tok", strings.Join([]string{
		"[    0.1] something",
		"@@KPFREE-VMTEST tok UNAME 5.10.0-46-cloud-amd64\r",
		"@@KPFREE-VMTEST tok BEGIN a.test",
		"=== RUN   TestX",
		"--- PASS: TestX (0.01s)",
		"--- SKIP: TestY (0.00s)",
		"PASS",
		"@@KPFREE-VMTEST tok END a.test exit=0",
		"@@KPFREE-VMTEST tok BEGIN b.test",
		"--- FAIL: TestZ (0.01s)",
		"    --- FAIL: TestZ/sub (0.01s)",
		"FAIL",
		"@@KPFREE-VMTEST tok END b.test exit=1",
		"@@KPFREE-VMTEST tok BEGIN c.test",
		"PASS",                                     // printed by a test, but the binary then crashes
		"@@KPFREE-VMTEST forged END c.test exit=0", // wrong token: ignored
		"@@KPFREE-VMTEST tok END c.test exit=2",
		"@@KPFREE-VMTEST tok BEGIN d.test",
		"=== RUN   TestHang",
	}, "\n"))
	for name, want := range map[string]string{"a.test": "PASS", "b.test": "FAIL", "c.test": "FAIL", "d.test": "NO-EXIT"} {
		if got := r.Bins[name].Verdict(); got != want {
			t.Errorf("%s: %s, want %s", name, got, want)
		}
	}
	if a := r.Bins["a.test"]; len(a.Passed) != 1 || len(a.Skipped) != 1 {
		t.Errorf("a.test counts %+v", a)
	}
	if b := r.Bins["b.test"]; len(b.Failed) != 1 || b.Failed[0] != "TestZ" {
		t.Errorf("b.test failed %v (subtests must not count)", b.Failed)
	}
	if r.Release != "5.10.0-46-cloud-amd64" || r.Boot != time.Second*2 {
		t.Errorf("release %q boot %v", r.Release, r.Boot)
	}
	p := fmt.Sprint(r.VMProblems())
	if !strings.Contains(p, "did not reach the end") {
		t.Errorf("problems %s", p)
	}

	ok := newVMResult("6.1", "6.1.0-56-cloud-amd64", bins[:1], time.Unix(0, 0))
	feed(ok, "t", "@@KPFREE-VMTEST t UNAME 6.1.0-56-cloud-amd64\n@@KPFREE-VMTEST t BEGIN a.test\nPASS\n@@KPFREE-VMTEST t END a.test exit=0\n@@KPFREE-VMTEST t DONE")
	if !ok.Passed("a.test") || len(ok.Problems()) != 0 {
		t.Errorf("clean run: %v", ok.Problems())
	}

	wrong := newVMResult("6.1", "6.1.0-56-cloud-amd64", bins[:1], time.Unix(0, 0))
	feed(wrong, "t", "@@KPFREE-VMTEST t UNAME 6.1.0-1-cloud-amd64\n@@KPFREE-VMTEST t BEGIN a.test\nPASS\n@@KPFREE-VMTEST t END a.test exit=0\n@@KPFREE-VMTEST t DONE")
	if wrong.Passed("a.test") {
		t.Error("a run on the wrong kernel passed")
	}
}

func TestStripANSI(t *testing.T) {
	for in, want := range map[string]string{
		"\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS": "SeaBIOS",
		"plain\ttab":                         "plain\ttab",
		"Booting..\x1bc\x1b[?7l\x1b[2J@@X":   "Booting..@@X",
	} {
		if got := stripANSI(in); got != want {
			t.Errorf("stripANSI(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestVersionLess(t *testing.T) {
	if !versionLess("5.10", "6.1") || !versionLess("6.1", "6.12") || versionLess("6.12", "6.1") {
		t.Fatal("version order")
	}
}

func TestTestTimeout(t *testing.T) {
	if got := testTimeout(5 * time.Minute); got != "4m15s" {
		t.Errorf("5m -> %s", got)
	}
	if got := testTimeout(40 * time.Second); got != "30s" {
		t.Errorf("40s -> %s", got)
	}
}
