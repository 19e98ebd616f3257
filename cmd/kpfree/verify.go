package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kpfree/kpfree/bootstrap"
	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/ssh"
	"github.com/kpfree/kpfree/internal/ui"
	"github.com/kpfree/kpfree/verify"
)

func verifyCommand() *cli.Command {
	return &cli.Command{
		Name:  "verify",
		Usage: "prove the cluster runs without kube-proxy and kpfree-agent serves its Services (smoke tests); exit 1 on any failure",
		Description: `Checks: ` + strings.Join(verify.CheckNames(), ", ") + `.
The node checks (rules, ClusterIP and NodePort from every node) need SSH: pass --nodes.
A temporary namespace kpfree-verify-<random> holds the test workload; it is removed
at the end, whatever happens. See docs/verify.md.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "kubeconfig", Usage: "kubeconfig `FILE` (default: ./<cluster>.kubeconfig, else admin.conf of the first control plane over SSH, else $KUBECONFIG)"},
			&cli.StringFlag{Name: "image", Value: verify.DefaultImage, Usage: "echo server `IMAGE` (agnhost, run as `netexec`)"},
			&cli.StringFlag{Name: "pull-policy", Value: string(corev1.PullIfNotPresent), Usage: "image pull `POLICY` of the echo pods"},
			&cli.IntFlag{Name: "tries", Value: verify.DefaultTries, Usage: "requests per probe"},
			&cli.StringSliceFlag{Name: "check", Usage: "run only these `CHECKS` (comma-separated; the others are reported as skipped)"},
			&cli.DurationFlag{Name: "wait-timeout", Value: verify.DefaultWaitTimeout, Usage: "wait this long for the echo pods"},
			&cli.BoolFlag{Name: "keep-namespace", Usage: "leave the test namespace in place (debugging)"},
		},
		Action: runVerify,
	}
}

func runVerify(c *cli.Context) error {
	e := newEnv(c)
	ctx, cancel := withTimeout(c)
	defer cancel()
	var inv *inventory.Inventory
	if globalString(c, "nodes") != "" {
		var err error
		if inv, err = loadInventory(c); err != nil {
			return err
		}
	}
	pp := corev1.PullPolicy(c.String("pull-policy"))
	switch pp {
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		return usagef("--pull-policy %q: must be Always, IfNotPresent or Never", pp)
	}
	only := splitList(c.StringSlice("check"))
	for _, n := range only {
		if !contains(verify.CheckNames(), n) {
			return usagef("--check %q: unknown check; one of %s", n, strings.Join(verify.CheckNames(), ", "))
		}
	}
	o := verify.Options{
		Image: c.String("image"), PullPolicy: pp, Tries: c.Int("tries"), Only: only,
		WaitTimeout: c.Duration("wait-timeout"), KeepNamespace: c.Bool("keep-namespace"),
		Concurrency: e.Concurrency, Logf: e.UI.Debugf,
	}
	var closeAll func()
	if inv != nil {
		var hosts map[string]ssh.Executor
		hosts, closeAll = executors(e, inv)
		defer closeAll()
		for _, t := range inv.Targets() {
			o.Hosts = append(o.Hosts, verify.Host{Name: t.Name, Address: t.Address, Exec: hosts[t.Name]})
		}
	}
	rc, src, err := verifyConfig(ctx, c, inv, o.Hosts)
	if err != nil {
		return err
	}
	e.UI.Debugf("cluster: %s (%s)", rc.Host, src)
	if o.Client, err = kubernetes.NewForConfig(rc); err != nil {
		return err
	}
	o.RESTConfig = rc
	if e.DryRun {
		e.UI.Infof("dry run: verify would create namespace %s<random> with %s and probe it; nothing done", verify.NamespacePrefix, o.Image)
		return nil
	}
	st := e.UI.Start("Verify the cluster")
	rep := verify.Run(ctx, o)
	if rep.OK {
		st.End(nil)
	} else {
		st.End(fmt.Errorf("%d of %d checks failed: %s", len(rep.Failed()), len(rep.Checks), rep.FailedNames()))
	}
	if err := writeVerify(e, rep); err != nil {
		return err
	}
	if !rep.OK {
		return failedError{"verify failed: " + rep.FailedNames()}
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// verifyConfig finds the cluster: --kubeconfig, ./<cluster>.kubeconfig,
// admin.conf of the first control plane over SSH, $KUBECONFIG.
func verifyConfig(ctx context.Context, c *cli.Context, inv *inventory.Inventory, hosts []verify.Host) (*rest.Config, string, error) {
	if p := c.String("kubeconfig"); p != "" {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, "", usagef("--kubeconfig: %v", err)
		}
		rc, err := bootstrap.RESTConfig(data)
		return rc, p, err
	}
	if inv != nil {
		p := inv.Cluster.Name + ".kubeconfig"
		if data, err := os.ReadFile(p); err == nil {
			rc, err := bootstrap.RESTConfig(data)
			return rc, p, err
		}
		first := inv.FirstControlPlane().Name
		for _, h := range hosts {
			if h.Name != first {
				continue
			}
			data, err := ssh.Output(ctx, h.Exec, "cat "+bootstrap.AdminConfPath)
			if err != nil {
				return nil, "", fmt.Errorf("no kubeconfig: %s not found here and %s:%s unreadable: %w", p, first, bootstrap.AdminConfPath, err)
			}
			rc, err := bootstrap.RESTConfig(data)
			return rc, first + ":" + bootstrap.AdminConfPath, err
		}
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, "", usagef("no cluster: pass --kubeconfig or --nodes (%v)", err)
	}
	return rc, "$KUBECONFIG", nil
}

func writeVerify(e *env, rep verify.Report) error {
	if e.Format == ui.JSON {
		return e.UI.WriteJSON(rep)
	}
	return writeVerifyTable(e, rep)
}

// writeVerifyTable writes one line per check; -v adds the details.
func writeVerifyTable(e *env, rep verify.Report) error {
	var rows [][]string
	for _, c := range rep.Checks {
		rows = append(rows, []string{c.Name, strings.ToUpper(string(c.Status)), oneLine(c.Evidence)})
		if e.Verbose > 0 {
			for _, d := range c.Details {
				rows = append(rows, []string{"", "", "  " + oneLine(d)})
			}
		}
	}
	return e.UI.WriteTable([]string{"CHECK", "STATUS", "EVIDENCE"}, rows)
}
