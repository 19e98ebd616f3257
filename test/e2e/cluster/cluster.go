// Package cluster builds real kubeadm clusters on lab nodes for end-to-end
// tests (internal/lab with Options.Kubernetes, through test/lab): kubeadm
// init on node1 and kubeadm join on the others, run over SSH as an operator
// would, a bridge pod network between the nodes (lab.SetupPodNetwork), and
// everything removed again when the test ends, checked to leave nothing
// behind.
//
//	c := cluster.LegacyCluster(t)      // with kube-proxy (iptables mode)
//	c := cluster.KubeProxyFree(t)      // kubeadm's addon/kube-proxy phase skipped
//	out, err := c.Kubectl(ctx, "get", "pods", "-A")
//
// Needs root, the binaries of make k8s-binaries and the Debian packages
// containerd, runc and containernetworking-plugins.
package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"text/template"
	"time"

	"github.com/kpfree/kpfree/internal/lab"
	labtest "github.com/kpfree/kpfree/test/lab"
)

// Versions and networks of the clusters.
const (
	KubernetesVersion = "v1.34.4"
	PodSubnet         = "10.244.0.0/16"
	ServiceSubnet     = "10.96.0.0/12"
	// AgnhostImage is the test server image imported into every node.
	AgnhostImage = "registry.k8s.io/e2e-test-images/agnhost:2.56"
	// AdminKubeconfig is the cluster admin's kubeconfig on the control plane.
	AdminKubeconfig = "/etc/kubernetes/admin.conf"
	// ControlPlane is the control-plane node: the others join it.
	ControlPlane = "node1"
)

// Options says what cluster New builds.
type Options struct {
	// Nodes is the number of nodes, node1 (control plane) included; default 2.
	Nodes int
	// KubeProxy deploys kubeadm's kube-proxy addon (iptables mode); without
	// it the addon/kube-proxy phase is skipped (kube-proxy-free).
	KubeProxy bool
}

// Timings of the steps of New.
type Timings struct {
	LabUp, Init, Join, Ready time.Duration
}

// Cluster is a kubeadm cluster on lab nodes.
type Cluster struct {
	Lab       *lab.State
	KubeProxy bool
	Timings   Timings
	// PodCIDRs are the nodes' spec.podCIDR.
	PodCIDRs map[string]netip.Prefix
}

// LegacyCluster is the cluster kpfree migrates from: two nodes, kube-proxy
// in iptables mode (kubeadm's addon, conntrack.maxPerCore 0 so that it leaves
// the host-wide nf_conntrack_max alone), CoreDNS, a pod network.
func LegacyCluster(tb testing.TB) *Cluster {
	tb.Helper()
	return New(tb, Options{Nodes: 2, KubeProxy: true})
}

// KubeProxyFree is a two-node cluster built without kube-proxy.
func KubeProxyFree(tb testing.TB) *Cluster {
	tb.Helper()
	return New(tb, Options{Nodes: 2})
}

