// Package podnet is kpfree's built-in pod networking (`kpfree init --cni
// kpfree`, the default). Each node gets
//
//   - a CNI configuration for its own pod CIDR(s) (spec.podCIDRs, allocated by
//     kube-controller-manager): the reference "bridge" plugin with
//     "host-local" IPAM, the bridge being the pods' gateway; and
//   - one route per other node's pod CIDR, via that node's InternalIP of the
//     same IP family (protocol RouteProtocol, so kpfree's routes can be told
//     from everything else and stale ones removed).
//
// There is no overlay and no iptables: the nodes must share a link (or the
// network must route the pod CIDRs to the nodes), as in kind's kindnet or
// flannel's host-gw mode. Services are kpfree-agent's job, not this package's.
//
// The logic is pure (Desired: nodes in, a Plan out). A Plan is applied in
// three ways: by kpfree-agent on its own node (Run, which follows the Node
// objects, and Apply, with netlink), by kpfree over SSH until the agent does
// it (Plan.Script, Plan.ConfList), and checked for drift from what a node
// shows (Plan.Drift).
package podnet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Defaults of Options.
const (
	DefaultConfDir  = "/etc/cni/net.d"
	DefaultConfName = "05-kpfree.conflist"
	DefaultBridge   = "kpfree0"
	// NetworkName is the CNI network name in the configuration.
	NetworkName = "kpfree"
	// RouteProtocol marks the routes podnet installs (rtnetlink protocol
	// number, `ip route ... proto 201`); routes with it that the plan does
	// not hold are removed.
	RouteProtocol = 201
	cniVersion    = "1.0.0"
)

// ErrNoPodCIDR is returned by Desired when the node itself has no pod CIDR
// yet (kube-controller-manager has not allocated one, or it runs without
// --allocate-node-cidrs).
var ErrNoPodCIDR = errors.New("node has no pod CIDR yet (spec.podCIDRs is empty)")

// Options tune the configuration. The zero value takes the defaults.
type Options struct {
	// ConfDir and ConfName: where the CNI configuration list is written
	// (DefaultConfDir, DefaultConfName). The runtime uses the first file of
	// ConfDir in lexical order, hence the "05-" prefix.
	ConfDir  string
	ConfName string
	// Bridge is the Linux bridge the pods of a node are attached to
	// (DefaultBridge).
	Bridge string
	// MTU of the bridge and the pods' interfaces; 0 leaves the plugin's
	// default (the bridge's, 1500).
	MTU int
	// Masquerade makes the bridge plugin masquerade the pods' traffic to
	// addresses outside the node's own pod CIDR (ipMasq, iptables rules in
	// chains named CNI-*). Off by default: pods keep their addresses across
	// nodes; turn it on when pods must reach networks that do not route the
	// pod CIDRs back.
	Masquerade bool
}

func (o Options) withDefaults() Options {
	if o.ConfDir == "" {
		o.ConfDir = DefaultConfDir
	}
	if o.ConfName == "" {
		o.ConfName = DefaultConfName
	}
	if o.Bridge == "" {
		o.Bridge = DefaultBridge
	}
	return o
}

// ConfPath is where the configuration list is written.
func (o Options) ConfPath() string {
	o = o.withDefaults()
	return path.Join(o.ConfDir, o.ConfName)
}

// BridgeName is the pods' bridge.
func (o Options) BridgeName() string { return o.withDefaults().Bridge }

// CleanupScript is an sh script that removes what podnet set up on a node:
// the configuration file, the routes of RouteProtocol and the bridge.
func (o Options) CleanupScript() string {
	return fmt.Sprintf("rm -f %s; ip -4 route flush proto %d; ip -6 route flush proto %d 2>/dev/null; ip link del %s 2>/dev/null; true",
		o.ConfPath(), RouteProtocol, RouteProtocol, o.BridgeName())
}

// Node is what podnet needs of a Node object.
type Node struct {
	Name        string
	PodCIDRs    []netip.Prefix
	InternalIPs []netip.Addr
}

