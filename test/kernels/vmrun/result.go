package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// binResult is what one test binary did inside one VM.
type binResult struct {
	Name     string
	Began    bool
	Ended    bool
	Exit     int
	SawPASS  bool // go test's closing "PASS" (or "ok ...") line
	SawFAIL  bool // a closing "FAIL" line
	Passed   []string
	Failed   []string
	Skipped  []string
	Duration time.Duration
	began    time.Time
}

// Verdict is PASS only for exit status 0 together with go test's own PASS.
func (r *binResult) Verdict() string {
	switch {
	case !r.Began:
		return "NOT-RUN"
	case !r.Ended:
		return "NO-EXIT" // the VM died or timed out inside this binary
	case r.Exit == 0 && r.SawPASS && !r.SawFAIL:
		return "PASS"
	default:
		return "FAIL"
	}
}

// vmResult collects the markers of one VM run.
type vmResult struct {
	Kernel        string
	WantRelease   string
	Release       string // from the guest's uname -r
	InsmodFailed  []string
	Done          bool
	Bins          map[string]*binResult
	order         []string
	current       *binResult
	QemuErr       error
	TimedOut      bool
	Boot          time.Duration // qemu start to the UNAME marker
	Total         time.Duration
	start         time.Time
	sawUname      bool
	unexpectedMsg []string
}

func newVMResult(kernel, wantRelease string, bins []testBinary, start time.Time) *vmResult {
	r := &vmResult{Kernel: kernel, WantRelease: wantRelease, Bins: map[string]*binResult{}, start: start}
	for _, b := range bins {
		r.Bins[b.Name] = &binResult{Name: b.Name}
		r.order = append(r.order, b.Name)
	}
	return r
}

// Feed consumes one console line (without the trailing newline) received at
// time now.
func (r *vmResult) Feed(line, token string, now time.Time) {
	line = strings.TrimRight(line, "\r")
	marker := markerPrefix + " " + token + " "
	if i := strings.Index(line, marker); i >= 0 {
		r.marker(strings.TrimSpace(line[i+len(marker):]), now)
		return
	}
	if r.current == nil {
		return
	}
	// go test -v closing lines and top-level results (subtests are indented).
	t := strings.TrimSpace(line)
	switch {
	case line == "PASS" || strings.HasPrefix(line, "ok "):
		r.current.SawPASS = true
	case line == "FAIL" || strings.HasPrefix(line, "FAIL\t") || strings.HasPrefix(line, "FAIL "):
		r.current.SawFAIL = true
	case strings.HasPrefix(line, "--- PASS: "):
		r.current.Passed = append(r.current.Passed, testName(t))
	case strings.HasPrefix(line, "--- FAIL: "):
		r.current.Failed = append(r.current.Failed, testName(t))
	case strings.HasPrefix(line, "--- SKIP: "):
		r.current.Skipped = append(r.current.Skipped, testName(t))
	case strings.HasPrefix(line, "panic: ") && strings.Contains(line, "test timed out"):
		r.current.SawFAIL = true
	}
}

func testName(line string) string {
	f := strings.Fields(line)
	if len(f) >= 3 {
		return f[2]
	}
	return line
}

func (r *vmResult) marker(rest string, now time.Time) {
	kind, arg, _ := strings.Cut(rest, " ")
	switch kind {
	case "UNAME":
		r.Release = arg
		r.sawUname = true
		r.Boot = now.Sub(r.start)
	case "INSMOD-FAILED":
		r.InsmodFailed = append(r.InsmodFailed, arg)
	case "BEGIN":
		b := r.Bins[arg]
		if b == nil {
			r.unexpectedMsg = append(r.unexpectedMsg, "unknown binary "+arg)
			return
		}
		b.Began, b.began = true, now
		r.current = b
	case "END":
		name, ex, _ := strings.Cut(arg, " exit=")
		b := r.Bins[name]
		if b == nil {
			r.unexpectedMsg = append(r.unexpectedMsg, "unknown binary "+name)
			return
		}
		b.Ended = true
		b.Duration = now.Sub(b.began)
		n, err := strconv.Atoi(strings.TrimSpace(ex))
		if err != nil {
			n = -1
		}
		b.Exit = n
		r.current = nil
	case "DONE":
		r.Done = true
	}
}

// VMProblems lists what went wrong with the VM itself (boot, kernel,
// modules, /init); any of them fails every binary of that kernel.
func (r *vmResult) VMProblems() []string {
	var p []string
	if r.TimedOut {
		p = append(p, "timed out")
	}
	if !r.sawUname {
		p = append(p, "the guest never reported uname -r (did the kernel boot? is /init running?)")
	} else if r.WantRelease != "" && r.Release != r.WantRelease {
		p = append(p, fmt.Sprintf("guest runs %q, expected %q", r.Release, r.WantRelease))
	}
	for _, m := range r.InsmodFailed {
		p = append(p, "insmod failed: "+m)
	}
	if !r.Done && !r.TimedOut {
		p = append(p, "the guest did not reach the end of /init")
	}
	p = append(p, r.unexpectedMsg...)
	if r.QemuErr != nil && !r.TimedOut {
		p = append(p, "qemu: "+r.QemuErr.Error())
	}
	return p
}

// Problems lists everything that makes this VM run a failure.
func (r *vmResult) Problems() []string {
	p := r.VMProblems()
	for _, n := range r.order {
		if v := r.Bins[n].Verdict(); v != "PASS" {
			p = append(p, fmt.Sprintf("%s: %s", n, v))
		}
	}
	return p
}

// Passed reports whether binary name passed on a sound VM.
func (r *vmResult) Passed(name string) bool {
	b := r.Bins[name]
	return b != nil && b.Verdict() == "PASS" && len(r.VMProblems()) == 0
}
