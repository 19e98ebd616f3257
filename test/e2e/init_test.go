package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/kpfree/kpfree/bootstrap"
	"github.com/kpfree/kpfree/internal/install"
	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/internal/runner"
	"github.com/kpfree/kpfree/internal/ssh"
	"github.com/kpfree/kpfree/test/e2e/labinit"
	labtest "github.com/kpfree/kpfree/test/lab"
	"github.com/kpfree/kpfree/verify"
)

// verifyImage is agnhost, imported into every node by lab up (test/images
// tags it 2.53 as well as its own 2.56).
const verifyImage = labinit.VerifyImage

// TestE2EInit: kpfree init on a two-node lab from `lab up --kubernetes`
// builds a Ready cluster without kube-proxy, verify passes (ClusterIP and
// NodePort from both nodes, answered by pods on both nodes), a second init
// changes nothing; then verify fails, naming the right check, with a
// kube-proxy ConfigMap, a KUBE rule on a node, the agent stopped on a node
// and a Service without endpoints.
func TestE2EInit(t *testing.T) {
	labtest.Skip(t)
	bin := labtest.KpfreeBin(t)
	lo := labtest.KubernetesOptions(t, 2)
	t0 := time.Now()
	s := labtest.Up(t, lo)
	t.Logf("TIMING lab up --kubernetes, 2 nodes: %s", time.Since(t0).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()

	// The lab's kubelet settings and the agent image (test/e2e/labinit).
	t1 := time.Now()
	dir := t.TempDir()
	flags, err := labinit.Prepare(ctx, s, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("TIMING kpfree-agent image built and imported, init files written: %s", time.Since(t1).Round(time.Millisecond))
	kubeconfig := filepath.Join(dir, "kubeconfig")
	args := append([]string{"init", "--nodes", s.InventoryFile(), "-o", "json", "--kubeconfig-out", kubeconfig}, flags...)
	t.Cleanup(func() {
		if t.Failed() {
			dumpCluster(t, s)
		}
	})

	// First run: the cluster.
	t2 := time.Now()
	out, stderr, code := runKpfree(ctx, bin, args...)
	t.Logf("TIMING kpfree init (2 nodes, verify included): %s", time.Since(t2).Round(time.Millisecond))
	var res bootstrap.Result
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("kpfree init exited %d, output not JSON (%v):\n%s\nstderr:\n%s", code, err, out, stderr)
	}
	for _, st := range res.Steps {
		t.Logf("step %-30s %-8s %5.1fs %s%s", st.Title, st.Status, st.Seconds, st.Reason, st.Error)
		if st.Status != runner.OK {
			t.Errorf("step %s: %s %s", st.Title, st.Status, st.Error)
		}
	}
	if res.Verify == nil {
		t.Fatalf("kpfree init exited %d without verifying:\n%s", code, stderr)
	}
	checkReport(t, "init", *res.Verify, nil)
	if code != 0 {
		t.Errorf("kpfree init exited %d:\n%s", code, stderr)
	}
	if fi, err := os.Stat(kubeconfig); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("kubeconfig %s: %v %v, want mode 0600", kubeconfig, fi, err)
	}
	data, err := os.ReadFile(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := bootstrap.NewClient(data)
	if err != nil {
		t.Fatal(err)
	}
	checkCluster(ctx, t, cs, s)

	// Second run: nothing to do.
	t3 := time.Now()
	out, stderr, _ = runKpfree(ctx, bin, append(args, "--no-verify")...)
	t.Logf("TIMING second kpfree init (no-op): %s", time.Since(t3).Round(time.Millisecond))
	var again bootstrap.Result
	if err := json.Unmarshal([]byte(out), &again); err != nil {
		t.Fatalf("second init: %v:\n%s\n%s", err, out, stderr)
	}
	if again.Changed || !again.OK || len(again.Plan) != 0 {
		t.Errorf("second init changed something: changed %v ok %v plan %v\n%s", again.Changed, again.OK, again.Plan, stderr)
	}
	for _, st := range again.Steps {
		if st.Status != runner.Skipped {
			t.Errorf("second init: %s: %s, want skipped", st.Title, st.Status)
		}
	}
	if !strings.Contains(stderr, "nothing to do") {
		t.Errorf("second init does not say it had nothing to do:\n%s", stderr)
	}

	verifyArgs := []string{"verify", "--nodes", s.InventoryFile(), "--kubeconfig", kubeconfig, "-o", "json", "--image", verifyImage}
	runVerify := func(t *testing.T) verify.Report {
		t.Helper()
		t0 := time.Now()
		out, stderr, code := runKpfree(ctx, bin, verifyArgs...)
		t.Logf("TIMING kpfree verify: %s", time.Since(t0).Round(time.Millisecond))
		var rep verify.Report
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			t.Fatalf("verify exited %d, output not JSON: %v\n%s\n%s", code, err, out, stderr)
		}
		if (code == 0) != rep.OK {
			t.Errorf("verify exited %d with ok=%v", code, rep.OK)
		}
		return rep
	}

	t.Run("kube-proxy ConfigMap", func(t *testing.T) {
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kube-proxy", Namespace: "kube-system"},
			Data: map[string]string{"config.conf": "mode: iptables\n"}}
		if _, err := cs.CoreV1().ConfigMaps("kube-system").Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		defer cs.CoreV1().ConfigMaps("kube-system").Delete(context.WithoutCancel(ctx), "kube-proxy", metav1.DeleteOptions{})
		checkReport(t, "verify", runVerify(t), map[string][]string{verify.CheckKubeProxyAbsent: {"ConfigMap kube-system/kube-proxy"}})
	})

	t.Run("KUBE rule on a node", func(t *testing.T) {
		add := "iptables -t nat -N KUBE-SERVICES && iptables -t nat -A KUBE-SERVICES -m comment --comment kpfree-e2e -j RETURN"
		del := "iptables -t nat -F KUBE-SERVICES; iptables -t nat -X KUBE-SERVICES"
		if out, err := sshNode(ctx, s, "node2", add); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		defer sshNode(context.WithoutCancel(ctx), s, "node2", del)
		checkReport(t, "verify", runVerify(t), map[string][]string{verify.CheckNoKubeRules: {"node2", "-A KUBE-SERVICES"}})
	})

	t.Run("agent stopped on a node", func(t *testing.T) {
		// Keep the DaemonSet off node2; the rest of the cluster is untouched.
		patch := `{"spec":{"template":{"spec":{"affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":` +
			`{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/hostname","operator":"NotIn","values":["node2"]}]}]}}}}}}}`
		ds := cs.AppsV1().DaemonSets(install.DefaultNamespace)
		if _, err := ds.Patch(ctx, install.DefaultReleaseName, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		defer func() {
			restore := `[{"op":"remove","path":"/spec/template/spec/affinity"}]`
			if _, err := ds.Patch(context.WithoutCancel(ctx), install.DefaultReleaseName, types.JSONPatchType, []byte(restore), metav1.PatchOptions{}); err != nil {
				t.Errorf("restore the agent DaemonSet: %v", err)
			}
			if _, err := install.WaitForAgents(context.WithoutCancel(ctx), cs, install.DefaultNamespace, install.DefaultReleaseName, 5*time.Minute); err != nil {
				t.Errorf("agents after the restore: %v", err)
			}
		}()
		// The patch rolls the DaemonSet: node1's agent restarts too. Wait
		// for node2's to be gone and node1's to be back.
		waitAgents(ctx, t, cs, map[string]bool{"node1": true, "node2": false})
		checkReport(t, "verify", runVerify(t), map[string][]string{verify.CheckAgentReady: {"not ready on node2 (no agent pod)"}},
			// Without an agent on node2 nothing serves ClusterIPs there.
			verify.CheckClusterIPFromPod, verify.CheckClusterIPFromNode, verify.CheckNodePort, verify.CheckDNS, verify.CheckAllBackends, verify.CheckEchoReady)
	})

	t.Run("Service without endpoints", func(t *testing.T) {
		// Through the library: the test breaks the echo Service's selector.
		rc, err := bootstrap.RESTConfig(data)
		if err != nil {
			t.Fatal(err)
		}
		inv, err := inventory.Load(s.InventoryFile())
		if err != nil {
			t.Fatal(err)
		}
		d := ssh.NewDialer(ssh.Options{})
		var hosts []verify.Host
		for _, tg := range inv.Targets() {
			e := d.Lazy(tg)
			defer e.Close()
			hosts = append(hosts, verify.Host{Name: tg.Name, Address: tg.Address, Exec: e})
		}
		rep := verify.Run(ctx, verify.Options{
			Client: cs, RESTConfig: rc, Hosts: hosts, Image: verifyImage,
			Customize: func(w *verify.Workload) { w.ClusterIP.Spec.Selector = map[string]string{"app": "nothing"} },
		})
		// DNS answers through the broken Service too; only the NodePort
		// Service still reaches the echo pods.
		checkReport(t, "verify", rep, map[string][]string{
			verify.CheckClusterIPFromPod:  {"0 ready endpoints"},
			verify.CheckClusterIPFromNode: {"0 ready endpoints"},
		}, verify.CheckDNS, verify.CheckAllBackends)
	})

	// And the cluster passes again once the faults are gone.
	checkReport(t, "final verify", runVerify(t), nil)
}

