package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/internal/ui"
)

func labCommand() *cli.Command {
	dirFlag := &cli.StringFlag{Name: "dir", Usage: "lab state `DIR` (default " + lab.DefaultDir + " or $KPFREE_LAB_DIR)"}
	return &cli.Command{
		Name:  "lab",
		Usage: "lab hosts on this machine for tests and rehearsal: network namespaces running OpenSSH",
		Subcommands: []*cli.Command{
			{
				Name:  "up",
				Usage: "create (or grow) the lab; a no-op when it is already up",
				Flags: []cli.Flag{
					dirFlag,
					&cli.IntFlag{Name: "nodes", Value: 3, Usage: "how many nodes (node1 is the control plane)"},
					&cli.StringFlag{Name: "prefix", Usage: "`NAME` prefix of the lab's netns, links and cgroups (default " + lab.DefaultPrefix + "), for a second lab beside the first"},
					&cli.StringFlag{Name: "subnet", Usage: "lab `CIDR` inside 198.18.0.0/15 (default " + lab.DefaultSubnet + ")"},
					&cli.BoolFlag{Name: "kubernetes", Usage: "nodes that can run kubeadm: containerd, kubelet, kubeadm, kubectl, a systemctl stand-in, the images imported"},
					&cli.StringFlag{Name: "k8s-bin-dir", Usage: "`DIR` with kubeadm, kubelet and kubectl (default: make k8s-binaries' " + lab.DefaultK8sBinDir(lab.DefaultKubernetesVersion) + ")"},
					&cli.StringFlag{Name: "images", Usage: "image archive `FILE` to import (default: make images' " + lab.DefaultImages(lab.DefaultKubernetesVersion) + ", built when missing inside the source tree)"},
				},
				Action: func(c *cli.Context) error {
					e := newEnv(c)
					if c.Int("nodes") < 1 {
						return usagef("--nodes must be at least 1")
					}
					if !c.Bool("kubernetes") && (c.IsSet("k8s-bin-dir") || c.IsSet("images")) {
						return usagef("--k8s-bin-dir and --images go with --kubernetes")
					}
					var subnet netip.Prefix
					if c.IsSet("subnet") {
						p, err := netip.ParsePrefix(c.String("subnet"))
						if err != nil {
							return usagef("--subnet: %v", err)
						}
						subnet = p
					}
					ctx, cancel := withTimeout(c)
					defer cancel()
					o := lab.Options{Nodes: c.Int("nodes"), Dir: c.String("dir"), Prefix: c.String("prefix"), Subnet: subnet,
						Logf: e.UI.Debugf, Kubernetes: c.Bool("kubernetes"), K8sBinDir: c.String("k8s-bin-dir"), Images: c.String("images")}
					what := "nodes"
					if old, err := lab.Load(o.Dir); err == nil && old.Kubernetes {
						what = "Kubernetes nodes"
					}
					if o.Kubernetes {
						what = "Kubernetes nodes"
						if err := ensureImages(ctx, e, o); err != nil {
							return err
						}
					}
					st := e.UI.Start(fmt.Sprintf("Bringing up a lab of %d %s", o.Nodes, what))
					s, err := lab.Up(ctx, o)
					st.End(err)
					if err != nil {
						return err
					}
					return writeLab(e, s)
				},
			},
			{
				Name:  "down",
				Usage: "remove the lab and everything it created; a no-op when there is none",
				Flags: []cli.Flag{dirFlag},
				Action: func(c *cli.Context) error {
					e := newEnv(c)
					ctx, cancel := withTimeout(c)
					defer cancel()
					st := e.UI.Start("Removing the lab")
					err := lab.Down(ctx, c.String("dir"))
					st.End(err)
					if err != nil {
						return err
					}
					if e.Format == ui.JSON {
						return e.UI.WriteJSON(map[string]bool{"ok": true})
					}
					return nil
				},
			},
		},
	}
}

// ensureImages builds the default image archive when it is missing and this
// runs inside the kpfree source tree; elsewhere lab up says what is missing.
func ensureImages(ctx context.Context, e *env, o lab.Options) error {
	if o.Images != "" {
		return nil
	}
	images := lab.DefaultImages(lab.DefaultKubernetesVersion)
	if _, err := os.Stat(images); err == nil {
		return nil
	}
	binDir := o.K8sBinDir
	if binDir == "" {
		binDir = lab.DefaultK8sBinDir(lab.DefaultKubernetesVersion)
	}
	st := e.UI.Start("Building the images (go run ./test/images)")
	err := lab.BuildImages(ctx, binDir, images)
	st.End(err)
	return err
}

func writeLab(e *env, s *lab.State) error {
	type node struct {
		Name    string `json:"name"`
		Address string `json:"address"`
		NetNS   string `json:"netns"`
		// CgroupRoot is the kubelet's cgroupRoot on a Kubernetes node.
		CgroupRoot string `json:"cgroupRoot,omitempty"`
	}
	out := struct {
		Inventory  string `json:"inventory"`
		KnownHosts string `json:"knownHosts"`
		Identity   string `json:"identityFile"`
		Kubernetes bool   `json:"kubernetes"`
		Nodes      []node `json:"nodes"`
	}{s.InventoryFile(), s.KnownHostsFile(), s.IdentityFile(), s.Kubernetes, nil}
	header := []string{"NODE", "ADDRESS", "NETNS"}
	if s.Kubernetes {
		header = append(header, "CGROUP ROOT")
	}
	rows := [][]string{}
	for _, name := range s.NodeNames() {
		n := s.Node(name)
		nd := node{Name: name, Address: n.Address.String(), NetNS: n.NetNS}
		row := []string{name, n.Address.String(), n.NetNS}
		if s.Kubernetes {
			nd.CgroupRoot = s.CgroupPath(name)
			row = append(row, nd.CgroupRoot)
		}
		out.Nodes = append(out.Nodes, nd)
		rows = append(rows, row)
	}
	if e.Format == ui.JSON {
		return e.UI.WriteJSON(out)
	}
	if err := e.UI.WriteTable(header, rows); err != nil {
		return err
	}
	e.UI.Infof("inventory: %s", s.InventoryFile())
	e.UI.Infof("ssh: ssh -i %s -o UserKnownHostsFile=%s root@%s", s.IdentityFile(), s.KnownHostsFile(), out.Nodes[0].Address)
	if s.Kubernetes {
		e.UI.Infof("each node runs containerd (kubelet waits for kubeadm); kubeadm's KubeletConfiguration needs cgroupDriver: cgroupfs, failCgroupV1: false and the node's cgroupRoot (see docs/lab.md)")
	}
	return nil
}
