// Package nodeport is a three-host harness for kpfree-agent's datapath for
// traffic entering a node (NodePort, ExternalIPs, LoadBalancer): a client
// host and two Kubernetes "nodes" A and B (lab nodes, test/lab), Node objects
// in a real API server (test/kubeenv), backend "pods" (a network namespace
// inside the node, a veth to it, a /32 route) running an echo server that
// answers its name and the client address it saw, and the real kpfree-agent
// binary on A and B, each with its own cgroup2 subtree and private bpffs.
//
// The test and bench binaries that use it re-execute themselves as the echo
// server, the probe client and the uninstaller (RunHelper), so every request
// is a real socket in the right network namespace and cgroup.
//
//	client node1 198.19.N.11 (+ .200)  routes: pod CIDRs, ExternalIPs -> A
//	node A     node2 198.19.N.12  pod-a 10.244.1.10 (pod CIDR 10.244.1.0/24)
//	node B     node3 198.19.N.13  pod-b 10.244.2.10 (pod CIDR 10.244.2.0/24)
//
// Everything lives inside the lab nodes (their netns, mount namespace and
// cgroup), so lab down removes what a failed run leaves.
package nodeport

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/test/kubeenv"
)

// Fixed parts of the topology.
const (
	// EchoPort is the pods' TCP and UDP port (the Services' targetPort).
	EchoPort = 8080
	// HealthPort is where each agent serves /readyz and /metrics (its
	// --health-addr, on the node's address).
	HealthPort = 9876
)

// Roles of the lab nodes.
const (
	ClientNode = "node1"
	NodeA      = "node2"
	NodeB      = "node3"
)

// Pod CIDRs of node A and B, and their pods' addresses.
var (
	PodCIDRA = netip.MustParsePrefix("10.244.1.0/24")
	PodCIDRB = netip.MustParsePrefix("10.244.2.0/24")
)

// Options for Setup.
type Options struct {
	// AgentBin is the kpfree-agent binary (copied into the lab).
	AgentBin string
	// LBAlgorithm is the agents' --lb-algorithm ("" keeps the default).
	LBAlgorithm string
	// AgentArgs are extra `kpfree-agent run` arguments.
	AgentArgs []string
	// LogDir receives the agents' logs (default the lab dir).
	LogDir string
	Logf   func(format string, args ...any)
}

// Cluster is the harness Setup builds.
type Cluster struct {
	Lab          *lab.State
	ControlPlane *kubeenv.ControlPlane
	Client       kubernetes.Interface
	Opts         Options
	// ClientAddr is the client's lab address; ClientAddr2 a second address
	// on the client (for loadBalancerSourceRanges).
	ClientAddr, ClientAddr2 netip.Addr
	// PodA runs on node A, PodB on node B.
	PodA, PodB *Pod
	Agents     map[string]*Agent

	helper, agentBin string
}

// Pod is a backend: a netns inside its node with an echo server.
type Pod struct {
	Name, Node string
	Addr       netip.Addr
	echo       *exec.Cmd
	done       chan struct{}
}

// Agent is kpfree-agent running in a lab node.
type Agent struct {
	Node    string
	Addr    netip.Addr
	BPFFS   string
	Cgroup  string
	LogFile string
	Args    []string
	cmd     *exec.Cmd
	done    chan struct{}
}

