package kubeenv

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestIntegrationControlPlane(t *testing.T) {
	if testing.Short() || os.Geteuid() != 0 {
		t.Skip("integration: needs root and no -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	cp, err := Start(ctx, Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer cp.Stop()
	t.Logf("etcd + kube-apiserver ready in %s at %s", time.Since(start).Round(time.Millisecond), cp.URL)
	kubectl, err := Binary("kubectl")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(kubectl, "--kubeconfig", cp.Kubeconfig, "get", "--raw", "/version").CombinedOutput()
	if err != nil || !strings.Contains(string(out), KubernetesVersion) {
		t.Fatalf("kubectl get --raw /version: %v %s", err, out)
	}
	// A user certificate in a group RBAC knows: kube-proxy's.
	kp, err := cp.IssueUser("kube-proxy", "system:kube-proxy")
	if err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(kubectl, "--kubeconfig", kp, "auth", "can-i", "list", "endpointslices.discovery.k8s.io").CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "yes" {
		t.Fatalf("system:kube-proxy cannot list endpointslices: %v %s", err, out)
	}
	out, _ = exec.Command(kubectl, "--kubeconfig", kp, "auth", "can-i", "delete", "services").Output()
	if strings.TrimSpace(string(out)) != "no" {
		t.Fatalf("system:kube-proxy may delete services: %s", out)
	}
}