// FromNode takes a Node object's name, pod CIDRs (spec.podCIDRs, else
// spec.podCIDR) and InternalIP addresses. Unparsable values are left out.
func FromNode(n *corev1.Node) Node {
	out := Node{Name: n.Name}
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		if p, err := netip.ParsePrefix(c); err == nil {
			out.PodCIDRs = append(out.PodCIDRs, p.Masked())
		}
	}
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			out.InternalIPs = append(out.InternalIPs, ip.Unmap())
		}
	}
	return out
}

// FromNodes converts a list of Node objects (see FromNode).
func FromNodes(nodes []corev1.Node) []Node {
	out := make([]Node, len(nodes))
	for i := range nodes {
		out[i] = FromNode(&nodes[i])
	}
	return out
}

// Route is a route to another node's pod CIDR.
type Route struct {
	Dst  netip.Prefix `json:"dst"`
	Via  netip.Addr   `json:"via"`
	Node string       `json:"node,omitempty"`
}

func (r Route) String() string { return r.Dst.String() + " via " + r.Via.String() }

// Plan is the desired pod networking of one node.
type Plan struct {
	Node string `json:"node"`
	// PodCIDRs are the node's own pod CIDRs.
	PodCIDRs []netip.Prefix `json:"podCIDRs"`
	// ConfPath is where ConfList goes.
	ConfPath string `json:"confPath"`
	ConfList []byte `json:"-"`
	// Bridge is the pods' bridge; BridgeAddrs its addresses, the pods'
	// gateways: the first address of each pod CIDR (the bridge plugin's
	// default gateway).
	Bridge      string         `json:"bridge"`
	BridgeAddrs []netip.Prefix `json:"bridgeAddrs"`
	// Routes, sorted by destination.
	Routes []Route `json:"routes"`
	// Warnings are other nodes that get no route, and why.
	Warnings []string `json:"warnings,omitempty"`
}

// Desired computes the plan of node self from every node of the cluster.
// A node without a pod CIDR or without an InternalIP of the right family
// gets no route (a warning says so); self without a pod CIDR is
// ErrNoPodCIDR.
func Desired(self string, nodes []Node, o Options) (Plan, error) {
	o = o.withDefaults()
	p := Plan{Node: self, ConfPath: o.ConfPath()}
	var me *Node
	for i := range nodes {
		if nodes[i].Name == self {
			me = &nodes[i]
		}
	}
	if me == nil {
		return p, fmt.Errorf("node %s: no such Node", self)
	}
	if len(me.PodCIDRs) == 0 {
		return p, fmt.Errorf("node %s: %w", self, ErrNoPodCIDR)
	}
	p.PodCIDRs = slices.Clone(me.PodCIDRs)
	p.Bridge = o.Bridge
	for _, c := range me.PodCIDRs {
		p.BridgeAddrs = append(p.BridgeAddrs, netip.PrefixFrom(c.Masked().Addr().Next(), c.Bits()))
	}
	conf, err := ConfList(me.PodCIDRs, o)
	if err != nil {
		return p, err
	}
	p.ConfList = conf
	for _, n := range nodes {
		if n.Name == self {
			continue
		}
		if len(n.PodCIDRs) == 0 {
			p.Warnings = append(p.Warnings, fmt.Sprintf("node %s has no pod CIDR yet: no route to its pods", n.Name))
			continue
		}
		for _, c := range n.PodCIDRs {
			via, ok := sameFamily(n.InternalIPs, c.Addr())
			if !ok {
				p.Warnings = append(p.Warnings, fmt.Sprintf("node %s has no InternalIP of the family of %s: no route to it", n.Name, c))
				continue
			}
			p.Routes = append(p.Routes, Route{Dst: c, Via: via, Node: n.Name})
		}
	}
	slices.SortFunc(p.Routes, func(a, b Route) int {
		if c := a.Dst.Addr().Compare(b.Dst.Addr()); c != 0 {
			return c
		}
		return a.Dst.Bits() - b.Dst.Bits()
	})
	return p, nil
}

