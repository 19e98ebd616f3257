package main

import (
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/urfave/cli/v2"
	"sigs.k8s.io/yaml"

	"github.com/kpfree/kpfree/internal/install"
	"github.com/kpfree/kpfree/internal/ui"
)

func installFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "kubeconfig", EnvVars: []string{"KUBECONFIG"}, Usage: "admin kubeconfig `FILE` of the cluster"},
		&cli.StringFlag{Name: "namespace", Value: install.DefaultNamespace, Usage: "namespace of the release"},
		&cli.StringFlag{Name: "release", Value: install.DefaultReleaseName, Usage: "Helm release name"},
	}
}

func installCommand() *cli.Command {
	return &cli.Command{
		Name:  "install",
		Usage: "install or upgrade kpfree-agent with Helm (strict mode) and wait until it is Ready on every node",
		Flags: append(installFlags(),
			&cli.StringFlag{Name: "api-server", Usage: "`HOST:PORT` the agent reaches the API server at, directly (default: --nodes' controlPlaneEndpoint)"},
			&cli.StringFlag{Name: "image", Usage: "agent image `REPO[:TAG][@DIGEST]` (default: the chart's release image)"},
			&cli.StringFlag{Name: "pull-policy", Value: "IfNotPresent", Usage: "Always, IfNotPresent or Never (an image imported into the nodes)"},
			&cli.StringFlag{Name: "cgroup-root", Usage: "cgroup2 directory the socket programs attach to (default: the host's cgroup2 root)"},
			&cli.StringFlag{Name: "cgroup-mount", Usage: "the host's cgroup2 mount (default /sys/fs/cgroup)"},
			&cli.StringFlag{Name: "values", Usage: "YAML `FILE` with more chart values, merged over the flags"},
			&cli.DurationFlag{Name: "wait", Value: install.DefaultTimeout, Usage: "how long install and the wait may take before rolling back"},
		),
		Action: func(c *cli.Context) error {
			e := newEnv(c)
			opts, err := installOptions(c)
			if err != nil {
				return err
			}
			hostPort := c.String("api-server")
			if hostPort == "" && globalString(c, "nodes") != "" {
				inv, err := loadInventory(c)
				if err != nil {
					return err
				}
				hostPort = inv.Cluster.ControlPlaneEndpoint
			}
			if hostPort == "" {
				return usagef("the agent needs the API server's address: pass --api-server HOST:PORT or --nodes hosts.yaml")
			}
			host, port, err := net.SplitHostPort(hostPort)
			if err != nil {
				return usagef("--api-server %q: want HOST:PORT", hostPort)
			}
			opts.Values.APIServerHost = host
			opts.Values.APIServerPort, _ = strconv.Atoi(port)
			opts.Values.Image = agentImage(c.String("image"), c.String("pull-policy"))
			opts.Values.CgroupRoot = c.String("cgroup-root")
			opts.Values.CgroupMount = c.String("cgroup-mount")
			opts.Timeout = c.Duration("wait")
			opts.DryRun = e.DryRun
			if f := c.String("values"); f != "" {
				b, err := os.ReadFile(f)
				if err != nil {
					return usagef("--values: %v", err)
				}
				if err := yaml.Unmarshal(b, &opts.ExtraValues); err != nil {
					return usagef("--values %s: %v", f, err)
				}
			}
			ctx, cancel := withTimeout(c)
			defer cancel()
			title := "Installing kpfree-agent"
			if ref := c.String("image"); ref != "" {
				title += " (" + ref + ")"
			}
			st := e.UI.Start(title)
			res, err := install.Install(ctx, opts)
			st.End(err)
			if err != nil {
				return err
			}
			if e.Format == ui.JSON {
				res.Manifest = ""
				return e.UI.WriteJSON(res)
			}
			agents := "not waited for"
			if res.Agents != nil {
				agents = fmt.Sprintf("%+v", *res.Agents)
			}
			return e.UI.WriteTable([]string{"RELEASE", "ACTION", "REVISION", "STATUS", "AGENTS"},
				[][]string{{res.Namespace + "/" + res.Release, res.Action, strconv.Itoa(res.Revision), res.Status, oneLine(agents)}})
		},
	}
}

func uninstallCommand() *cli.Command {
	return &cli.Command{
		Name:  "uninstall",
		Usage: "remove the kpfree-agent release (programs stay attached until nodes reboot or kpfree-agent cleans up)",
		Flags: installFlags(),
		Action: func(c *cli.Context) error {
			e := newEnv(c)
			opts, err := installOptions(c)
			if err != nil {
				return err
			}
			ctx, cancel := withTimeout(c)
			defer cancel()
			st := e.UI.Start("Uninstalling kpfree-agent")
			removed, err := install.Uninstall(ctx, opts)
			st.End(err)
			if err != nil {
				return err
			}
			if e.Format == ui.JSON {
				return e.UI.WriteJSON(map[string]bool{"removed": removed})
			}
			if !removed {
				e.UI.Infof("no release %s/%s: nothing to do", opts.Namespace, opts.ReleaseName)
			}
			return nil
		},
	}
}

func installOptions(c *cli.Context) (install.Options, error) {
	kc := c.String("kubeconfig")
	if kc == "" {
		return install.Options{}, usagef("pass --kubeconfig (the admin kubeconfig kpfree init wrote)")
	}
	return install.Options{Kubeconfig: kc, Namespace: c.String("namespace"), ReleaseName: c.String("release")}, nil
}

// agentImage is --image (repository[:tag][@digest], parsed as init's
// --agent-image is) with the pull policy; empty means the chart's default,
// the release image of the chart's appVersion.
func agentImage(ref, pull string) install.Image {
	img := parseImage(ref)
	img.PullPolicy = pull
	return img
}
