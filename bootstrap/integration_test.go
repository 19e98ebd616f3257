package bootstrap

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kpfree/kpfree/internal/inventory"
)

// kubeadmBin is make k8s-binaries' kubeadm, or "" when it is not built.
func kubeadmBin() string {
	cache := os.Getenv("KPFREE_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "kpfree")
	}
	p := filepath.Join(cache, "k8s", inventory.DefaultKubernetesVersion, "bin", "kubeadm")
	if _, err := os.Stat(p); err != nil {
		return ""
	}
	return p
}

// TestIntegrationKubeadmConfigValidate has the real kubeadm (make
// k8s-binaries) validate every configuration kpfree renders, in both API
// versions. kubeadm 1.34 refuses to deploy 1.30, so the v1beta3 init
// configuration is validated with its version raised (the schema is what
// counts here).
func TestIntegrationKubeadmConfigValidate(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: runs kubeadm")
	}
	kubeadm := kubeadmBin()
	if kubeadm == "" {
		t.Skip("no kubeadm: make k8s-binaries")
	}
	dir := t.TempDir()
	for _, version := range []string{"v1.34.4", "v1.30.9"} {
		inv := inventoryFor(t, version)
		cfg := ClusterConfigFrom(inv)
		cfg.Kubelet = map[string]any{"cgroupDriver": "cgroupfs", "failCgroupV1": false}
		cfg.Patches = true
		key := strings.Repeat("ab", 32)
		cp2 := inv.Workers()[0]
		cp2.Name, cp2.Role = "cp2", inventory.RoleControlPlane
		join := JoinParams{APIServerEndpoint: "10.0.0.11:6443", Token: "abcdef.0123456789abcdef",
			CACertHashes: []string{"sha256:" + strings.Repeat("0", 64)}, CertificateKey: key}
		configs := map[string]func() ([]byte, error){
			"init":    func() ([]byte, error) { return RenderInit(cfg, inv.FirstControlPlane(), key) },
			"join":    func() ([]byte, error) { return RenderJoin(cfg, inv.Workers()[1], join) },
			"join-cp": func() ([]byte, error) { return RenderJoin(cfg, cp2, join) },
		}
		for name, render := range configs {
			data, err := render()
			if err != nil {
				t.Fatal(err)
			}
			text := strings.Replace(string(data), `kubernetesVersion: "v1.30.9"`, `kubernetesVersion: "`+inventory.DefaultKubernetesVersion+`"`, 1)
			p := filepath.Join(dir, version+"-"+name+".yaml")
			if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command(kubeadm, "config", "validate", "--config", p).CombinedOutput()
			if err != nil || !strings.Contains(string(out), "ok") {
				t.Errorf("%s %s: kubeadm config validate: %v\n%s\n%s", version, name, err, out, text)
			}
		}
	}
}
