package main

import (
	"fmt"

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
				},
				Action: func(c *cli.Context) error {
					e := newEnv(c)
					if c.Int("nodes") < 1 {
						return usagef("--nodes must be at least 1")
					}
					ctx, cancel := withTimeout(c)
					defer cancel()
					st := e.UI.Start(fmt.Sprintf("Bringing up a lab of %d nodes", c.Int("nodes")))
					s, err := lab.Up(ctx, lab.Options{Nodes: c.Int("nodes"), Dir: c.String("dir"), Logf: e.UI.Debugf})
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

func writeLab(e *env, s *lab.State) error {
	type node struct {
		Name    string `json:"name"`
		Address string `json:"address"`
		NetNS   string `json:"netns"`
	}
	out := struct {
		Inventory  string `json:"inventory"`
		KnownHosts string `json:"knownHosts"`
		Identity   string `json:"identityFile"`
		Nodes      []node `json:"nodes"`
	}{s.InventoryFile(), s.KnownHostsFile(), s.IdentityFile(), nil}
	rows := [][]string{}
	for _, name := range s.NodeNames() {
		n := s.Node(name)
		out.Nodes = append(out.Nodes, node{name, n.Address.String(), n.NetNS})
		rows = append(rows, []string{name, n.Address.String(), n.NetNS})
	}
	if e.Format == ui.JSON {
		return e.UI.WriteJSON(out)
	}
	if err := e.UI.WriteTable([]string{"NODE", "ADDRESS", "NETNS"}, rows); err != nil {
		return err
	}
	e.UI.Infof("inventory: %s", s.InventoryFile())
	e.UI.Infof("ssh: ssh -i %s -o UserKnownHostsFile=%s root@%s", s.IdentityFile(), s.KnownHostsFile(), out.Nodes[0].Address)
	return nil
}
