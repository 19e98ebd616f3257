// End-to-end tests: real kubeadm clusters (kubelet, containerd, runc, etcd,
// the control plane, CoreDNS, kube-proxy) on lab nodes. They need root, the
// binaries of make k8s-binaries and Debian's containerd, runc and
// containernetworking-plugins; make test-e2e runs them (-run E2E).
package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kpfree/kpfree/test/e2e/cluster"
	labtest "github.com/kpfree/kpfree/test/lab"
)

// netexecPod is an agnhost netexec pod (HTTP on 8080: /hostname, /dial, ...)
// pinned to node.
func netexecPod(name, node string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %[1]s
  labels: {app: %[1]s}
spec:
  nodeName: %[2]s
  tolerations: [{operator: Exists}]
  terminationGracePeriodSeconds: 1
  containers:
  - name: netexec
    image: %[3]s
    args: [netexec, --http-port=8080]
    ports: [{containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /healthz, port: 8080}
      periodSeconds: 1
`, name, node, cluster.AgnhostImage)
}

// dial asks the netexec pod at from (an IP, reached from node's netns) to
// make an HTTP request for /hostname to host:port, and returns the answers.
func dial(ctx context.Context, c *cluster.Cluster, node, from, host string, port int) (string, error) {
	url := fmt.Sprintf("http://%s:8080/dial?request=hostname&protocol=http&host=%s&port=%d&tries=1", from, host, port)
	out, err := c.Lab.Exec(ctx, node, "curl", "-sS", "-m", "10", url)
	return strings.TrimSpace(string(out)), err
}

func logMemory(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	rss, err := c.MemoryRSS()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("MEMORY %d-node cluster: %.0f MiB RSS (sum over the processes in the nodes' cgroups)", len(c.Lab.NodeNames()), float64(rss)/(1<<20))
}

// TestE2EKubeadmKubeProxyFree: kubeadm init without kube-proxy on node1,
// kubeadm join from node2, both Ready, a pod on each reaching the other by
// pod IP.
func TestE2EKubeadmKubeProxyFree(t *testing.T) {
	labtest.Skip(t)
	c := cluster.KubeProxyFree(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	if out, err := c.Kubectl(ctx, "get", "daemonset", "-n", "kube-system", "kube-proxy", "--ignore-not-found", "-o", "name"); err != nil || out != "" {
		t.Errorf("kube-proxy DaemonSet in a kube-proxy-free cluster: %q %v", out, err)
	}
	for _, node := range c.Lab.NodeNames() {
		if out, err := c.Lab.Exec(ctx, node, "sh", "-c", "iptables-save | grep -c KUBE-SVC || true"); err != nil || strings.TrimSpace(string(out)) != "0" {
			t.Errorf("%s: KUBE-SVC rules without kube-proxy: %q %v", node, out, err)
		}
	}

	if err := c.Apply(ctx, netexecPod("a", "node1")+"---\n"+netexecPod("b", "node2")); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	for _, p := range []string{"a", "b"} {
		if err := c.WaitPods(ctx, "default", "app="+p, 1); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("TIMING two pods Ready: %s", time.Since(t0).Round(time.Millisecond))
	ipA, err := c.PodIP(ctx, "default", "a")
	if err != nil {
		t.Fatal(err)
	}
	ipB, err := c.PodIP(ctx, "default", "b")
	if err != nil {
		t.Fatal(err)
	}
	if !c.PodCIDRs["node1"].Contains(ipA) || !c.PodCIDRs["node2"].Contains(ipB) {
		t.Errorf("pod IPs a=%s b=%s outside their nodes' pod CIDRs %v", ipA, ipB, c.PodCIDRs)
	}

	// Pod to pod across nodes, both ways: a TCP connect from inside the pod
	// (kubectl exec), and an HTTP request made by the pod (netexec /dial).
	for _, x := range []struct{ from, to, ip string }{{"a", "b", ipB.String()}, {"b", "a", ipA.String()}} {
		if out, err := c.Kubectl(ctx, "exec", x.from, "--", "/agnhost", "connect", "--timeout=5s", x.ip+":8080"); err != nil {
			t.Errorf("pod %s -> pod %s (%s): %v %s", x.from, x.to, x.ip, err, out)
		}
	}
	got, err := dial(ctx, c, "node1", ipA.String(), ipB.String(), 8080)
	if err != nil || got != `{"responses":["b"]}` {
		t.Errorf("pod a -> http://%s:8080/hostname: %q %v", ipB, got, err)
	}
	logMemory(t, c)
}

// TestE2ELegacyCluster: the cluster kpfree migrates from, with kube-proxy in
// iptables mode: kube-proxy Running on both nodes and a ClusterIP Service
// answering a pod on the other node.
func TestE2ELegacyCluster(t *testing.T) {
	labtest.Skip(t)
	c := cluster.LegacyCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	out, err := c.Kubectl(ctx, "get", "pods", "-n", "kube-system", "-l", "k8s-app=kube-proxy", "-o",
		`jsonpath={range .items[*]}{.spec.nodeName} {.status.phase}{"\n"}{end}`)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Fields(out); len(got) != 4 || got[1] != "Running" || got[3] != "Running" {
		t.Errorf("kube-proxy pods: %q, want Running on node1 and node2", out)
	}
	mode, err := c.Kubectl(ctx, "get", "configmap", "-n", "kube-system", "kube-proxy", "-o", "jsonpath={.data.config\\.conf}")
	if err != nil || !strings.Contains(mode, "mode: iptables") || !strings.Contains(mode, "maxPerCore: 0") {
		t.Errorf("kube-proxy config: %v\n%s", err, mode)
	}
	if err := c.WaitPods(ctx, "kube-system", "k8s-app=kube-dns", 2); err != nil {
		t.Errorf("CoreDNS: %v", err)
	}

	echo := `apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node1}
      tolerations: [{operator: Exists}]
      terminationGracePeriodSeconds: 1
      containers:
      - name: netexec
        image: ` + cluster.AgnhostImage + `
        args: [netexec, --http-port=8080]
        readinessProbe:
          httpGet: {path: /healthz, port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
` + netexecPod("client", "node2")
	if err := c.Apply(ctx, echo); err != nil {
		t.Fatal(err)
	}
	for _, sel := range []string{"app=echo", "app=client"} {
		if err := c.WaitPods(ctx, "default", sel, 1); err != nil {
			t.Fatal(err)
		}
	}
	clusterIP, err := c.Kubectl(ctx, "get", "service", "echo", "-o", "jsonpath={.spec.clusterIP}")
	if err != nil {
		t.Fatal(err)
	}
	client, err := c.PodIP(ctx, "default", "client")
	if err != nil {
		t.Fatal(err)
	}
	backend, err := c.Kubectl(ctx, "get", "pods", "-l", "app=echo", "-o", "jsonpath={.items[0].metadata.name}")
	if err != nil {
		t.Fatal(err)
	}
	// The client pod on node2 asks the Service's ClusterIP; kube-proxy's
	// rules in node2's netns send it to the backend on node1. The endpoints
	// may reach kube-proxy a moment after the pod is Ready.
	want := fmt.Sprintf(`{"responses":["%s"]}`, backend)
	var got string
	t0 := time.Now()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		got, err = dial(ctx, c, "node2", client.String(), clusterIP, 80)
		if (err == nil && got == want) || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || got != want {
		t.Errorf("client pod -> http://%s:80 (ClusterIP): %q %v, want %s", clusterIP, got, err, want)
	} else {
		t.Logf("TIMING ClusterIP answered the client %s after its pods were Ready", time.Since(t0).Round(time.Millisecond))
	}
	for _, node := range c.Lab.NodeNames() {
		out, err := c.Lab.Exec(ctx, node, "sh", "-c", "iptables-save | grep -c -- '-A KUBE-SERVICES' || true")
		if err != nil || strings.TrimSpace(string(out)) == "0" {
			t.Errorf("%s: no KUBE-SERVICES rules in the node's netns: %q %v", node, out, err)
		}
	}
	logMemory(t, c)
}
