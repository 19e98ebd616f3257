package bootstrap

import (
	"context"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kpfree/kpfree/agent/podnet"
)

// podnetStep sets up kpfree's built-in pod networking (agent/podnet) on
// every host over SSH: the CNI configuration for the node's pod CIDR and
// routes to the other nodes' pod CIDRs. kpfree-agent keeps it in line once
// it runs podnet itself; both apply the same plan, so they agree.
type podnetStep struct {
	c *cluster
	// touched are the hosts this run changed.
	touched []*host
}

func (s *podnetStep) Title() string { return "Configure pod networking" }

func (s *podnetStep) opts() podnet.Options { return s.c.o.PodNet }

// nodes lists the cluster's Nodes by name.
func (c *cluster) nodes(ctx context.Context) (map[string]*corev1.Node, error) {
	cs, err := c.api(ctx)
	if err != nil || cs == nil {
		return nil, err
	}
	list, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	out := map[string]*corev1.Node{}
	for i := range list.Items {
		out[list.Items[i].Name] = &list.Items[i]
	}
	return out, nil
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func (s *podnetStep) Skip(ctx context.Context) (string, bool, error) {
	c := s.c
	nodes, err := c.nodes(ctx)
	if err != nil || nodes == nil {
		return "", false, err
	}
	all := podnetNodes(nodes)
	for _, h := range c.hosts {
		n := nodes[h.name()]
		if n == nil || !nodeReady(n) {
			return "", false, nil
		}
		p, err := podnet.Desired(h.name(), all, s.opts())
		if err != nil {
			return "", false, nil
		}
		out, err := h.query(ctx, s.opts().ObserveCommand())
		if err != nil {
			return "", false, err
		}
		if d := p.Drift(podnet.ParseObserved(out)); len(d) > 0 {
			return "", false, nil
		}
	}
	return fmt.Sprintf("every node has its CNI configuration and routes and is Ready (%d nodes)", len(c.hosts)), true, nil
}

func podnetNodes(m map[string]*corev1.Node) []podnet.Node {
	out := make([]podnet.Node, 0, len(m))
	for _, n := range m {
		out = append(out, podnet.FromNode(n))
	}
	return out
}

func (s *podnetStep) DryRun(ctx context.Context) error {
	c := s.c
	c.journal.record(s.Title(), HostAPI, "api", "wait until every Node has a pod CIDR (kube-controller-manager allocates them from "+c.cfg.PodSubnet+")")
	return c.forEach(ctx, c.hosts, func(ctx context.Context, h *host) error {
		c.journal.record(s.Title(), h.name(), "upload",
			fmt.Sprintf("upload %s (mode 0644): bridge %s, host-local IPAM over the pod CIDR of %s", s.opts().ConfPath(), s.opts().BridgeName(), h.name()))
		for _, o := range c.hosts {
			if o != h {
				c.journal.record(s.Title(), h.name(), "run",
					fmt.Sprintf("ip route replace <pod CIDR of %s> via <InternalIP of %s> proto %d", o.name(), o.name(), podnet.RouteProtocol))
			}
		}
		return nil
	})
}

func (s *podnetStep) Run(ctx context.Context) error {
	c := s.c
	var nodes map[string]*corev1.Node
	err := c.wait(ctx, "every node to get a pod CIDR", func(ctx context.Context) (bool, error) {
		var err error
		nodes, err = c.nodes(ctx)
		if err != nil {
			return false, err
		}
		var missing []string
		for _, h := range c.hosts {
			n := nodes[h.name()]
			if n == nil || len(podnet.FromNode(n).PodCIDRs) == 0 {
				missing = append(missing, h.name())
			}
		}
		if len(missing) > 0 {
			return false, fmt.Errorf("no pod CIDR yet on %s (is kube-controller-manager running with --allocate-node-cidrs?)", strings.Join(missing, ", "))
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	all := podnetNodes(nodes)
	s.touched = c.hosts
	err = c.forEach(ctx, c.hosts, func(ctx context.Context, h *host) error {
		p, err := podnet.Desired(h.name(), all, s.opts())
		if err != nil {
			return err
		}
		for _, w := range p.Warnings {
			c.o.UI.Warnf("%s: %s", h.name(), w)
		}
		if err := h.upload(ctx, s.Title(), p.ConfList, p.ConfPath, 0o644); err != nil {
			return err
		}
		_, err = h.run(ctx, s.Title(), p.Script(), "")
		return err
	})
	if err != nil {
		return err
	}
	return c.wait(ctx, "every node to be Ready", func(ctx context.Context) (bool, error) {
		nodes, err := c.nodes(ctx)
		if err != nil {
			return false, err
		}
		var notReady []string
		for _, h := range c.hosts {
			if n := nodes[h.name()]; n == nil || !nodeReady(n) {
				notReady = append(notReady, h.name())
			}
		}
		if len(notReady) > 0 {
			return false, fmt.Errorf("not Ready: %s", strings.Join(notReady, ", "))
		}
		return true, nil
	})
}

// Rollback removes the configuration file, the routes and the bridge.
func (s *podnetStep) Rollback(ctx context.Context) error {
	if len(s.touched) == 0 {
		return nil
	}
	cmd := s.opts().CleanupScript()
	return s.c.forEach(ctx, s.touched, func(ctx context.Context, h *host) error {
		_, err := h.run(ctx, "Roll back: "+s.Title(), cmd, "")
		return err
	})
}