// checkReport logs a verify report and checks it: the checks in fails fail
// with their evidence saying the given words; those in may are not judged;
// every other check passes (nodeport may fail until the agent serves it).
func checkReport(t *testing.T, what string, rep verify.Report, fails map[string][]string, may ...string) {
	t.Helper()
	for _, c := range rep.Checks {
		t.Logf("%s: %-20s %-4s %s", what, c.Name, c.Status, c.Evidence)
		want, mustFail := fails[c.Name]
		switch {
		case mustFail:
			if c.Status != verify.Fail {
				t.Errorf("%s: %s: %s, want fail", what, c.Name, c.Status)
				continue
			}
			for _, w := range want {
				if !strings.Contains(c.Evidence, w) {
					t.Errorf("%s: %s: evidence %q lacks %q", what, c.Name, c.Evidence, w)
				}
			}
		case contains(may, c.Name):
		case c.Status != verify.Pass:
			t.Errorf("%s: %s: %s: %s\n  %s", what, c.Name, c.Status, c.Evidence, strings.Join(c.Details, "\n  "))
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// checkCluster: every node Ready, no kube-proxy anywhere.
func checkCluster(ctx context.Context, t *testing.T, cs kubernetes.Interface, s *lab.State) {
	t.Helper()
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes.Items) != len(s.NodeNames()) {
		t.Errorf("%d Nodes, want %d", len(nodes.Items), len(s.NodeNames()))
	}
	for _, n := range nodes.Items {
		ready := false
		for _, c := range n.Status.Conditions {
			ready = ready || (c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue)
		}
		if !ready {
			t.Errorf("node %s not Ready", n.Name)
		}
	}
	if _, err := cs.AppsV1().DaemonSets("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{}); err == nil {
		t.Error("a kube-proxy DaemonSet exists")
	}
	pods, err := cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		if strings.Contains(p.Name, "kube-proxy") {
			t.Errorf("a kube-proxy pod: %s/%s", p.Namespace, p.Name)
		}
	}
}

// runKpfree runs the binary and returns stdout, stderr and the exit code.
func runKpfree(ctx context.Context, bin string, args ...string) (string, string, int) {
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		code = -1
		stderr.WriteString(err.Error())
	}
	return stdout.String(), stderr.String(), code
}

