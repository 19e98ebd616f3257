package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/ssh"
	"github.com/kpfree/kpfree/internal/ui"
	"github.com/kpfree/kpfree/preflight"
)

func preflightCommand() *cli.Command {
	return &cli.Command{
		Name:  "preflight",
		Usage: "check every host (or this machine with --local) before building a cluster; changes nothing",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "local", Usage: "check the machine kpfree runs on, without SSH (for Ansible)"},
			&cli.StringFlag{Name: "role", Value: string(inventory.RoleControlPlane), Usage: "with --local: control-plane or worker"},
			&cli.BoolFlag{Name: "require-kube-binaries", Usage: "fail, not warn, when kubeadm, kubelet or a container runtime is missing"},
		},
		Action: func(c *cli.Context) error {
			e := newEnv(c)
			ctx, cancel := withTimeout(c)
			defer cancel()
			opts := preflight.Options{RequireKubeBinaries: c.Bool("require-kube-binaries"), Parallel: e.Concurrency}
			var rep preflight.Report
			var err error
			if c.Bool("local") {
				role := inventory.Role(c.String("role"))
				if role != inventory.RoleControlPlane && role != inventory.RoleWorker {
					return usagef("--role %q: must be control-plane or worker", role)
				}
				st := e.UI.Start("Checking this machine")
				rep, err = preflight.Local(ctx, role, opts)
				st.End(err)
			} else {
				inv, lerr := loadInventory(c)
				if lerr != nil {
					return lerr
				}
				hosts, closeAll := connectAll(ctx, e, inv)
				defer closeAll()
				st := e.UI.Start(fmt.Sprintf("Checking %d hosts", len(hosts)))
				rep, err = preflight.Run(ctx, hosts, opts)
				st.End(err)
			}
			if err != nil && len(rep.Findings) == 0 {
				return err
			}
			if werr := writePreflight(e, rep); werr != nil {
				return werr
			}
			cnt := rep.Counts()
			if rep.Failed() {
				return failedError{fmt.Sprintf("preflight failed: %d checks failed, %d warnings on %d hosts", cnt.Fail, cnt.Warn, len(rep.Hosts))}
			}
			e.UI.Infof("preflight passed: %d checks, %d warnings on %d hosts", cnt.Pass+cnt.Warn, cnt.Warn, len(rep.Hosts))
			return nil
		},
	}
}

// loadInventory reads --nodes; a missing flag or a bad file is a usage error.
func loadInventory(c *cli.Context) (*inventory.Inventory, error) {
	path := globalString(c, "nodes")
	if path == "" {
		return nil, usagef("no inventory: pass --nodes hosts.yaml (see docs/inventory.md)")
	}
	inv, err := inventory.Load(path)
	if err != nil {
		return nil, usageError{err}
	}
	return inv, nil
}

// connectAll gives every host an executor that connects on first use, so
// each host is connected to and checked in one go: a dead host costs its own
// connect timeout and delays nobody else, and its error becomes its finding.
func connectAll(_ context.Context, e *env, inv *inventory.Inventory) ([]preflight.Host, func()) {
	d := ssh.NewDialer(ssh.Options{Logger: hostLogger(e), Concurrency: e.Concurrency})
	targets := inv.Targets()
	hosts := make([]preflight.Host, 0, len(targets))
	for _, t := range targets {
		hosts = append(hosts, preflight.Host{Exec: d.Lazy(t), Role: t.Role})
	}
	return hosts, func() {
		for _, h := range hosts {
			h.Exec.Close()
		}
	}
}

func hostLogger(e *env) ssh.Logger {
	if e.Verbose == 0 {
		return nil
	}
	return func(host, line string) { e.UI.HostLine(host, line) }
}

func writePreflight(e *env, rep preflight.Report) error {
	if e.Format == ui.JSON {
		return e.UI.WriteJSON(struct {
			OK       bool                    `json:"ok"`
			Summary  preflight.Counts        `json:"summary"`
			Hosts    []preflight.HostSummary `json:"hosts"`
			Findings []preflight.Finding     `json:"findings"`
		}{!rep.Failed(), rep.Counts(), stripFacts(rep.Hosts, e.Verbose), rep.Findings})
	}
	rows := make([][]string, 0, len(rep.Findings))
	for _, f := range rep.Findings {
		detail := f.Seen
		if f.Remedy != "" {
			detail += " -> " + f.Remedy
		}
		rows = append(rows, []string{f.Host, f.Check, strings.ToUpper(string(f.Status)), oneLine(detail)})
	}
	return e.UI.WriteTable([]string{"HOST", "CHECK", "STATUS", "DETAIL"}, rows)
}

// stripFacts keeps the raw facts out of the JSON unless -v asked for them.
func stripFacts(hs []preflight.HostSummary, verbose int) []preflight.HostSummary {
	out := append([]preflight.HostSummary(nil), hs...)
	if verbose > 0 {
		return out
	}
	for i := range out {
		out[i].Facts = nil
	}
	return out
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