// New builds a cluster as o says and registers its removal (lab down, then
// checks that nothing is left: netns, links, cgroups v1 and v2, processes,
// mounts, the host's containerd and kubelet paths). It fails tb on error.
func New(tb testing.TB, o Options) *Cluster {
	tb.Helper()
	if o.Nodes == 0 {
		o.Nodes = 2
	}
	lo := labtest.KubernetesOptions(tb, o.Nodes)
	before := snapshotHost()
	// Registered before labtest.Up's own cleanup, so it runs after lab down.
	tb.Cleanup(func() {
		for _, p := range before.diff(snapshotHost(), lo.Dir) {
			tb.Errorf("left behind on the host: %s", p)
		}
	})
	t0 := time.Now()
	s := labtest.Up(tb, lo)
	c := &Cluster{Lab: s, KubeProxy: o.KubeProxy}
	c.Timings.LabUp = time.Since(t0)
	tb.Logf("TIMING lab up --kubernetes, %d nodes: %s", o.Nodes, c.Timings.LabUp.Round(time.Millisecond))
	tb.Cleanup(func() {
		if tb.Failed() {
			c.dumpLogs(tb)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	if err := c.bootstrap(ctx, tb); err != nil {
		tb.Fatal(err)
	}
	return c
}

func (c *Cluster) bootstrap(ctx context.Context, tb testing.TB) error {
	s := c.Lab
	token, err := bootstrapToken()
	if err != nil {
		return err
	}
	cfg, err := render(initTemplate, map[string]any{
		"Node": ControlPlane, "Token": token, "KubeProxy": c.KubeProxy, "Version": KubernetesVersion,
		"PodSubnet": PodSubnet, "ServiceSubnet": ServiceSubnet, "CgroupRoot": s.CgroupPath(ControlPlane),
		"CRISocket": lab.ContainerdSocket,
	})
	if err != nil {
		return err
	}
	if err := c.WriteFile(ctx, ControlPlane, "/root/kubeadm-init.yaml", cfg); err != nil {
		return err
	}
	t0 := time.Now()
	out, err := c.SSH(ctx, ControlPlane, "kubeadm init --config /root/kubeadm-init.yaml")
	if err != nil {
		return fmt.Errorf("kubeadm init: %w\n%s", err, out)
	}
	c.Timings.Init = time.Since(t0)
	tb.Logf("TIMING kubeadm init: %s", c.Timings.Init.Round(time.Millisecond))
	if w := preflightWarnings(out); w != "" {
		tb.Logf("kubeadm init preflight warnings:\n%s", w)
	}

	caHash, err := c.caCertHash(ctx)
	if err != nil {
		return err
	}
	t1 := time.Now()
	for _, node := range s.NodeNames() {
		if node == ControlPlane {
			continue
		}
		// kubeadm keeps one KubeletConfiguration for the cluster (with the
		// control plane's cgroupRoot); each worker patches in its own.
		patch := fmt.Appendf(nil, "cgroupRoot: %s\n", s.CgroupPath(node))
		if err := c.WriteFile(ctx, node, "/etc/kubernetes/patches/kubeletconfiguration+merge.yaml", patch); err != nil {
			return err
		}
		cfg, err := render(joinTemplate, map[string]any{
			"Node": node, "Endpoint": ControlPlane + ":6443", "Token": token, "CAHash": caHash,
			"CRISocket": lab.ContainerdSocket,
		})
		if err != nil {
			return err
		}
		if err := c.WriteFile(ctx, node, "/root/kubeadm-join.yaml", cfg); err != nil {
			return err
		}
		t := time.Now()
		if out, err := c.SSH(ctx, node, "kubeadm join --config /root/kubeadm-join.yaml"); err != nil {
			return fmt.Errorf("%s: kubeadm join: %w\n%s", node, err, out)
		}
		tb.Logf("TIMING kubeadm join %s: %s", node, time.Since(t).Round(time.Millisecond))
	}
	c.Timings.Join = time.Since(t1)

	t2 := time.Now()
	if err := c.setupPodNetwork(ctx); err != nil {
		return err
	}
	if _, err := c.Kubectl(ctx, "wait", "--for=condition=Ready", "node", "--all", "--timeout=5m"); err != nil {
		return err
	}
	c.Timings.Ready = time.Since(t2)
	tb.Logf("TIMING nodes Ready after the last join: %s", c.Timings.Ready.Round(time.Millisecond))
	if c.KubeProxy {
		if err := c.WaitPods(ctx, "kube-system", "k8s-app=kube-proxy", len(s.NodeNames())); err != nil {
			return err
		}
	}
	return nil
}

// setupPodNetwork waits until every node has its pod CIDR and gives the
// nodes a pod network with it.
func (c *Cluster) setupPodNetwork(ctx context.Context) error {
	want := len(c.Lab.NodeNames())
	for {
		out, err := c.Kubectl(ctx, "get", "nodes", "-o", `jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDR}{"\n"}{end}`)
		if err != nil {
			return err
		}
		cidrs := map[string]netip.Prefix{}
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			name, cidr, _ := strings.Cut(line, " ")
			if p, err := netip.ParsePrefix(strings.TrimSpace(cidr)); err == nil {
				cidrs[name] = p
			}
		}
		if len(cidrs) == want {
			c.PodCIDRs = cidrs
			return c.Lab.SetupPodNetwork(ctx, cidrs)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nodes without a pod CIDR: %q: %w", out, ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Kubectl runs kubectl as the cluster admin on the control plane and returns
// its stdout.
func (c *Cluster) Kubectl(ctx context.Context, args ...string) (string, error) {
	return c.KubectlInput(ctx, nil, args...)
}

// KubectlInput is Kubectl with stdin (e.g. apply -f -).
func (c *Cluster) KubectlInput(ctx context.Context, stdin []byte, args ...string) (string, error) {
	argv := append([]string{"kubectl", "--kubeconfig", AdminKubeconfig}, args...)
	out, err := c.Lab.ExecInput(ctx, ControlPlane, stdin, argv...)
	return string(out), err
}

// Apply applies manifests (kubectl apply -f -).
func (c *Cluster) Apply(ctx context.Context, manifests string) error {
	_, err := c.KubectlInput(ctx, []byte(manifests), "apply", "-f", "-")
	return err
}

// WaitPods waits until count pods matching selector in namespace are Ready.
func (c *Cluster) WaitPods(ctx context.Context, namespace, selector string, count int) error {
	for {
		out, err := c.Kubectl(ctx, "get", "pods", "-n", namespace, "-l", selector, "-o",
			`jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}`)
		if err == nil {
			ready := 0
			for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
				if strings.HasSuffix(line, " True") {
					ready++
				}
			}
			if ready >= count {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			desc, _ := c.Kubectl(context.Background(), "get", "pods", "-n", namespace, "-l", selector, "-o", "wide")
			return fmt.Errorf("pods %s in %s not Ready (want %d): %w\n%s", selector, namespace, count, ctx.Err(), desc)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// PodIP returns the IP of pod in namespace.
func (c *Cluster) PodIP(ctx context.Context, namespace, pod string) (netip.Addr, error) {
	out, err := c.Kubectl(ctx, "get", "pod", "-n", namespace, pod, "-o", "jsonpath={.status.podIP}")
	if err != nil {
		return netip.Addr{}, err
	}
	return netip.ParseAddr(strings.TrimSpace(out))
}

// SSH runs a shell command line on node as root over SSH (the lab's sshd,
// key and known_hosts) and returns its combined output.
func (c *Cluster) SSH(ctx context.Context, node, command string) (string, error) {
	cmd, err := c.Lab.SSHCommand(ctx, node, "root", command)
	if err != nil {
		return "", err
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// WriteFile writes data to path inside node (parents created).
func (c *Cluster) WriteFile(ctx context.Context, node, path string, data []byte) error {
	_, err := c.Lab.ExecInput(ctx, node, data, "sh", "-c", `set -e; mkdir -p "$(dirname "$1")"; cat >"$1"`, "sh", path)
	return err
}

// caCertHash is the discovery hash of the cluster CA (sha256 of its
// SubjectPublicKeyInfo), as kubeadm join wants it.
func (c *Cluster) caCertHash(ctx context.Context) (string, error) {
	data, err := c.Lab.Exec(ctx, ControlPlane, "cat", "/etc/kubernetes/pki/ca.crt")
	if err != nil {
		return "", err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return "", fmt.Errorf("ca.crt: no PEM block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return "sha256:" + hex.EncodeToString(sum[:]), nil
}

// MemoryRSS sums the resident memory of every process in the cluster's
// nodes (their cgroups: sshd, containerd, kubelet, shims, containers).
func (c *Cluster) MemoryRSS() (uint64, error) {
	var total uint64
	for _, node := range c.Lab.NodeNames() {
		pids, err := c.Lab.NodePIDs(node)
		if err != nil {
			return 0, err
		}
		for _, pid := range pids {
			data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
			if err != nil {
				continue
			}
			for _, line := range strings.Split(string(data), "\n") {
				if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
					var kb uint64
					fmt.Sscanf(strings.TrimSpace(v), "%d", &kb)
					total += kb * 1024
				}
			}
		}
	}
	return total, nil
}

// dumpLogs logs what helps to see why a cluster test failed.
func (c *Cluster) dumpLogs(tb testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := c.Kubectl(ctx, "get", "nodes,pods", "-A", "-o", "wide"); err == nil {
		tb.Logf("cluster state:\n%s", out)
	}
	for _, node := range c.Lab.NodeNames() {
		out, _ := c.Lab.Exec(ctx, node, "sh", "-c", "tail -n 30 "+lab.ServiceLogDir+"/kubelet.log; tail -n 10 "+lab.ServiceLogDir+"/containerd.log")
		tb.Logf("%s logs:\n%s", node, out)
	}
}

func bootstrapToken() (string, error) {
	const chars = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 22)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	for i := range b {
		b[i] = chars[int(b[i])%len(chars)]
	}
	return string(b[:6]) + "." + string(b[6:]), nil
}

func preflightWarnings(out string) string {
	var w []string
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "[WARNING") {
			w = append(w, strings.TrimSpace(line))
		}
	}
	return strings.Join(w, "\n")
}

func render(t *template.Template, data any) ([]byte, error) {
	var b bytes.Buffer
	err := t.Execute(&b, data)
	return b.Bytes(), err
}

// initTemplate is node1's kubeadm config. No --ignore-preflight-errors: every
// check holds on a lab node (cgroup v1 is a warning only).
var initTemplate = template.Must(template.New("init").Parse(`apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
bootstrapTokens:
- token: {{.Token}}
  ttl: 2h0m0s
nodeRegistration:
  name: {{.Node}}
  criSocket: {{.CRISocket}}
  # Every image is imported into the nodes: nothing to pull (no registry).
  imagePullPolicy: Never
{{- if not .KubeProxy}}
skipPhases:
- addon/kube-proxy
{{- end}}
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
kubernetesVersion: {{.Version}}
controlPlaneEndpoint: {{.Node}}:6443
networking:
  podSubnet: {{.PodSubnet}}
  serviceSubnet: {{.ServiceSubnet}}
---
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# No systemd in lab nodes; the machine has cgroup v1 (+ cgroup2 hybrid).
cgroupDriver: cgroupfs
failCgroupV1: false
# The node's own cgroups: every pod of node1 stays inside the lab node.
cgroupRoot: {{.CgroupRoot}}
{{- if .KubeProxy}}
---
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
conntrack:
  # 0: leave nf_conntrack_max (machine-wide) alone. The timeouts kube-proxy
  # sets are per network namespace: the node's.
  maxPerCore: 0
{{- end}}
`))

var joinTemplate = template.Must(template.New("join").Parse(`apiVersion: kubeadm.k8s.io/v1beta4
kind: JoinConfiguration
discovery:
  bootstrapToken:
    apiServerEndpoint: {{.Endpoint}}
    token: {{.Token}}
    caCertHashes:
    - {{.CAHash}}
nodeRegistration:
  name: {{.Node}}
  criSocket: {{.CRISocket}}
  imagePullPolicy: Never
patches:
  directory: /etc/kubernetes/patches
`))

// hostSnapshot is what a cluster must leave on the host as it found it.
type hostSnapshot struct {
	paths   map[string]bool
	sysctls map[string]string
	kube    string // KUBE-* lines in the root netns's iptables
}

// hostPaths are the host's default containerd, kubelet and kubeadm paths
// and those the lab nodes shadow: none may appear (or vanish) on the host.
var hostPaths = []string{"/run/containerd", "/var/lib/containerd", "/var/lib/kubelet", "/var/lib/etcd", "/etc/kubernetes",
	"/etc/cni/net.d", "/var/lib/cni", "/var/log/pods", "/var/log/containers", "/usr/local/bin/kubelet",
	"/usr/local/bin/kubeadm", "/usr/local/bin/systemctl", "/usr/lib/modules", "/usr/libexec/kubernetes",
	"/opt/cni", "/opt/containerd", "/run/xtables.lock"}

// hostSysctls are machine-wide and root-netns settings that kubelet,
// kube-proxy or the CNI plugins would change if they ran on the host.
var hostSysctls = []string{"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes", "net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables",
	"net/netfilter/nf_conntrack_max", "net/netfilter/nf_conntrack_tcp_timeout_established",
	"net/ipv4/conf/all/route_localnet"}

func snapshotHost() hostSnapshot {
	h := hostSnapshot{paths: map[string]bool{}, sysctls: map[string]string{}}
	for _, p := range hostPaths {
		_, err := os.Lstat(p)
		h.paths[p] = err == nil
	}
	for _, k := range hostSysctls {
		data, _ := os.ReadFile("/proc/sys/" + k)
		h.sysctls[k] = strings.TrimSpace(string(data))
	}
	if out, err := exec.Command("iptables-save").Output(); err == nil {
		var kube []string
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "KUBE-") {
				kube = append(kube, line)
			}
		}
		h.kube = strings.Join(kube, "\n")
	}
	return h
}

// diff lists what changed from h to now, and mounts of labDir left in this
// mount namespace.
func (h hostSnapshot) diff(now hostSnapshot, labDir string) []string {
	var out []string
	for _, p := range hostPaths {
		if h.paths[p] != now.paths[p] {
			out = append(out, fmt.Sprintf("%s: existed %v, exists %v", p, h.paths[p], now.paths[p]))
		}
	}
	for _, k := range hostSysctls {
		if h.sysctls[k] != now.sysctls[k] {
			out = append(out, fmt.Sprintf("sysctl %s: %q -> %q", k, h.sysctls[k], now.sysctls[k]))
		}
	}
	if h.kube != now.kube {
		out = append(out, "KUBE-* rules in the root netns's iptables changed")
	}
	if data, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if strings.Contains(line, labDir) || strings.Contains(line, " kpfree-lab ") {
				out = append(out, "mount: "+line)
			}
		}
	}
	return out
}