// sshNode runs a command on a node as root over SSH, as an operator would.
func sshNode(ctx context.Context, s *lab.State, node, command string) (string, error) {
	cmd, err := s.SSHCommand(ctx, node, "root", command)
	if err != nil {
		return "", err
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// waitAgents waits until each node has a ready agent (true) or no agent
// pod at all (false).
func waitAgents(ctx context.Context, t *testing.T, cs kubernetes.Interface, want map[string]bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	var last string
	for {
		a, err := install.GetAgents(ctx, cs, install.DefaultNamespace, install.DefaultReleaseName)
		if err == nil {
			done := true
			for _, n := range a.Nodes {
				ready, ok := want[n.Node]
				if ok && ((ready && !n.Ready) || (!ready && n.Pod != "")) {
					done = false
				}
			}
			if done {
				return
			}
			last = a.String()
		}
		if time.Now().After(deadline) {
			t.Fatalf("agents not as wanted (%v) after 3m: %v %s", want, err, last)
		}
		time.Sleep(2 * time.Second)
	}
}

// dumpCluster logs the cluster's state and the agents' logs.
func dumpCluster(t *testing.T, s *lab.State) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kc := []string{"kubectl", "--kubeconfig", "/etc/kubernetes/admin.conf"}
	for _, args := range [][]string{
		{"get", "nodes,pods", "-A", "-o", "wide"},
		{"-n", "kube-system", "logs", "-l", "app.kubernetes.io/name=kpfree-agent", "--tail", "40", "--prefix"},
		{"get", "events", "-A", "--sort-by", ".lastTimestamp"},
	} {
		out, err := s.Exec(ctx, "node1", append(kc, args...)...)
		t.Logf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	for _, n := range s.NodeNames() {
		out, _ := s.Exec(ctx, n, "sh", "-c", "tail -n 20 "+lab.ServiceLogDir+"/kubelet.log")
		t.Logf("%s kubelet:\n%s", n, out)
	}
}
