package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kpfree/kpfree/agent/podnet"
	"github.com/kpfree/kpfree/bootstrap"
	"github.com/kpfree/kpfree/internal/install"
	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/runner"
	"github.com/kpfree/kpfree/internal/ssh"
	"github.com/kpfree/kpfree/internal/ui"
	"github.com/kpfree/kpfree/verify"
)

func initCommand() *cli.Command {
	return &cli.Command{
		Name:  "init",
		Usage: "build a Kubernetes cluster without kube-proxy from the hosts of --nodes (kubeadm over SSH), install kpfree-agent, verify",
		Description: `Steps: preflight, render the kubeadm configuration, kubeadm init on the first
control plane (addon/kube-proxy skipped), fetch admin.conf, join the other control
planes and the workers, pod networking, kpfree-agent; then kpfree verify.
Re-running it on a built cluster changes nothing. When a step fails, what this run
did is undone (kubeadm reset -f on the hosts it initialised or joined).
See docs/init.md.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "kubeconfig-out", Usage: "write the admin kubeconfig to `FILE` (default ./<cluster name>.kubeconfig)"},
			&cli.StringFlag{Name: "cni", Value: bootstrap.CNIKpfree, Usage: "pod networking: kpfree (built-in bridge + routes) or none (install your own CNI)"},
			&cli.BoolFlag{Name: "pod-masquerade", Usage: "with --cni kpfree: masquerade pods' traffic leaving the node's pod CIDR"},
			&cli.StringFlag{Name: "kubelet-config", Usage: "KubeletConfiguration fields `FILE` (YAML) merged over the defaults (cgroupDriver: systemd)"},
			&cli.StringFlag{Name: "kubeadm-patches", Usage: "kubeadm patches `DIR`: DIR/* for every host, DIR/<host>/* for one host"},
			&cli.StringFlag{Name: "cri-socket", Usage: "container runtime `ENDPOINT` for kubeadm (default: detected)"},
			&cli.StringSliceFlag{Name: "ignore-preflight-errors", Usage: "kubeadm preflight `CHECKS` to ignore on init and join (comma-separated)"},
			&cli.StringFlag{Name: "agent-image", Usage: "kpfree-agent `IMAGE` (repository[:tag][@digest]); default: the chart's"},
			&cli.StringFlag{Name: "agent-pull-policy", Usage: "kpfree-agent image pull `POLICY`: Always, IfNotPresent or Never"},
			&cli.StringFlag{Name: "agent-values", Usage: "more kpfree-agent chart values from `FILE` (YAML; see templates/kpfree-agent/values.yaml)"},
			&cli.DurationFlag{Name: "agent-timeout", Value: install.DefaultTimeout, Usage: "wait this long for a ready agent on every node"},
			&cli.DurationFlag{Name: "wait-timeout", Value: bootstrap.DefaultWaitTimeout, Usage: "wait this long for the API server, the nodes and their pod CIDRs"},
			&cli.BoolFlag{Name: "no-rollback", Usage: "when a step fails, leave what was done in place (for debugging)"},
			&cli.BoolFlag{Name: "no-verify", Usage: "do not run kpfree verify at the end"},
			&cli.StringFlag{Name: "verify-image", Value: verify.DefaultImage, Usage: "echo server `IMAGE` of the verify step (agnhost)"},
		},
		Action: runInit,
	}
}

func runInit(c *cli.Context) error {
	e := newEnv(c)
	inv, err := loadInventory(c)
	if err != nil {
		return err
	}
	o := bootstrap.Options{
		Inventory:             inv,
		UI:                    e.UI,
		DryRun:                e.DryRun,
		NoRollback:            c.Bool("no-rollback"),
		Concurrency:           e.Concurrency,
		KubeconfigOut:         c.String("kubeconfig-out"),
		CNI:                   c.String("cni"),
		PodNet:                podnet.Options{Masquerade: c.Bool("pod-masquerade")},
		PatchesDir:            c.String("kubeadm-patches"),
		CRISocket:             c.String("cri-socket"),
		IgnorePreflightErrors: splitList(c.StringSlice("ignore-preflight-errors")),
		WaitTimeout:           c.Duration("wait-timeout"),
	}
	if o.CNI != bootstrap.CNIKpfree && o.CNI != bootstrap.CNINone {
		return usagef("--cni %q: must be %s or %s", o.CNI, bootstrap.CNIKpfree, bootstrap.CNINone)
	}
	if p := c.String("kubelet-config"); p != "" {
		if o.Kubelet, err = bootstrap.LoadKubeletConfig(p); err != nil {
			return usagef("--kubelet-config: %v", err)
		}
	}
	if o.Agent, err = agentOptions(c); err != nil {
		return err
	}
	if !c.Bool("no-verify") && o.CNI == bootstrap.CNIKpfree {
		o.Verify = &verify.Options{Image: c.String("verify-image"), Logf: e.UI.Debugf}
	}
	hosts, closeAll := executors(e, inv)
	defer closeAll()
	o.Hosts = hosts

	ctx, cancel := withTimeout(c)
	defer cancel()
	res, err := bootstrap.Init(ctx, o)
	var se *runner.StepError
	if err != nil && !errors.As(err, &se) && len(res.Steps) == 0 {
		return err // nothing ran: a configuration problem
	}
	if werr := writeInit(e, res); werr != nil {
		return werr
	}
	switch {
	case err != nil:
		return failedError{initFailure(res, err)}
	case !res.OK:
		return failedError{"the cluster is built but verify failed: " + res.Verify.FailedNames() + " (see above; kpfree verify runs the checks again)"}
	case res.DryRun:
		e.UI.Infof("dry run: nothing was changed")
	case !res.Changed:
		e.UI.Infof("nothing to do: cluster %s is already initialised (%d hosts)", res.Cluster, len(inv.Hosts))
	default:
		e.UI.Infof("cluster %s is ready without kube-proxy; kubeconfig: %s", res.Cluster, res.Kubeconfig)
	}
	if o.CNI == bootstrap.CNINone && !res.DryRun {
		e.UI.Infof("--cni none: install a pod network, then run kpfree verify")
	}
	return nil
}

// initFailure says which step failed and what was rolled back.
func initFailure(res *bootstrap.Result, err error) string {
	var rolled []string
	for _, s := range res.Steps {
		switch s.Status {
		case runner.RolledBack, runner.RollbackFailed:
			rolled = append(rolled, s.Title)
		}
	}
	msg := err.Error()
	var se *runner.StepError
	if errors.As(err, &se) {
		msg = fmt.Sprintf("step %q failed", se.Step)
	}
	if len(rolled) > 0 {
		msg += "; rolled back: " + strings.Join(rolled, ", ")
	}
	return msg
}

// agentOptions reads the kpfree-agent flags.
func agentOptions(c *cli.Context) (install.Options, error) {
	o := install.Options{Timeout: c.Duration("agent-timeout")}
	if img := c.String("agent-image"); img != "" {
		o.Values.Image = parseImage(img)
	}
	if pp := c.String("agent-pull-policy"); pp != "" {
		switch corev1.PullPolicy(pp) {
		case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
		default:
			return o, usagef("--agent-pull-policy %q: must be Always, IfNotPresent or Never", pp)
		}
		o.Values.Image.PullPolicy = pp
	}
	if p := c.String("agent-values"); p != "" {
		data, err := os.ReadFile(p)
		if err != nil {
			return o, usagef("--agent-values: %v", err)
		}
		if err := yaml.Unmarshal(data, &o.ExtraValues); err != nil {
			return o, usagef("--agent-values %s: %v", p, err)
		}
	}
	return o, nil
}

// parseImage splits repository[:tag][@digest].
func parseImage(s string) install.Image {
	var img install.Image
	if i := strings.Index(s, "@"); i >= 0 {
		s, img.Digest = s[:i], s[i+1:]
	}
	if i := strings.LastIndex(s, ":"); i > strings.LastIndex(s, "/") {
		s, img.Tag = s[:i], s[i+1:]
	}
	img.Repository = s
	return img
}

func splitList(in []string) []string {
	var out []string
	for _, s := range in {
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

// executors gives every host an executor that connects on first use.
func executors(e *env, inv *inventory.Inventory) (map[string]ssh.Executor, func()) {
	d := ssh.NewDialer(ssh.Options{Logger: hostLogger(e), Concurrency: e.Concurrency})
	m := map[string]ssh.Executor{}
	for _, t := range inv.Targets() {
		m[t.Name] = d.Lazy(t)
	}
	return m, func() {
		for _, x := range m {
			x.Close()
		}
	}
}

func writeInit(e *env, res *bootstrap.Result) error {
	if e.Format == ui.JSON {
		return e.UI.WriteJSON(res)
	}
	if res.DryRun {
		if err := bootstrap.WritePlan(e.UI.Out, res.Plan); err != nil {
			return err
		}
		fmt.Fprintln(e.UI.Out)
	}
	rows := make([][]string, 0, len(res.Steps))
	for _, s := range res.Steps {
		detail := s.Reason
		if s.Error != "" {
			detail = s.Error
		}
		if s.RollbackError != "" {
			detail += "; rollback failed: " + s.RollbackError
		}
		rows = append(rows, []string{s.Title, strings.ToUpper(string(s.Status)), fmt.Sprintf("%.1fs", s.Seconds), oneLine(detail)})
	}
	if err := e.UI.WriteTable([]string{"STEP", "STATUS", "TIME", "DETAIL"}, rows); err != nil {
		return err
	}
	if res.Verify != nil {
		fmt.Fprintln(e.UI.Out)
		return writeVerifyTable(e, *res.Verify)
	}
	return nil
}
