package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kpfree/kpfree/internal/lab"
	labtest "github.com/kpfree/kpfree/test/lab"
)

func kpfree(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kpfree %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// TestE2ELabUpKubernetesCLI: kpfree lab up --kubernetes makes nodes ready
// for kubeadm; a node whose holder died is rebuilt by lab up with its
// services started again, as after a reboot; lab down leaves nothing.
func TestE2ELabUpKubernetesCLI(t *testing.T) {
	o := labtest.KubernetesOptions(t, 1) // a free slot, and the images built
	bin := labtest.KpfreeBin(t)
	t.Cleanup(func() { labtest.Down(t, o) })
	up := []string{"lab", "up", "--kubernetes", "--nodes", "1", "--dir", o.Dir, "--prefix", o.Prefix,
		"--subnet", o.Subnet.String(), "--k8s-bin-dir", o.K8sBinDir, "--images", o.Images, "-o", "json"}
	t0 := time.Now()
	out := kpfree(t, bin, up...)
	t.Logf("TIMING kpfree lab up --kubernetes --nodes 1: %s", time.Since(t0).Round(time.Millisecond))
	var res struct {
		Kubernetes bool
		Nodes      []struct{ Name, CgroupRoot string }
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("%v:\n%s", err, out)
	}
	if !res.Kubernetes || len(res.Nodes) != 1 || res.Nodes[0].CgroupRoot != "/"+o.Prefix+"-lab/node1" {
		t.Errorf("lab up output: %s", out)
	}

	s, err := lab.Load(o.Dir)
	if err != nil {
		t.Fatal(err)
	}
	check := func() {
		t.Helper()
		cmd, err := s.SSHCommand(context.Background(), "node1", "root",
			"systemctl is-active containerd && systemctl is-enabled kubelet && kubeadm version -o short && ctr -n k8s.io images ls -q | grep -c registry.k8s.io/pause:3.10.1")
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.CombinedOutput()
		if got := strings.Fields(string(out)); err != nil || len(got) != 4 || got[0] != "active" || got[1] != "enabled" || got[2] != "v1.34.4" || got[3] != "1" {
			t.Errorf("node1: %v:\n%s", err, out)
		}
	}
	check()

	// The holder dies (the node "crashes"): lab up rebuilds the node.
	holder := s.Node("node1").HolderPID
	if err := syscall.Kill(holder, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	kpfree(t, bin, "lab", "up", "--nodes", "1", "--dir", o.Dir)
	t.Logf("TIMING lab up rebuilding a Kubernetes node: %s", time.Since(t1).Round(time.Millisecond))
	if s, err = lab.Load(o.Dir); err != nil {
		t.Fatal(err)
	}
	if s.Node("node1").HolderPID == holder {
		t.Fatal("node1 not rebuilt")
	}
	check()

	kpfree(t, bin, "lab", "down", "--dir", o.Dir)
	if left := lab.Leftovers(o.Prefix); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}
