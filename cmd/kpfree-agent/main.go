// Command kpfree-agent is kpfree's kube-proxy replacement: it watches the API
// server and programs the eBPF socket load balancer (bpf/) through
// agent/lbmap. This file holds flags and wiring only; the work is done in
// agent/... and bpf.
//
//	kpfree-agent run        the agent (a DaemonSet pod, or by hand)
//	kpfree-agent status     what is pinned and attached, counts, kernel features
//	kpfree-agent services   the load balancer maps as a table (-o json)
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
	"sigs.k8s.io/yaml"

	"github.com/kpfree/kpfree/internal/ui"
	"github.com/kpfree/kpfree/internal/version"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
)

type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

func main() {
	os.Exit(run(os.Args))
}

func run(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := newApp().RunContext(ctx, args)
	if err == nil {
		return exitOK
	}
	fmt.Fprintln(os.Stderr, "kpfree-agent:", err)
	var ue usageError
	if errors.As(err, &ue) {
		return exitUsage
	}
	return exitFailed
}

// Flags shared by several commands.
var (
	bpffsFlag = &cli.StringFlag{
		Name: "bpffs", Value: "/sys/fs/bpf", EnvVars: []string{"KPFREE_BPFFS"},
		Usage: "bpffs `DIR` for the pinned maps and links (run mounts one if absent)",
	}
	cgroupFlag = &cli.StringFlag{
		Name: "cgroup-root", EnvVars: []string{"KPFREE_CGROUP_ROOT"},
		Usage: "cgroup2 `DIR` whose processes get the load balancer (default: the host's cgroup2 root from /proc/mounts)",
	}
	healthAddrFlag = &cli.StringFlag{
		Name: "health-addr", Value: ":9876", EnvVars: []string{"KPFREE_HEALTH_ADDR"},
		Usage: "`ADDR` serving /healthz, /readyz and /metrics (\"\" disables)",
	}
	outputFlag = &cli.StringFlag{
		Name: "output", Aliases: []string{"o"}, Value: "table",
		Usage: "result format on stdout: table or json",
	}
)

func newApp() *cli.App {
	onUsage := func(c *cli.Context, err error, _ bool) error { return usageError{err} }
	app := &cli.App{
		Name:                 "kpfree-agent",
		Usage:                "eBPF socket load balancer for Kubernetes Services (kube-proxy replacement)",
		Version:              version.Get(),
		EnableBashCompletion: true,
		OnUsageError:         onUsage,
		ExitErrHandler:       func(*cli.Context, error) {},
		Commands: []*cli.Command{
			runCommand(),
			statusCommand(),
			servicesCommand(),
		},
	}
	for _, c := range app.Commands {
		c.OnUsageError = onUsage
	}
	return app
}

func output(c *cli.Context) (*ui.UI, error) {
	f, err := ui.ParseFormat(c.String("output"))
	if err != nil {
		return nil, usageError{err}
	}
	return ui.New(f, 0), nil
}

// cgroupRoot resolves --cgroup-root; explicit reports whether it was given.
func cgroupRoot(c *cli.Context) (path string, explicit bool, err error) {
	if p := c.String("cgroup-root"); p != "" {
		return p, true, nil
	}
	p, err := hostCgroup2Root()
	return p, false, err
}

// podArgsFile is where the Helm chart mounts the agent's `run` arguments
// (ConfigMap key "args", a YAML list).
const podArgsFile = "/etc/kpfree-agent/args"

// podDefaults makes `kpfree-agent status` and `services`, run inside the
// agent's pod (kubectl exec), look where the agent runs: --bpffs,
// --cgroup-root and --health-addr not given on the command line are taken
// from the agent's own arguments, with $(VAR) expanded from the environment
// as the kubelet does.
func podDefaults(path string) cli.BeforeFunc {
	return func(c *cli.Context) error {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil // not in the agent's pod
		}
		var args []string
		if err := yaml.Unmarshal(data, &args); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		for _, a := range args {
			name, val, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
			known := slices.ContainsFunc(c.Command.Flags, func(f cli.Flag) bool { return slices.Contains(f.Names(), name) })
			if !ok || !known || c.IsSet(name) {
				continue
			}
			val = os.Expand(strings.NewReplacer("$(", "${", ")", "}").Replace(val), os.Getenv)
			if err := c.Set(name, val); err != nil {
				return err
			}
		}
		return nil
	}
}
