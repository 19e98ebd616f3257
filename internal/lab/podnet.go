package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"sort"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// PodNetworkConfig is the CNI config file SetupPodNetwork writes in nodes.
const PodNetworkConfig = CNIConfDir + "/10-kpfree-lab.conflist"

// PodBridge is the bridge the CNI config puts pods on in every node.
const PodBridge = "cni0"

// podNetworkConfig renders the CNI config of a node whose pods get addresses
// from podCIDR: the bridge plugin (cni0 as the pods' gateway, no masquerade:
// pod addresses are routed between nodes as they are) with host-local IPAM.
func podNetworkConfig(podCIDR netip.Prefix) ([]byte, error) {
	conf := map[string]any{
		"cniVersion": "0.4.0",
		"name":       "kpfree-lab",
		"plugins": []any{
			map[string]any{
				"type":        "bridge",
				"bridge":      PodBridge,
				"isGateway":   true,
				"ipMasq":      false,
				"hairpinMode": true,
				"ipam": map[string]any{
					"type":   "host-local",
					"ranges": [][]map[string]string{{{"subnet": podCIDR.Masked().String()}}},
					"routes": []map[string]string{{"dst": "0.0.0.0/0"}},
				},
			},
		},
	}
	data, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// SetupPodNetwork gives the lab's Kubernetes nodes a pod network, for tests
// (a cluster kpfree builds brings its own): podCIDRs maps node names to their
// Node's spec.podCIDR. Each of those nodes gets a bridge + host-local CNI
// config (PodNetworkConfig), and every node's netns a route to each other
// node's pod CIDR via that node's lab address. Nothing changes outside the
// nodes' own namespaces. It may be called again as nodes join.
func (s *State) SetupPodNetwork(ctx context.Context, podCIDRs map[string]netip.Prefix) error {
	names := make([]string, 0, len(podCIDRs))
	for name, cidr := range podCIDRs {
		if s.Node(name) == nil {
			return fmt.Errorf("lab %s has no node %q", s.Dir, name)
		}
		if !cidr.IsValid() {
			return fmt.Errorf("%s: no pod CIDR", name)
		}
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		conf, err := podNetworkConfig(podCIDRs[name])
		if err != nil {
			return err
		}
		script := `set -e; mkdir -p "$(dirname "$1")"; cat >"$1.tmp"; mv "$1.tmp" "$1"`
		if _, err := s.ExecInput(ctx, name, conf, "sh", "-c", script, "sh", PodNetworkConfig); err != nil {
			return err
		}
	}
	for _, node := range s.NodeNames() {
		n := s.Node(node)
		var routes []*netlink.Route
		for _, other := range names {
			if other == node {
				continue
			}
			o := s.Node(other)
			routes = append(routes, &netlink.Route{
				Dst: prefixToIPNet(podCIDRs[other].Masked()),
				Gw:  net.IP(o.Address.AsSlice()),
			})
		}
		if err := addRoutes(n, routes); err != nil {
			return err
		}
	}
	return nil
}

// addRoutes adds (or replaces) routes via eth0 in node n's netns.
func addRoutes(n *Node, routes []*netlink.Route) error {
	if len(routes) == 0 {
		return nil
	}
	ns, err := netns.GetFromPath(n.NetNS)
	if err != nil {
		return fmt.Errorf("%s: open netns: %w", n.Name, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("%s: netlink: %w", n.Name, err)
	}
	defer h.Close()
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("%s: eth0: %w", n.Name, err)
	}
	for _, r := range routes {
		r.LinkIndex = eth0.Attrs().Index
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("%s: route %s via %s: %w", n.Name, r.Dst, r.Gw, err)
		}
	}
	return nil
}