// Setup builds the harness on a lab of at least three nodes and a control
// plane reachable from them (BindAddress = the lab gateway). The helper
// binary is this executable: its main must call RunHelper first. Call
// Close when done (it is safe after a partial Setup).
func Setup(ctx context.Context, s *lab.State, cp *kubeenv.ControlPlane, client kubernetes.Interface, o Options) (*Cluster, error) {
	for _, n := range []string{ClientNode, NodeA, NodeB} {
		if s.Node(n) == nil {
			return nil, fmt.Errorf("nodeport: lab %s has no %s: it needs 3 nodes", s.Dir, n)
		}
	}
	if o.LogDir == "" {
		o.LogDir = filepath.Join(s.Dir, "nodeport-logs")
	}
	if err := os.MkdirAll(o.LogDir, 0o755); err != nil {
		return nil, err
	}
	c := &Cluster{Lab: s, ControlPlane: cp, Client: client, Opts: o, Agents: map[string]*Agent{}}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	if c.helper, err = placeBinary(s, self, "nodeport-helper"); err != nil {
		return nil, err
	}
	if c.agentBin, err = placeBinary(s, o.AgentBin, "kpfree-agent"); err != nil {
		return nil, err
	}
	a, b, cl := s.Node(NodeA), s.Node(NodeB), s.Node(ClientNode)
	c.ClientAddr = cl.Address
	c.ClientAddr2 = netip.AddrFrom4([4]byte{cl.Address.As4()[0], cl.Address.As4()[1], cl.Address.As4()[2], 200})

	for _, n := range []struct {
		name string
		addr netip.Addr
		cidr netip.Prefix
	}{{NodeA, a.Address, PodCIDRA}, {NodeB, b.Address, PodCIDRB}} {
		if err := ensureNode(ctx, client, n.name, n.addr, n.cidr); err != nil {
			return nil, err
		}
	}
	// Forwarding in A and B (their own netns), pod CIDR routes between
	// them and from the client (the direct-to-pod baseline), a second
	// client address.
	steps := []struct {
		node string
		argv []string
	}{
		{NodeA, []string{"sysctl", "-qw", "net.ipv4.ip_forward=1"}},
		{NodeB, []string{"sysctl", "-qw", "net.ipv4.ip_forward=1"}},
		{NodeA, []string{"ip", "route", "replace", PodCIDRB.String(), "via", b.Address.String()}},
		{NodeB, []string{"ip", "route", "replace", PodCIDRA.String(), "via", a.Address.String()}},
		{ClientNode, []string{"ip", "route", "replace", PodCIDRA.String(), "via", a.Address.String()}},
		{ClientNode, []string{"ip", "route", "replace", PodCIDRB.String(), "via", b.Address.String()}},
		{ClientNode, []string{"ip", "addr", "replace", netip.PrefixFrom(c.ClientAddr2, s.Subnet.Bits()).String(), "dev", "eth0"}},
	}
	for _, st := range steps {
		if _, err := s.Exec(ctx, st.node, st.argv...); err != nil {
			return c, err
		}
	}
	if c.PodA, err = c.startPod(ctx, NodeA, "pod-a", PodCIDRA); err != nil {
		return c, err
	}
	if c.PodB, err = c.startPod(ctx, NodeB, "pod-b", PodCIDRB); err != nil {
		return c, err
	}
	for _, n := range []string{NodeA, NodeB} {
		if _, err := c.StartAgent(ctx, n, o.LBAlgorithm); err != nil {
			return c, err
		}
	}
	return c, nil
}

func (c *Cluster) logf(format string, args ...any) {
	if c.Opts.Logf != nil {
		c.Opts.Logf(format, args...)
	}
}

// podAddr is the pod's address in cidr (.10); gateway the node side (.1).
func podAddrs(cidr netip.Prefix) (pod, gw netip.Addr) {
	b := cidr.Masked().Addr().As4()
	b[3] = 10
	pod = netip.AddrFrom4(b)
	b[3] = 1
	return pod, netip.AddrFrom4(b)
}

// podScript makes a pod: netns NAME inside the node, veth NAME <-> eth0,
// the gateway /32 on the node side, the pod's /32 and default route.
const podScript = `set -e
pod=$1 addr=$2 gw=$3
ip netns add "$pod"
ip link add "$pod" type veth peer name eth0 netns "$pod"
ip addr add "$gw/32" dev "$pod"
ip link set "$pod" up
ip route replace "$addr/32" dev "$pod"
ip -n "$pod" link set lo up
ip -n "$pod" addr add "$addr/32" dev eth0
ip -n "$pod" link set eth0 up
ip -n "$pod" route add "$gw/32" dev eth0
ip -n "$pod" route add default via "$gw" dev eth0
`

