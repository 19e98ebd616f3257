package lab_test

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	labtest "github.com/kpfree/kpfree/test/lab"
)

// hostSysctls are machine-wide (or root netns) settings a Kubernetes node
// must not change.
var hostSysctls = []string{
	"/proc/sys/vm/overcommit_memory", "/proc/sys/vm/panic_on_oom", "/proc/sys/kernel/panic",
	"/proc/sys/kernel/panic_on_oops", "/proc/sys/kernel/keys/root_maxkeys", "/proc/sys/kernel/keys/root_maxbytes",
	"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/bridge/bridge-nf-call-iptables",
}

func readSysctls(t *testing.T) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, p := range hostSysctls {
		data, _ := os.ReadFile(p)
		m[p] = strings.TrimSpace(string(data))
	}
	return m
}

// hostDefaultPaths are where containerd and kubelet keep state by default:
// the host's must stay untouched (absent here).
var hostDefaultPaths = []string{"/run/containerd", "/var/lib/containerd", "/var/lib/kubelet", "/etc/kubernetes",
	"/usr/local/bin/kubelet", "/usr/local/bin/systemctl", "/var/log/pods", "/usr/lib/modules", "/usr/libexec/kubernetes",
	"/etc/kpfree-lab", "/var/log/kpfree-lab"}

// Kubernetes nodes, with the lab dir under /var/lib like the default
// /var/lib/kpfree-lab: /var/lib is overlaid in the nodes, yet their
// containerd and kubelet dirs are on the real file system.
func TestIntegrationLabKubernetesNodes(t *testing.T) {
	o := labtest.KubernetesOptions(t, 2)
	dir, err := os.MkdirTemp("/var/lib", "kpfree-labtest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	o.Dir = dir
	sysctlsBefore := readSysctls(t)
	existed := map[string]bool{}
	for _, p := range hostDefaultPaths {
		_, err := os.Lstat(p)
		existed[p] = err == nil
	}
	ctx := context.Background()
	t0 := time.Now()
	s := labtest.Up(t, o)
	t.Logf("TIMING up 2 Kubernetes nodes: %s", time.Since(t0))

	for _, node := range s.NodeNames() {
		out, err := s.Exec(ctx, node, "sh", "-c", `
			systemctl is-active containerd; systemctl is-enabled kubelet; systemctl status kubelet >/dev/null; echo status=$?
			cat /proc/sys/net/ipv4/ip_forward /proc/sys/vm/overcommit_memory /proc/sys/kernel/panic
			kubeadm version -o short; command -v systemctl
			ctr -n k8s.io images ls -q | sort | tr '\n' ' '; echo
			touch /usr/local/bin/kubeadm 2>/dev/null && echo writable || echo read-only
			findmnt -n -o FSTYPE,PROPAGATION /var/lib/kubelet; findmnt -n -o FSTYPE /var/lib/containerd
			findmnt -n -o FSTYPE /var/lib
			ls -d /lib/modules/$(uname -r)`)
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		t.Logf("%s:\n%s", node, out)
		want := []string{"active", "enabled", "", "1", "1", "10", "v1.34.4", "/usr/local/bin/systemctl", "", "read-only", "", "ext4", "overlay", ""}
		if len(lines) != len(want) {
			t.Fatalf("%s: %d lines, want %d", node, len(lines), len(want))
		}
		for i, w := range want {
			if w != "" && lines[i] != w {
				t.Errorf("%s: line %d = %q, want %q", node, i+1, lines[i], w)
			}
		}
		if st := lines[2]; st != "status=3" && st != "status=0" {
			t.Errorf("%s: systemctl status kubelet: %s", node, st)
		}
		for _, img := range []string{"registry.k8s.io/pause:3.10.1", "registry.k8s.io/kube-apiserver:v1.34.4", "registry.k8s.io/e2e-test-images/agnhost:2.56"} {
			if !strings.Contains(lines[8], img) {
				t.Errorf("%s: image %s not imported: %s", node, img, lines[8])
			}
		}
		if !strings.HasPrefix(lines[10], "ext4") || !strings.Contains(lines[10], "shared") {
			t.Errorf("%s: /var/lib/kubelet: %q, want ext4, shared", node, lines[10])
		}

		// containerd runs in the node's cgroups, v1 and v2.
		pids, err := s.NodePIDs(node)
		if err != nil {
			t.Fatal(err)
		}
		var containerd int
		for _, pid := range pids {
			if comm, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm"); strings.TrimSpace(string(comm)) == "containerd" {
				containerd = pid
			}
		}
		if containerd == 0 {
			t.Fatalf("%s: no containerd among the node's processes %v", node, pids)
		}
		cg, _ := os.ReadFile("/proc/" + strconv.Itoa(containerd) + "/cgroup")
		for _, line := range strings.Split(strings.TrimSpace(string(cg)), "\n") {
			if !strings.HasSuffix(line, ":"+s.CgroupPath(node)) {
				t.Errorf("%s: containerd (%d) in %q, want %s in every hierarchy", node, containerd, line, s.CgroupPath(node))
			}
		}
	}
	for p, v := range readSysctls(t) {
		if sysctlsBefore[p] != v {
			t.Errorf("host %s changed: %s -> %s", p, sysctlsBefore[p], v)
		}
	}
	for _, p := range hostDefaultPaths {
		if _, err := os.Lstat(p); (err == nil) != existed[p] {
			t.Errorf("host %s: existed %v, exists now %v", p, existed[p], err == nil)
		}
	}

	// Down removes the cgroup v1 dirs too.
	labtest.Down(t, o)
	for _, root := range s.CgroupV1 {
		if _, err := os.Stat(filepath.Join(root, o.Prefix+"-lab")); !os.IsNotExist(err) {
			t.Errorf("cgroup %s left: %v", filepath.Join(root, o.Prefix+"-lab"), err)
		}
	}
	if len(s.CgroupV1) == 0 {
		t.Log("no cgroup v1 hierarchies on this machine")
	}
}
