// Package preflight checks hosts before kpfree builds a cluster on them. It
// changes nothing: one read-only sh script (Script) gathers each host's facts
// over its Executor, pure functions (Evaluate, CrossHost) turn the facts into
// findings, and Local adds probes of the running kernel when run on the host
// itself.
package preflight

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/ssh"
)

// Host is one host to check and its role.
type Host struct {
	Exec ssh.Executor
	Role inventory.Role
}

// Options tune a preflight run. The zero value is ready to use.
type Options struct {
	// RequireKubeBinaries fails, instead of warning, when kubeadm or kubelet
	// is missing or no container runtime socket is found. Leave it off for a
	// preflight before kpfree installs them; set it right before init/join.
	RequireKubeBinaries bool
	// Parallel is how many hosts are gathered at once (default 10).
	Parallel int
	// Timeout bounds one host's gather (default 60s).
	Timeout time.Duration
	// SkewWarn and SkewFail bound the clock difference between two hosts
	// (defaults 1s and 5s).
	SkewWarn, SkewFail time.Duration

	now func() time.Time // the local clock; tests replace it
}

func (o Options) withDefaults() Options {
	if o.Parallel <= 0 {
		o.Parallel = 10
	}
	if o.Timeout <= 0 {
		o.Timeout = 60 * time.Second
	}
	if o.SkewWarn <= 0 {
		o.SkewWarn = time.Second
	}
	if o.SkewFail <= 0 {
		o.SkewFail = 5 * time.Second
	}
	if o.now == nil {
		o.now = func() time.Time { return time.Now().Round(0) } // wall clock only
	}
	return o
}

// Run gathers every host's facts (at most opts.Parallel at once) and judges
// them. A host that cannot be gathered gets a single failing finding
// (ssh.reachable or host.gather) and the others proceed. The error is for
// bad input, or the context's error if it ended early (the report then holds
// what was found).
func Run(ctx context.Context, hosts []Host, opts Options) (Report, error) {
	if len(hosts) == 0 {
		return Report{}, errors.New("preflight: no hosts")
	}
	for i, h := range hosts {
		if h.Exec == nil {
			return Report{}, fmt.Errorf("preflight: host %d has no executor", i)
		}
		if h.Role != inventory.RoleControlPlane && h.Role != inventory.RoleWorker {
			return Report{}, fmt.Errorf("preflight: host %s: unknown role %q", h.Exec.Name(), h.Role)
		}
	}
	opts = opts.withDefaults()

	// Each host's failure becomes a finding, so the fan-out itself never fails.
	results := make([]hostResult, len(hosts))
	idx := make([]int, len(hosts))
	for i := range idx {
		idx[i] = i
	}
	_ = ssh.ForEach(ctx, idx, opts.Parallel, func(i int) string { return hosts[i].Exec.Name() },
		func(ctx context.Context, i int) error {
			results[i] = gather(ctx, hosts[i].Exec, opts)
			return nil
		})
	for i, r := range results {
		if r.facts == nil && r.fail == nil { // not started: the context ended first
			results[i] = hostResult{fail: &Finding{Host: hosts[i].Exec.Name(), Check: CheckSSHReachable, Status: Fail,
				Seen: fmt.Sprintf("not checked: %v", context.Cause(ctx)), Remedy: "run preflight again with a longer --timeout"}}
		}
	}
	return assemble(hosts, results, opts), ctx.Err()
}

// hostResult is a gathered host: facts, or the finding that says why not.
type hostResult struct {
	facts *Facts
	fail  *Finding
}

func gather(ctx context.Context, e ssh.Executor, opts Options) hostResult {
	ctx, cancel := context.WithTimeout(ctx, opts.Timeout)
	defer cancel()
	failed := func(check, seen, remedy string) hostResult {
		return hostResult{fail: &Finding{Host: e.Name(), Check: check, Status: Fail, Seen: seen, Remedy: remedy}}
	}
	before := opts.now()
	res, err := e.Run(ctx, Script)
	after := opts.now()
	if err != nil {
		seen := err.Error()
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil {
			seen = fmt.Sprintf("gather timed out after %s: %v", opts.Timeout, err)
		}
		return failed(CheckSSHReachable, seen,
			"check that the host is up and reachable over SSH, and that the SSH user may run sudo without a password")
	}
	if res.ExitCode != 0 {
		return failed(CheckGather, fmt.Sprintf("gather script exited %d: %s", res.ExitCode, firstLine(res.Stderr)), gatherRemedy)
	}
	f, err := ParseFacts(res.Stdout)
	if err != nil {
		seen := err.Error()
		if l := firstLine(res.Stderr); l != "" {
			seen += "; stderr: " + l
		}
		return failed(CheckGather, seen, gatherRemedy)
	}
	if f.Clock.Valid {
		f.Clock.LocalBefore, f.Clock.LocalAfter = before, after
	}
	return hostResult{facts: f}
}

const gatherRemedy = "check that the SSH user can run `sudo -n sh -c 'uname -r'` on the host and that /bin/sh works; stderr above says what went wrong"

func firstLine(b []byte) string {
	for i, c := range b {
		if c == '\n' {
			return string(b[:i])
		}
	}
	return string(b)
}

// assemble evaluates the gathered hosts, adds the cross-host findings and
// orders everything by host, then check.
func assemble(hosts []Host, results []hostResult, opts Options) Report {
	per := make([][]Finding, len(hosts))
	var gathered []HostFacts
	var index []int
	for i, r := range results {
		name := hosts[i].Exec.Name()
		if r.fail != nil {
			per[i] = []Finding{*r.fail}
			continue
		}
		per[i] = Evaluate(name, hosts[i].Role, r.facts, opts)
		gathered = append(gathered, HostFacts{Name: name, Facts: r.facts})
		index = append(index, i)
	}
	for k, fs := range crossHost(gathered, opts) {
		i := index[k]
		per[i] = append(per[i], fs...)
		sortFindings(per[i])
	}

	var rep Report
	for i, fs := range per {
		rep.Findings = append(rep.Findings, fs...)
		s := HostSummary{Host: hosts[i].Exec.Name(), Role: hosts[i].Role, Counts: Count(fs), Worst: Worst(fs)}
		if f := results[i].facts; f != nil {
			s.Kernel, s.OS, s.Facts = f.KernelRelease, f.OS, f
		} else {
			s.Error = results[i].fail.Seen
		}
		rep.Hosts = append(rep.Hosts, s)
	}
	return rep
}
