package preflight

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kpfree/kpfree/internal/inventory"
)

func statusOf(r Report, host, check string) (Finding, bool) {
	for _, f := range r.Findings {
		if f.Host == host && f.Check == check {
			return f, true
		}
	}
	return Finding{}, false
}

func wantStatus(t *testing.T, r Report, host, check string, st Status) Finding {
	t.Helper()
	f, ok := statusOf(r, host, check)
	if !ok {
		t.Errorf("%s %s: no finding", host, check)
		return f
	}
	if f.Status != st {
		t.Errorf("%s %s: %s, want %s (seen %q)", host, check, f.Status, st, f.Seen)
	}
	return f
}

func TestRunMixed(t *testing.T) {
	cp := &fakeExec{name: "cp1", spec: goodHost("cp1")}
	w1 := &fakeExec{name: "w1", spec: goodHost("w1")}
	down := &fakeExec{name: "w2", err: errors.New("dial tcp 198.18.0.13:22: connect: connection refused")}
	rep, err := Run(context.Background(), []Host{
		{Exec: cp, Role: inventory.RoleControlPlane},
		{Exec: w1, Role: inventory.RoleWorker},
		{Exec: down, Role: inventory.RoleWorker},
	}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Failed() || rep.Worst() != Fail {
		t.Error("report with an unreachable host does not fail")
	}
	// Findings: cp1's, then w1's, then w2's, each in check order.
	hostOrder := map[string]int{"cp1": 0, "w1": 1, "w2": 2}
	for i := 1; i < len(rep.Findings); i++ {
		a, b := rep.Findings[i-1], rep.Findings[i]
		if hostOrder[a.Host] > hostOrder[b.Host] ||
			(a.Host == b.Host && checkRank(a.Check) >= checkRank(b.Check)) {
			t.Fatalf("findings out of order at %d: %s/%s then %s/%s", i, a.Host, a.Check, b.Host, b.Check)
		}
	}
	for _, f := range rep.Findings {
		if checkRank(f.Check) == len(checkOrder) {
			t.Errorf("check %q is not in CheckIDs", f.Check)
		}
	}
	for _, h := range []string{"cp1", "w1"} {
		for _, f := range rep.For(h) {
			if f.Status != Pass {
				t.Errorf("%s %s: %s (%q)", h, f.Check, f.Status, f.Seen)
			}
		}
		// The cross-host checks ran between the two reachable hosts.
		f := wantStatus(t, rep, h, CheckHostnameUnique, Pass)
		if !strings.Contains(f.Seen, "unique among 2 hosts") {
			t.Errorf("%s: %q", h, f.Seen)
		}
		wantStatus(t, rep, h, CheckClockSkew, Pass)
	}
	got := rep.For("w2")
	if len(got) != 1 || got[0].Check != CheckSSHReachable || got[0].Status != Fail ||
		!strings.Contains(got[0].Seen, "connection refused") || got[0].Remedy == "" {
		t.Errorf("unreachable host: %+v", got)
	}
	if len(rep.Hosts) != 3 || rep.Hosts[2].Error == "" || rep.Hosts[2].Worst != Fail ||
		rep.Hosts[0].Kernel != "6.1.0-28-cloud-amd64" || rep.Hosts[0].Worst != Pass || rep.Hosts[0].Role != inventory.RoleControlPlane {
		t.Errorf("host summaries: %+v", rep.Hosts)
	}
	c := rep.Counts()
	if c.Fail != 1 || c.Warn != 0 || c.Pass != len(rep.Findings)-1 {
		t.Errorf("counts %+v", c)
	}
}

func TestRunGatherFailures(t *testing.T) {
	good := goodHost("x").render()
	for name, e := range map[string]*fakeExec{
		"exit":      {exit: 127, stderr: "sh: 1: uname: not found\n"},
		"truncated": {output: good[:len(good)/2]},
		"no begin":  {output: "sudo: a terminal is required\n"},
	} {
		t.Run(name, func(t *testing.T) {
			e.name = "h"
			rep, err := Run(context.Background(), []Host{{Exec: e, Role: inventory.RoleWorker}}, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Findings) != 1 || rep.Findings[0].Check != CheckGather || rep.Findings[0].Status != Fail {
				t.Fatalf("findings: %+v", rep.Findings)
			}
			if name == "exit" && !strings.Contains(rep.Findings[0].Seen, "uname: not found") {
				t.Errorf("seen %q lacks stderr", rep.Findings[0].Seen)
			}
		})
	}
}

func TestRunDuplicates(t *testing.T) {
	a, b, c := goodHost("node"), goodHost("NODE"), goodHost("other")
	c.machineID = b.machineID
	c.productUUID = a.productUUID
	rep, err := Run(context.Background(), []Host{
		{Exec: &fakeExec{name: "a", spec: a}, Role: inventory.RoleControlPlane},
		{Exec: &fakeExec{name: "b", spec: b}, Role: inventory.RoleWorker},
		{Exec: &fakeExec{name: "c", spec: c}, Role: inventory.RoleWorker},
	}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	f := wantStatus(t, rep, "a", CheckHostnameUnique, Fail)
	if !strings.Contains(f.Seen, `"node" is also on b`) {
		t.Errorf("seen %q", f.Seen)
	}
	wantStatus(t, rep, "b", CheckHostnameUnique, Fail)
	wantStatus(t, rep, "c", CheckHostnameUnique, Pass)
	wantStatus(t, rep, "a", CheckMachineIDUnique, Pass)
	wantStatus(t, rep, "b", CheckMachineIDUnique, Fail)
	f = wantStatus(t, rep, "c", CheckMachineIDUnique, Fail)
	if !strings.Contains(f.Seen, "also on b") || !strings.Contains(f.Remedy, "systemd-machine-id-setup") {
		t.Errorf("machine-id finding %+v", f)
	}
	wantStatus(t, rep, "a", CheckProductUUIDUnique, Warn)
	wantStatus(t, rep, "b", CheckProductUUIDUnique, Pass)
	wantStatus(t, rep, "c", CheckProductUUIDUnique, Warn)
	wantStatus(t, rep, "b", CheckHostname, Warn) // "NODE" is lowercased by kubeadm
}

func TestRunClockSkew(t *testing.T) {
	run := func(t *testing.T, offsets ...time.Duration) Report {
		var hosts []Host
		for i, off := range offsets {
			name := string(rune('a' + i))
			s := goodHost(name)
			s.clockOffset = off
			hosts = append(hosts, Host{Exec: &fakeExec{name: name, spec: s}, Role: inventory.RoleWorker})
		}
		rep, err := Run(context.Background(), hosts, Options{})
		if err != nil {
			t.Fatal(err)
		}
		return rep
	}
	t.Run("in sync", func(t *testing.T) {
		rep := run(t, 0, 100*time.Millisecond, -50*time.Millisecond)
		for _, h := range []string{"a", "b", "c"} {
			wantStatus(t, rep, h, CheckClockSkew, Pass)
		}
	})
	t.Run("one host off by 10s", func(t *testing.T) {
		rep := run(t, 0, 300*time.Millisecond, 10*time.Second)
		f := wantStatus(t, rep, "c", CheckClockSkew, Fail)
		if !strings.Contains(f.Seen, "disagrees with every other host") || !strings.Contains(f.Seen, "a by +") {
			t.Errorf("outlier seen %q", f.Seen)
		}
		f = wantStatus(t, rep, "a", CheckClockSkew, Fail)
		if !strings.Contains(f.Seen, "c by -") || strings.Contains(f.Seen, "every other") {
			t.Errorf("a seen %q", f.Seen)
		}
	})
	t.Run("2s is a warning", func(t *testing.T) {
		rep := run(t, 0, 2*time.Second)
		wantStatus(t, rep, "a", CheckClockSkew, Warn)
		wantStatus(t, rep, "b", CheckClockSkew, Warn)
	})
	t.Run("custom bounds", func(t *testing.T) {
		var hosts []Host
		for i, off := range []time.Duration{0, 2 * time.Second} {
			s := goodHost(string(rune('a' + i)))
			s.clockOffset = off
			hosts = append(hosts, Host{Exec: &fakeExec{name: s.hostname, spec: s}, Role: inventory.RoleWorker})
		}
		rep, _ := Run(context.Background(), hosts, Options{SkewWarn: 500 * time.Millisecond, SkewFail: time.Second})
		wantStatus(t, rep, "a", CheckClockSkew, Fail)
	})
	t.Run("busybox date has whole seconds", func(t *testing.T) {
		a, b := goodHost("a"), goodHost("b")
		b.noNanos = true
		rep, _ := Run(context.Background(), []Host{
			{Exec: &fakeExec{name: "a", spec: a}, Role: inventory.RoleWorker},
			{Exec: &fakeExec{name: "b", spec: b}, Role: inventory.RoleWorker},
		}, Options{})
		// Within a second either way, so never a failure; at most "cannot show it".
		if f, _ := statusOf(rep, "b", CheckClockSkew); f.Status == Fail {
			t.Errorf("whole-second clock failed: %q", f.Seen)
		}
	})
	t.Run("single host", func(t *testing.T) {
		rep := run(t, 3*time.Second)
		f := wantStatus(t, rep, "a", CheckClockSkew, Pass)
		if !strings.Contains(f.Seen, "offset to this machine +") {
			t.Errorf("seen %q", f.Seen)
		}
	})
}

func TestClockOffsetBounds(t *testing.T) {
	base := time.Unix(1_700_000_000, 0)
	c := Clock{Valid: true, Remote: base.Add(10 * time.Second), Resolution: time.Microsecond,
		LocalBefore: base, LocalAfter: base.Add(200 * time.Millisecond)}
	lo, hi := c.Offset()
	if lo != 9800*time.Millisecond || hi != 10*time.Second+time.Microsecond {
		t.Errorf("offset [%s, %s]", lo, hi)
	}
}

func TestRunParallelBound(t *testing.T) {
	var running, peak atomic.Int32
	var hosts []Host
	var execs []*fakeExec
	for i := range 6 {
		name := string(rune('a' + i))
		e := &fakeExec{name: name, spec: goodHost(name), delay: 20 * time.Millisecond, running: &running, peak: &peak}
		execs = append(execs, e)
		hosts = append(hosts, Host{Exec: e, Role: inventory.RoleWorker})
	}
	if _, err := Run(context.Background(), hosts, Options{Parallel: 2}); err != nil {
		t.Fatal(err)
	}
	if p := peak.Load(); p > 2 || p < 1 {
		t.Errorf("peak concurrency %d, want 1..2", p)
	}
	for _, e := range execs {
		if e.calls.Load() != 1 {
			t.Errorf("%s ran %d times", e.name, e.calls.Load())
		}
	}
}

func TestRunTimeoutAndCancel(t *testing.T) {
	slow := &fakeExec{name: "slow", spec: goodHost("slow"), delay: time.Minute}
	fast := &fakeExec{name: "fast", spec: goodHost("fast")}
	rep, err := Run(context.Background(), []Host{
		{Exec: slow, Role: inventory.RoleWorker}, {Exec: fast, Role: inventory.RoleWorker},
	}, Options{Timeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	f := wantStatus(t, rep, "slow", CheckSSHReachable, Fail)
	if !strings.Contains(f.Seen, "timed out") {
		t.Errorf("seen %q", f.Seen)
	}
	wantStatus(t, rep, "fast", CheckKernelVersion, Pass)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rep, err = Run(ctx, []Host{{Exec: slow, Role: inventory.RoleWorker}}, Options{})
	if !errors.Is(err, context.Canceled) || !rep.Failed() {
		t.Errorf("canceled run: err %v, failed %v", err, rep.Failed())
	}
}

func TestRunBadInput(t *testing.T) {
	if _, err := Run(context.Background(), nil, Options{}); err == nil {
		t.Error("no hosts: no error")
	}
	if _, err := Run(context.Background(), []Host{{Exec: &fakeExec{name: "a"}, Role: "master"}}, Options{}); err == nil {
		t.Error("bad role: no error")
	}
	if _, err := Run(context.Background(), []Host{{Role: inventory.RoleWorker}}, Options{}); err == nil {
		t.Error("nil executor: no error")
	}
}

func TestSummaryAndJSON(t *testing.T) {
	fs := []Finding{
		{Host: "a", Check: CheckSwap, Status: Pass, Seen: "no active swap"},
		{Host: "a", Check: CheckBPFJIT, Status: Warn, Seen: "x", Remedy: "y", Evidence: EvidenceHost},
	}
	if c := Count(fs); c != (Counts{Pass: 1, Warn: 1}) {
		t.Errorf("counts %+v", c)
	}
	if Worst(fs) != Warn || Worst(nil) != Pass {
		t.Error("Worst")
	}
	if (Report{Findings: fs}).Failed() {
		t.Error("warn counts as failed")
	}
	b, err := json.Marshal(fs[1])
	if err != nil {
		t.Fatal(err)
	}
	want := `{"host":"a","check":"bpf.jit","status":"warn","seen":"x","remedy":"y","evidence":"host"}`
	if string(b) != want {
		t.Errorf("json %s\nwant %s", b, want)
	}
	b, _ = json.Marshal(fs[0])
	if strings.Contains(string(b), "remedy") || strings.Contains(string(b), "evidence") {
		t.Errorf("empty remedy/evidence not omitted: %s", b)
	}
	b, _ = json.Marshal(HostSummary{Host: "a", Counts: Counts{Pass: 2}, Worst: Pass})
	if !strings.Contains(string(b), `"pass":2`) {
		t.Errorf("summary json %s", b)
	}
}
