package preflight

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/ssh"
)

// Local checks the machine it runs on (`kpfree preflight --local`): the same
// gather script and checks as Run, plus probes of the running kernel with
// cilium/ebpf, which are authoritative where they are conclusive (findings
// carry Evidence "probed"). Probing needs root; without it the report says
// so (check bpf.probe) and the kernel checks fall back to config and version.
func Local(ctx context.Context, role inventory.Role, opts Options) (Report, error) {
	if role != inventory.RoleControlPlane && role != inventory.RoleWorker {
		return Report{}, errors.New("preflight: unknown role " + string(role))
	}
	opts = opts.withDefaults()
	name, err := os.Hostname()
	if err != nil || name == "" {
		name = "localhost"
	}
	sh := shellExecutor{name: name}
	r := gather(ctx, sh, opts)
	if r.facts != nil {
		r.facts.Probe = probeKernel()
	}
	return assemble([]Host{{Exec: sh, Role: role}}, []hostResult{r}, opts), ctx.Err()
}

// shellExecutor runs commands with the local sh, as the current user. It is
// only what Local needs; internal/ssh has the general local executor.
type shellExecutor struct{ name string }

var _ ssh.Executor = shellExecutor{}

func (s shellExecutor) Name() string { return s.name }

func (s shellExecutor) Run(ctx context.Context, cmd string) (ssh.Result, error) {
	c := exec.CommandContext(ctx, "sh", "-c", cmd)
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	err := c.Run()
	res := ssh.Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes()}
	var exitErr *exec.ExitError
	if errors.As(err, &exitErr) && ctx.Err() == nil {
		res.ExitCode = exitErr.ExitCode()
		return res, nil
	}
	if err != nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	return res, err
}

func (s shellExecutor) Upload(context.Context, []byte, string, fs.FileMode) error {
	return errors.New("preflight: read-only executor: upload not supported")
}

func (s shellExecutor) Close() error { return nil }