func sameFamily(addrs []netip.Addr, like netip.Addr) (netip.Addr, bool) {
	for _, a := range addrs {
		if a.Is4() == like.Is4() {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// ConfList renders the CNI configuration list for a node's pod CIDRs: a
// bridge with host-local IPAM over one range per CIDR and a default route
// per family through the bridge.
func ConfList(podCIDRs []netip.Prefix, o Options) ([]byte, error) {
	o = o.withDefaults()
	if len(podCIDRs) == 0 {
		return nil, ErrNoPodCIDR
	}
	type rng struct {
		Subnet string `json:"subnet"`
	}
	type route struct {
		Dst string `json:"dst"`
	}
	var ranges [][]rng
	var routes []route
	for _, c := range podCIDRs {
		ranges = append(ranges, []rng{{c.Masked().String()}})
		if c.Addr().Is4() {
			routes = append(routes, route{"0.0.0.0/0"})
		} else {
			routes = append(routes, route{"::/0"})
		}
	}
	bridge := map[string]any{
		"type":        "bridge",
		"bridge":      o.Bridge,
		"isGateway":   true,
		"ipMasq":      o.Masquerade,
		"hairpinMode": true,
		"ipam": map[string]any{
			"type":   "host-local",
			"ranges": ranges,
			"routes": routes,
		},
	}
	if o.MTU > 0 {
		bridge["mtu"] = o.MTU
	}
	conf := map[string]any{
		"cniVersion": cniVersion,
		"name":       NetworkName,
		"plugins":    []any{bridge},
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetIndent("", "  ")
	if err := enc.Encode(conf); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Observed is a node's pod networking as it is.
type Observed struct {
	// Conf is the configuration file's content; nil when it is absent.
	Conf []byte
	// Routes are the routes of RouteProtocol.
	Routes []Route
	// BridgeAddrs are the bridge's global addresses (none when the bridge
	// does not exist yet: the bridge plugin creates it with the first pod).
	BridgeAddrs []netip.Prefix
}

const (
	missingMarker = "@@kpfree:missing@@"
	routesMarker  = "@@kpfree:routes@@"
	addrsMarker   = "@@kpfree:bridge@@"
)

// ObserveCommand prints what ParseObserved reads: the configuration file,
// the routes of RouteProtocol and the bridge's addresses. It changes
// nothing.
func (o Options) ObserveCommand() string {
	return fmt.Sprintf("if [ -e %[1]s ]; then cat %[1]s; else echo '%[2]s'; fi; echo '%[3]s'; "+
		"ip -4 route show proto %[4]d 2>/dev/null; ip -6 route show proto %[4]d 2>/dev/null; echo '%[5]s'; "+
		"ip -o addr show dev %[6]s scope global 2>/dev/null; true",
		o.ConfPath(), missingMarker, routesMarker, RouteProtocol, addrsMarker, o.BridgeName())
}

// ParseObserved reads ObserveCommand's output.
func ParseObserved(out string) Observed {
	var ob Observed
	conf, rest, _ := strings.Cut(out, routesMarker+"\n")
	if strings.TrimSpace(conf) != missingMarker {
		ob.Conf = []byte(conf)
	}
	routes, addrs, _ := strings.Cut(rest, addrsMarker+"\n")
	ob.Routes = ParseRoutes(routes)
	ob.BridgeAddrs = parseAddrs(addrs)
	return ob
}

// parseAddrs reads `ip -o addr show` lines ("5: kpfree0    inet 10.244.1.1/24 ...").
func parseAddrs(out string) []netip.Prefix {
	var ps []netip.Prefix
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "inet" || f[i] == "inet6" {
				if p, err := netip.ParsePrefix(f[i+1]); err == nil {
					ps = append(ps, p)
				}
				break
			}
		}
	}
	return ps
}

// Drift lists how a node differs from the plan; none means the node is in
// line. A bridge address that is not a gateway of the node's pod CIDRs (the
// node had another pod CIDR before it was reset and joined again) is drift:
// the bridge plugin refuses to add pods to such a bridge.
func (p Plan) Drift(ob Observed) []string {
	var d []string
	switch {
	case ob.Conf == nil:
		d = append(d, p.ConfPath+" is missing")
	case !bytes.Equal(bytes.TrimSpace(ob.Conf), bytes.TrimSpace(p.ConfList)):
		d = append(d, p.ConfPath+" differs")
	}
	have := map[Route]bool{}
	for _, r := range ob.Routes {
		have[Route{Dst: r.Dst, Via: r.Via}] = true
	}
	want := map[Route]bool{}
	for _, r := range p.Routes {
		k := Route{Dst: r.Dst, Via: r.Via}
		want[k] = true
		if !have[k] {
			d = append(d, "route "+r.String()+" is missing")
		}
	}
	for _, r := range ob.Routes {
		if !want[Route{Dst: r.Dst, Via: r.Via}] {
			d = append(d, "route "+r.String()+" is stale")
		}
	}
	for _, a := range ob.BridgeAddrs {
		if !slices.Contains(p.BridgeAddrs, a) {
			d = append(d, fmt.Sprintf("bridge %s has a stale address %s", p.Bridge, a))
		}
	}
	return d
}

// Script is an idempotent sh script that installs the plan's routes and
// removes the stale ones (routes of RouteProtocol the plan does not hold).
// The configuration file is written separately (it is data, not a command).
func (p Plan) Script() string {
	var b strings.Builder
	b.WriteString("set -e\n")
	for _, r := range p.Routes {
		fmt.Fprintf(&b, "ip %s route replace %s via %s proto %d\n", family(r.Dst), r.Dst, r.Via, RouteProtocol)
	}
	for _, fam := range []string{"-4", "-6"} {
		var keep []string
		for _, r := range p.Routes {
			if family(r.Dst) == fam {
				keep = append(keep, r.Dst.String())
			}
		}
		pattern := "__none__"
		if len(keep) > 0 {
			pattern = strings.Join(keep, "|")
		}
		fmt.Fprintf(&b, "ip %s route show proto %d | while read -r dst _; do case \"$dst\" in %s) ;; *) ip %s route del \"$dst\" proto %d ;; esac; done\n",
			fam, RouteProtocol, pattern, fam, RouteProtocol)
	}
	var keep []string
	for _, a := range p.BridgeAddrs {
		keep = append(keep, a.String())
	}
	pattern := "__none__"
	if len(keep) > 0 {
		pattern = strings.Join(keep, "|")
	}
	// A bridge left with the address of an earlier pod CIDR (the node was
	// reset and joined again) makes the bridge plugin fail: drop it.
	fmt.Fprintf(&b, "ip -o addr show dev %s scope global 2>/dev/null | while read -r _ _ _ addr _; do case \"$addr\" in %s) ;; *) ip addr del \"$addr\" dev %s ;; esac; done\n",
		p.Bridge, pattern, p.Bridge)
	return b.String()
}

func family(p netip.Prefix) string {
	if p.Addr().Is4() {
		return "-4"
	}
	return "-6"
}

// ShowRoutesCommand prints the routes of RouteProtocol, both families, in
// the form ParseRoutes reads.
const ShowRoutesCommand = "ip -4 route show proto 201; ip -6 route show proto 201"

// ParseRoutes reads `ip route show` lines ("10.244.1.0/24 via 198.18.0.12
// dev eth0 proto 201"); lines without a prefix and a via are ignored.
func ParseRoutes(out string) []Route {
	var rs []Route
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 {
			continue
		}
		dst, err := netip.ParsePrefix(f[0])
		if err != nil {
			a, aerr := netip.ParseAddr(f[0]) // a host route prints without /32
			if aerr != nil {
				continue
			}
			dst = netip.PrefixFrom(a, a.BitLen())
		}
		for i := 1; i+1 < len(f); i++ {
			if f[i] == "via" {
				if via, err := netip.ParseAddr(f[i+1]); err == nil {
					rs = append(rs, Route{Dst: dst, Via: via})
				}
				break
			}
		}
	}
	return rs
}
