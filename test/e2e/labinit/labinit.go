// Package labinit prepares `kpfree init` for a Kubernetes lab (internal/lab
// with Options.Kubernetes): what a lab node needs that a real host would
// have from its distribution and its operator.
//
//   - kubelet: cgroupDriver cgroupfs and failCgroupV1 false (no systemd,
//     cgroup v1 + cgroup2 hybrid), as a --kubelet-config file;
//   - each node's own cgroupRoot, as a kubeadm patch per host
//     (--kubeadm-patches DIR/<node>/kubeletconfiguration+merge.yaml);
//   - the nodes' containerd socket (--cri-socket);
//   - the kpfree-agent image, built from this source tree and imported into
//     every node (pull policy Never: no registry), attached to each node's
//     own cgroup2 subtree (--agent-values).
//
// TestE2EInit uses Prepare; hack/demo-init.sh runs it through
// `go run ./test/e2e/labinit/prepare`.
package labinit

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kpfree/kpfree/internal/image"
	"github.com/kpfree/kpfree/internal/lab"
)

// AgentImage is the kpfree-agent image Prepare builds and imports.
const AgentImage = "localhost/kpfree-agent:lab"

// VerifyImage is agnhost as lab up imports it (test/images tags its 2.56
// build 2.53 too, verify's default).
const VerifyImage = "registry.k8s.io/e2e-test-images/agnhost:2.53"

// Prepare writes the files of the flags into dir, builds the agent image and
// imports it into every node of s; it returns the flags to add to
// `kpfree init --nodes s.InventoryFile()`.
func Prepare(ctx context.Context, s *lab.State, dir string) ([]string, error) {
	write := func(rel, content string) (string, error) {
		p := filepath.Join(dir, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", err
		}
		return p, os.WriteFile(p, []byte(content), 0o644)
	}
	kubelet, err := write("kubelet.yaml", "# lab nodes: no systemd, cgroup v1 + cgroup2 (hybrid)\ncgroupDriver: cgroupfs\nfailCgroupV1: false\n")
	if err != nil {
		return nil, err
	}
	for _, n := range s.NodeNames() {
		if _, err := write(filepath.Join("patches", n, "kubeletconfiguration+merge.yaml"), "cgroupRoot: "+s.CgroupPath(n)+"\n"); err != nil {
			return nil, err
		}
	}
	values, err := write("agent-values.yaml", fmt.Sprintf(
		"# each lab node's agent serves that node's processes and pods only\ncgroupMount: %s\ncgroupRoot: %s/%s-lab/$(NODE_NAME)\n",
		s.CgroupRoot, s.CgroupRoot, s.Prefix))
	if err != nil {
		return nil, err
	}
	if err := ImportAgent(ctx, s, dir); err != nil {
		return nil, err
	}
	return []string{
		"--kubelet-config", kubelet,
		"--kubeadm-patches", filepath.Join(dir, "patches"),
		"--cri-socket", lab.ContainerdSocket,
		"--agent-image", AgentImage, "--agent-pull-policy", "Never",
		"--agent-values", values,
		"--verify-image", VerifyImage,
	}, nil
}

// ImportAgent builds kpfree-agent (static, from the source tree around the
// working directory) into AgentImage and imports it into every node.
func ImportAgent(ctx context.Context, s *lab.State, dir string) error {
	root, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	bin := filepath.Join(dir, "kpfree-agent")
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", bin, "./cmd/kpfree-agent")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build kpfree-agent: %w\n%s", err, out)
	}
	img, err := image.Build(image.AgentSpec(bin, AgentImage))
	if err != nil {
		return err
	}
	tar := filepath.Join(dir, "kpfree-agent.tar")
	if err := image.WriteTarball(tar, map[string]v1.Image{AgentImage: img}); err != nil {
		return err
	}
	data, err := os.ReadFile(tar)
	if err != nil {
		return err
	}
	for _, n := range s.NodeNames() {
		if out, err := s.ExecInput(ctx, n, data, "ctr", "-n", "k8s.io", "images", "import", "-"); err != nil {
			return fmt.Errorf("%s: import %s: %w\n%s", n, AgentImage, err, out)
		}
	}
	return nil
}

func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", err
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("not inside the kpfree source tree")
	}
	data, err := os.ReadFile(mod)
	if err != nil || !bytes.HasPrefix(data, []byte("module github.com/kpfree/kpfree\n")) {
		return "", fmt.Errorf("%s is not kpfree's go.mod", mod)
	}
	return filepath.Dir(mod), nil
}