func (c *Cluster) startPod(ctx context.Context, node, name string, cidr netip.Prefix) (*Pod, error) {
	addr, gw := podAddrs(cidr)
	if _, err := c.Lab.Exec(ctx, node, "sh", "-c", podScript, "sh", name, addr.String(), gw.String()); err != nil {
		return nil, fmt.Errorf("pod %s on %s: %w", name, node, err)
	}
	cmd, err := c.Lab.Command(context.WithoutCancel(ctx), node, "nsenter", "--net=/run/netns/"+name, "--",
		c.helper, "-name", name, "-port", strconv.Itoa(EchoPort))
	if err != nil {
		return nil, err
	}
	cmd.Env = append(cmd.Env, HelperEnv+"=echo")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start echo server in %s: %w", name, err)
	}
	p := &Pod{Name: name, Node: node, Addr: addr, echo: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(p.done) }()
	// Ready when it answers its own name, from inside the pod.
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, err := c.ProbeFromPod(ctx, p, ProbeRequest{Proto: "tcp", Addr: netip.AddrPortFrom(addr, EchoPort), Count: 1})
		if err == nil && len(r) == 1 && r[0].Name == name {
			c.logf("%s: pod %s %s echo server ready", node, name, addr)
			return p, nil
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("echo server in pod %s exited: %s", name, out.String())
		default:
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("echo server in pod %s not answering on %s:%d after 10 s: %v %+v", name, addr, EchoPort, err, r)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (p *Pod) stop() {
	if p == nil || p.echo == nil {
		return
	}
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.echo.Process.Kill()
	<-p.done
}

// StartAgent starts kpfree-agent in node with --lb-algorithm alg ("" keeps
// the default) and waits until /readyz answers 200. An agent already
// running there is stopped first.
func (c *Cluster) StartAgent(ctx context.Context, node, alg string) (*Agent, error) {
	if old := c.Agents[node]; old != nil {
		old.Stop()
	}
	n := c.Lab.Node(node)
	a := &Agent{
		Node:    node,
		Addr:    n.Address,
		BPFFS:   filepath.Join(c.Lab.Dir, "bpffs-"+node),
		Cgroup:  n.Cgroup,
		LogFile: filepath.Join(c.Opts.LogDir, fmt.Sprintf("agent-%s-%d.log", node, time.Now().UnixNano())),
		done:    make(chan struct{}),
	}
	a.Args = []string{"run", "--kubeconfig", c.ControlPlane.Kubeconfig, "--node-name", node,
		"--bpffs", a.BPFFS, "--cgroup-root", a.Cgroup,
		"--health-addr", netip.AddrPortFrom(n.Address, HealthPort).String(), "--min-sync-interval", "20ms"}
	if alg != "" {
		a.Args = append(a.Args, "--lb-algorithm", alg)
	}
	a.Args = append(a.Args, c.Opts.AgentArgs...)
	logf, err := os.Create(a.LogFile)
	if err != nil {
		return nil, err
	}
	cmd, err := c.Lab.Command(context.WithoutCancel(ctx), node, append([]string{c.agentBin}, a.Args...)...)
	if err != nil {
		logf.Close()
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start kpfree-agent in %s: %w", node, err)
	}
	a.cmd = cmd
	go func() { _ = cmd.Wait(); logf.Close(); close(a.done) }()
	c.Agents[node] = a
	url := "http://" + netip.AddrPortFrom(n.Address, HealthPort).String() + "/readyz"
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, _, err := HTTPGet(ctx, url)
		if err == nil && code == http.StatusOK {
			c.logf("%s: kpfree-agent ready (--lb-algorithm %q), log %s", node, alg, a.LogFile)
			return a, nil
		}
		select {
		case <-a.done:
			return nil, fmt.Errorf("kpfree-agent in %s exited at start (%v):\n%s", node, cmd.ProcessState, a.LogTail(30))
		default:
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("kpfree-agent in %s not ready on %s after 30 s (%d, %v):\n%s", node, url, code, err, a.LogTail(30))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Stop sends SIGTERM to the agent and waits (kill after 10 s).
func (a *Agent) Stop() {
	if a == nil || a.cmd == nil {
		return
	}
	lab.StopStarted(a.cmd.Process, a.done, 10*time.Second)
}

// LogTail is the last n lines of the agent's log.
func (a *Agent) LogTail(n int) string {
	data, _ := os.ReadFile(a.LogFile)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// AgentCLI runs `kpfree-agent ARGS...` inside the agent's node with its
// --bpffs, --cgroup-root (status) and --health-addr added where they apply.
func (c *Cluster) AgentCLI(ctx context.Context, node string, args ...string) ([]byte, error) {
	a := c.Agents[node]
	if a == nil {
		return nil, fmt.Errorf("no agent on %s", node)
	}
	argv := append([]string{c.agentBin}, args...)
	argv = append(argv, "--bpffs", a.BPFFS)
	if len(args) > 0 && args[0] == "status" {
		argv = append(argv, "--cgroup-root", a.Cgroup, "--health-addr", netip.AddrPortFrom(a.Addr, HealthPort).String())
	}
	return c.Lab.Exec(ctx, node, argv...)
}

// Probe runs the probe helper in the client node (the host "outside").
func (c *Cluster) Probe(ctx context.Context, req ProbeRequest) ([]Reply, error) {
	return c.probe(ctx, ClientNode, nil, req)
}

// ProbeFromPod runs the probe helper inside pod p (its netns, its node's
// cgroup: the node's socket load balancer applies).
func (c *Cluster) ProbeFromPod(ctx context.Context, p *Pod, req ProbeRequest) ([]Reply, error) {
	return c.probe(ctx, p.Node, []string{"nsenter", "--net=/run/netns/" + p.Name, "--"}, req)
}

func (c *Cluster) probe(ctx context.Context, node string, prefix []string, req ProbeRequest) ([]Reply, error) {
	argv := append(append(prefix, c.helper), req.args()...)
	cmd, err := c.Lab.Command(ctx, node, argv...)
	if err != nil {
		return nil, err
	}
	cmd.Env = append(cmd.Env, HelperEnv+"=probe")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("probe from %s: %w: %s", node, err, bytes.TrimSpace(stderr.Bytes()))
	}
	var out []Reply
	if err := json.Unmarshal(stdout.Bytes(), &out); err != nil {
		return nil, fmt.Errorf("probe from %s: %w: %q", node, err, stdout.String())
	}
	return out, nil
}

// Close stops the agents (removing their programs and pins from inside
// their nodes) and the pods. Lab down removes the rest.
func (c *Cluster) Close(ctx context.Context) error {
	var errs []error
	for _, n := range []string{NodeA, NodeB} {
		a := c.Agents[n]
		if a == nil {
			continue
		}
		a.Stop()
		cmd, err := c.Lab.Command(ctx, n, c.helper, "-bpffs", a.BPFFS, "-cgroup-root", a.Cgroup)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		cmd.Env = append(cmd.Env, HelperEnv+"=uninstall")
		if out, err := cmd.CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("%s: uninstall the agent's datapath: %w: %s", n, err, out))
		}
		_, _ = c.Lab.Exec(ctx, n, "umount", a.BPFFS)
	}
	for _, p := range []*Pod{c.PodA, c.PodB} {
		if p == nil {
			continue
		}
		p.stop()
		if _, err := c.Lab.Exec(ctx, p.Node, "ip", "netns", "del", p.Name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ensureNode creates a Node with InternalIP addr and podCIDR, unless it exists.
func ensureNode(ctx context.Context, c kubernetes.Interface, name string, addr netip.Addr, podCIDR netip.Prefix) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
		Spec: corev1.NodeSpec{PodCIDR: podCIDR.String(), PodCIDRs: []string{podCIDR.String()}},
	}
	created, err := c.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("create node %s: %w", name, err)
	}
	created.Status = corev1.NodeStatus{
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: addr.String()}, {Type: corev1.NodeHostName, Address: name}},
		Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue,
			LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}},
	}
	if _, err := c.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("node %s status: %w", name, err)
	}
	return nil
}

// placeBinary makes src visible inside the lab's nodes: a hard link (or a
// copy) under the lab dir, which lab down removes.
func placeBinary(s *lab.State, src, name string) (string, error) {
	if src == "" {
		return "", fmt.Errorf("nodeport: no %s binary", name)
	}
	dir := filepath.Join(s.Dir, "bin")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	dst := filepath.Join(dir, name)
	_ = os.Remove(dst)
	if err := os.Link(src, dst); err == nil {
		return dst, nil
	}
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return "", err
	}
	return dst, out.Close()
}

var hostHTTP = &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}

// HTTPGet fetches url from the host (lab addresses through the lab bridge)
// and returns the status code and body.
func HTTPGet(ctx context.Context, url string) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := hostHTTP.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}
