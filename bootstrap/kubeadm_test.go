package bootstrap

import (
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"sigs.k8s.io/yaml"

	"github.com/kpfree/kpfree/internal/inventory"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("%s differs (-want +got; go test -update rewrites it):\n%s", path, diff)
	}
}

const threeHosts = `apiVersion: kpfree.io/v1alpha1
kind: Inventory
cluster:
  name: demo
  kubernetesVersion: %s
  podCIDR: 10.244.0.0/16
  serviceCIDR: 10.96.0.0/12
ssh:
  knownHostsFile: /dev/null
hosts:
  - name: cp1
    address: 10.0.0.11
    role: control-plane
  - name: w1
    address: 10.0.0.21
    role: worker
  - name: w2
    address: 10.0.0.22
    role: worker
`

func parseInventory(t *testing.T, text string) *inventory.Inventory {
	t.Helper()
	inv, err := inventory.Parse("hosts.yaml", []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	return inv
}

func inventoryFor(t *testing.T, version string) *inventory.Inventory {
	return parseInventory(t, strings.Replace(threeHosts, "%s", version, 1))
}

func TestKubeadmAPIVersion(t *testing.T) {
	for v, want := range map[string]string{
		"v1.34.4": KubeadmV1beta4, "v1.31.0": KubeadmV1beta4, "1.35.0-rc.1": KubeadmV1beta4, "v1.40": KubeadmV1beta4,
		"v1.30.9": KubeadmV1beta3, "v1.22.0": KubeadmV1beta3,
		"v1.21.14": "", "v2.0.0": "", "latest": "",
	} {
		got, err := KubeadmAPIVersion(v)
		if got != want || (want == "") != (err != nil) {
			t.Errorf("KubeadmAPIVersion(%q) = %q, %v; want %q", v, got, err, want)
		}
	}
}

// TestRenderGolden renders the init and join configurations for v1.34
// (v1beta4) and v1.30 (v1beta3), with the lab's kubelet settings and
// patches, and checks every document is valid YAML.
func TestRenderGolden(t *testing.T) {
	for _, version := range []string{"v1.34.4", "v1.30.9"} {
		t.Run(version, func(t *testing.T) {
			inv := inventoryFor(t, version)
			cfg := ClusterConfigFrom(inv)
			cfg.CRISocket = "unix:///var/run/containerd/containerd.sock"
			cfg.Kubelet = map[string]any{"cgroupDriver": "cgroupfs", "failCgroupV1": false}
			cfg.Patches = true
			cfg.IgnorePreflightErrors = []string{"SystemVerification"}
			cp, w1 := inv.FirstControlPlane(), inv.Workers()[0]
			cpJoin := w1
			cpJoin.Name, cpJoin.Address, cpJoin.Role = "cp2", "10.0.0.12", inventory.RoleControlPlane
			key := strings.Repeat("ab", 32)
			join := JoinParams{APIServerEndpoint: "10.0.0.11:6443", Token: "abcdef.0123456789abcdef",
				CACertHashes: []string{"sha256:" + strings.Repeat("0", 64)}, CertificateKey: key}

			var all strings.Builder
			for _, r := range []struct {
				name string
				fn   func() ([]byte, error)
			}{
				{"init cp1", func() ([]byte, error) { return RenderInit(cfg, cp, key) }},
				{"join w1", func() ([]byte, error) { return RenderJoin(cfg, w1, join) }},
				{"join cp2 (control plane)", func() ([]byte, error) { return RenderJoin(cfg, cpJoin, join) }},
			} {
				out, err := r.fn()
				if err != nil {
					t.Fatalf("%s: %v", r.name, err)
				}
				for i, doc := range strings.Split(string(out), "\n---\n") {
					var m map[string]any
					if err := yaml.Unmarshal([]byte(doc), &m); err != nil {
						t.Fatalf("%s: document %d is not YAML: %v\n%s", r.name, i, err, doc)
					}
					if m["apiVersion"] == nil || m["kind"] == nil {
						t.Errorf("%s: document %d has no apiVersion or kind", r.name, i)
					}
				}
				all.WriteString("### " + r.name + "\n")
				all.Write(out)
			}
			golden(t, "kubeadm-"+version[:5]+".golden", all.String())
		})
	}
}

// TestRenderInitFacts pins what makes the cluster kube-proxy-free, whatever
// the golden files say.
func TestRenderInitFacts(t *testing.T) {
	for version, proxyDisabled := range map[string]bool{"v1.34.4": true, "v1.30.9": false} {
		inv := inventoryFor(t, version)
		out, err := RenderInit(ClusterConfigFrom(inv), inv.FirstControlPlane(), "")
		if err != nil {
			t.Fatal(err)
		}
		docs := strings.Split(string(out), "\n---\n")
		var init, cluster, kubelet map[string]any
		for _, d := range docs {
			var m map[string]any
			if err := yaml.Unmarshal([]byte(d), &m); err != nil {
				t.Fatal(err)
			}
			switch m["kind"] {
			case "InitConfiguration":
				init = m
			case "ClusterConfiguration":
				cluster = m
			case "KubeletConfiguration":
				kubelet = m
			}
		}
		if diff := cmp.Diff([]any{"addon/kube-proxy"}, init["skipPhases"]); diff != "" {
			t.Errorf("%s: skipPhases: %s", version, diff)
		}
		if _, ok := init["certificateKey"]; ok {
			t.Errorf("%s: certificateKey without a key", version)
		}
		gotDisabled := cluster["proxy"] != nil && cluster["proxy"].(map[string]any)["disabled"] == true
		if gotDisabled != proxyDisabled {
			t.Errorf("%s: proxy.disabled = %v, want %v", version, gotDisabled, proxyDisabled)
		}
		net := cluster["networking"].(map[string]any)
		if net["podSubnet"] != "10.244.0.0/16" || net["serviceSubnet"] != "10.96.0.0/12" {
			t.Errorf("%s: networking = %v", version, net)
		}
		if cluster["controlPlaneEndpoint"] != "10.0.0.11:6443" || cluster["kubernetesVersion"] != version || cluster["clusterName"] != "demo" {
			t.Errorf("%s: cluster = %v", version, cluster)
		}
		if kubelet["cgroupDriver"] != "systemd" {
			t.Errorf("%s: cgroupDriver = %v, want the default systemd", version, kubelet["cgroupDriver"])
		}
	}
}

func TestParseKubeletConfig(t *testing.T) {
	m, err := ParseKubeletConfig([]byte("apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: cgroupfs\nfailCgroupV1: false\n"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]any{"cgroupDriver": "cgroupfs", "failCgroupV1": false}, m); diff != "" {
		t.Error(diff)
	}
	if _, err := ParseKubeletConfig([]byte("kind: KubeProxyConfiguration\n")); err == nil {
		t.Error("a KubeProxyConfiguration was accepted")
	}
}

func TestParseJoinCommand(t *testing.T) {
	j, err := parseJoinCommand("kubeadm join 10.0.0.11:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:1234 \n")
	if err != nil {
		t.Fatal(err)
	}
	want := JoinParams{APIServerEndpoint: "10.0.0.11:6443", Token: "abcdef.0123456789abcdef", CACertHashes: []string{"sha256:1234"}}
	if diff := cmp.Diff(want, j); diff != "" {
		t.Error(diff)
	}
	if _, err := parseJoinCommand("error: something"); err == nil {
		t.Error("garbage was accepted")
	}
}
