package lab_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kpfree/kpfree/internal/lab"
	labtest "github.com/kpfree/kpfree/test/lab"
)

// sshRun runs remote on node as user with /usr/bin/ssh, strict host key
// checking against the lab's known_hosts.
func sshRun(t *testing.T, s *lab.State, node, user, remote string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd, err := s.SSHCommand(ctx, node, user, remote)
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	t0 := time.Now()
	err = cmd.Run()
	t.Logf("ssh %s@%s %q: %s", user, node, remote, time.Since(t0))
	return strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()), err
}

func mustSSH(t *testing.T, s *lab.State, node, user, remote string) string {
	t.Helper()
	out, stderr, err := sshRun(t, s, node, user, remote)
	if err != nil {
		t.Fatalf("ssh %s@%s %q: %v: %s", user, node, remote, err, stderr)
	}
	return out
}

// etcDigest summarizes the host files a lab node changes in its own /etc:
// mode, owner, size, mtime and content hash of each. (Not all of /etc: other
// work on the machine may change unrelated files meanwhile.)
func etcDigest(t *testing.T) string {
	t.Helper()
	paths := []string{"/etc", "/etc/sudoers.d", "/run"}
	for _, f := range []string{"passwd", "shadow", "group", "gshadow", "hostname", "hosts", "machine-id", "sudoers"} {
		paths = append(paths, "/etc/"+f)
	}
	if entries, err := os.ReadDir("/etc/sudoers.d"); err == nil {
		for _, e := range entries {
			paths = append(paths, "/etc/sudoers.d/"+e.Name())
		}
	}
	var lines []string
	for _, p := range paths {
		fi, err := os.Lstat(p)
		if err != nil {
			lines = append(lines, p+" missing")
			continue
		}
		st := fi.Sys().(*syscall.Stat_t)
		line := fmt.Sprintf("%s %v %d:%d", p, fi.Mode(), st.Uid, st.Gid)
		if fi.Mode().IsRegular() {
			data, _ := os.ReadFile(p)
			line += fmt.Sprintf(" %d %d %x", fi.Size(), fi.ModTime().UnixNano(), sha256.Sum256(data))
		}
		lines = append(lines, line)
	}
	for _, p := range []string{"/run/sshd", "/root/.ssh/known_hosts", "/home/kpadmin"} {
		if _, err := os.Lstat(p); err == nil {
			lines = append(lines, p+" exists")
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func fileHash(t *testing.T, p string) string {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(data))
}

// killAndWait kills pid behind the lab's back and waits until it is gone
// (or a zombie).
func killAndWait(t *testing.T, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || bytes.Contains(stat, []byte(") Z ")) {
			return
		}
	}
	t.Fatalf("process %d still runs after SIGKILL", pid)
}

func pingCmd(addr string) string {
	if _, err := exec.LookPath("ping"); err == nil {
		return "ping -c 1 -W 2 " + addr
	}
	return "busybox ping -c 1 -W 2 " + addr
}

func TestIntegrationLabThreeNodes(t *testing.T) {
	o := labtest.Options(t, 3)
	passwdBefore := fileHash(t, "/etc/passwd")
	etcBefore := etcDigest(t)
	ctx := context.Background()

	t0 := time.Now()
	s := labtest.Up(t, o)
	t.Logf("TIMING up 3 nodes: %s", time.Since(t0))

	// hosts.yaml and known_hosts are where they should be.
	inv, err := os.ReadFile(filepath.Join(o.Dir, "hosts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kind: Inventory", "role: control-plane", "knownHostsFile: " + s.KnownHostsFile()} {
		if !strings.Contains(string(inv), want) {
			t.Errorf("hosts.yaml lacks %q:\n%s", want, inv)
		}
	}

	ids := map[string]string{}
	for _, node := range s.NodeNames() {
		if got := mustSSH(t, s, node, "root", "hostname"); got != node {
			t.Errorf("ssh root@%s hostname = %q", node, got)
		}
		id := mustSSH(t, s, node, "root", "cat /etc/machine-id")
		if other, dup := ids[id]; dup {
			t.Errorf("%s and %s share machine-id %s", node, other, id)
		}
		ids[id] = node
	}
	if got := mustSSH(t, s, "node2", lab.AdminUser, "id -un && sudo -n true && sudo -n id -u"); got != "kpadmin\n0" {
		t.Errorf("kpadmin with sudo: %q", got)
	}
	_, stderr, err := sshRun(t, s, "node3", lab.NoPasswordUser, "sudo -n true")
	if err == nil || !strings.Contains(stderr, "password") {
		t.Errorf("kpnopw sudo -n true: err=%v stderr=%q, want a refusal asking for a password", err, stderr)
	}
	if got := mustSSH(t, s, "node1", lab.AdminUser, "cat /proc/self/cgroup"); !strings.Contains(got, "0::/"+o.Prefix+"-lab/node1\n") && !strings.HasSuffix(got, "0::/"+o.Prefix+"-lab/node1") {
		t.Errorf("an ssh session in node1 is not in the node's cgroup: %q", got)
	}
	n2 := s.Node("node2")
	mustSSH(t, s, "node1", "root", pingCmd(n2.Address.String()))
	mustSSH(t, s, "node1", "root", "getent hosts node3")

	// Exec runs inside the node and its cgroup.
	out, err := s.Exec(ctx, "node3", "sh", "-c", "hostname; cat /proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(out), "node3\n") || !strings.Contains(string(out), "0::/"+o.Prefix+"-lab/node3") {
		t.Errorf("Exec in node3: %q", out)
	}
	// The host's users are untouched; the nodes' have the lab users.
	if _, err := exec.Command("id", lab.AdminUser).Output(); err == nil {
		t.Errorf("the host has user %s", lab.AdminUser)
	}

	// Up again is a no-op.
	before := *s.Node("node1")
	t1 := time.Now()
	s2, err := lab.Up(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("TIMING up again (no-op): %s", time.Since(t1))
	if after := *s2.Node("node1"); after.HolderPID != before.HolderPID || after.SSHDPID != before.SSHDPID {
		t.Errorf("Up again restarted node1: %+v -> %+v", before, after)
	}

	t2 := time.Now()
	if err := lab.Down(ctx, o.Dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("TIMING down 3 nodes: %s", time.Since(t2))
	if left := lab.Leftovers(o.Prefix); len(left) > 0 {
		t.Errorf("leftovers after down: %v", left)
	}
	if _, err := os.Stat(o.Dir); !os.IsNotExist(err) {
		t.Errorf("state dir still there: %v", err)
	}
	if err := lab.Down(ctx, o.Dir); err != nil {
		t.Errorf("second down: %v", err)
	}
	if got := fileHash(t, "/etc/passwd"); got != passwdBefore {
		t.Error("the host's /etc/passwd changed")
	}
	if etcDigest(t) != etcBefore {
		t.Errorf("the host's /etc changed:\nbefore:\n%s\nafter:\n%s", etcBefore, etcDigest(t))
	}
}

func TestIntegrationLabGrowRepairRotate(t *testing.T) {
	o := labtest.Options(t, 1)
	ctx := context.Background()
	s := labtest.Up(t, o)
	node1 := *s.Node("node1")

	// Another lab with the same prefix is refused and leaves this one alone.
	other := o
	other.Dir = filepath.Join(t.TempDir(), "other")
	if _, err := lab.Up(ctx, other); err == nil || !strings.Contains(err.Error(), "another lab") {
		t.Errorf("second lab with prefix %s: %v", o.Prefix, err)
	}
	if _, err := os.Stat(other.Dir); !os.IsNotExist(err) {
		t.Errorf("refused lab left its dir: %v", err)
	}

	// Grow 1 -> 3.
	o.Nodes = 3
	t0 := time.Now()
	s, err := lab.Up(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("TIMING grow 1 -> 3 nodes: %s", time.Since(t0))
	if n := s.Node("node1"); n.HolderPID != node1.HolderPID || n.SSHDPID != node1.SSHDPID {
		t.Errorf("growing restarted node1: %+v -> %+v", node1, *n)
	}
	if got := mustSSH(t, s, "node1", "root", "getent ahostsv4 node3 | head -n1"); !strings.HasPrefix(got, s.Node("node3").Address.String()) {
		t.Errorf("node1 does not know node3: %q", got)
	}
	mustSSH(t, s, "node3", lab.AdminUser, "sudo -n true")

	// A node whose sshd died is rebuilt by Up, with the same host key.
	node2 := *s.Node("node2")
	killAndWait(t, node2.SSHDPID)
	s, err = lab.Up(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.Node("node2"); n.SSHDPID == node2.SSHDPID || n.HostKey != node2.HostKey {
		t.Errorf("node2 not repaired or got a new host key: %+v -> %+v", node2, *n)
	}
	if got := mustSSH(t, s, "node2", "root", "hostname"); got != "node2" {
		t.Errorf("repaired node2: hostname %q", got)
	}

	// StopSSHD / StartSSHD.
	if err := s.StopSSHD(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := sshRun(t, s, "node1", "root", "true"); err == nil || !strings.Contains(stderr, "refused") {
		t.Errorf("ssh with sshd stopped: err=%v stderr=%q", err, stderr)
	}
	if err := s.StartSSHD(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	mustSSH(t, s, "node1", "root", "true")

	// RotateHostKey: clients see a changed key until known_hosts is rewritten.
	if err := s.RotateHostKey(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := sshRun(t, s, "node1", "root", "true"); err == nil || !strings.Contains(stderr, "REMOTE HOST IDENTIFICATION HAS CHANGED") {
		t.Errorf("ssh after host key rotation: err=%v stderr=%q", err, stderr)
	}
	if err := s.WriteKnownHosts(); err != nil {
		t.Fatal(err)
	}
	mustSSH(t, s, "node1", "root", "true")

	// Load sees what this process changed.
	loaded, err := lab.Load(o.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := *loaded.Node("node1"), *s.Node("node1"); got != want {
		t.Errorf("Load: %+v, want %+v", got, want)
	}
}

func TestIntegrationLabTwentyNodes(t *testing.T) {
	o := labtest.Options(t, 20)
	ctx := context.Background()
	t0 := time.Now()
	s := labtest.Up(t, o)
	up := time.Since(t0)
	t.Logf("TIMING up 20 nodes: %s", up)
	if up > 15*time.Second {
		t.Errorf("up 20 nodes took %s, want < 15s", up)
	}
	if got := mustSSH(t, s, "node20", lab.AdminUser, "sudo -n hostname"); got != "node20" {
		t.Errorf("node20: hostname %q", got)
	}
	for _, node := range s.NodeNames() {
		out, err := s.Exec(ctx, node, "hostname")
		if err != nil || strings.TrimSpace(string(out)) != node {
			t.Errorf("%s: hostname %q, %v", node, out, err)
		}
	}
	t1 := time.Now()
	if err := lab.Down(ctx, o.Dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("TIMING down 20 nodes: %s", time.Since(t1))
}

// A crashed Up leaves dead processes, missing links and nodes recorded but
// never built: Down still removes everything.
func TestIntegrationLabDownAfterCrash(t *testing.T) {
	o := labtest.Options(t, 2)
	ctx := context.Background()
	s := labtest.Up(t, o)
	n1, n2 := s.Node("node1"), s.Node("node2")
	killAndWait(t, n1.SSHDPID)
	killAndWait(t, n1.HolderPID)
	if err := exec.Command("ip", "link", "del", n2.Veth).Run(); err != nil {
		t.Fatal(err)
	}
	// Record a node3 that was never built, as a crash right after recording it would.
	statePath := filepath.Join(o.Dir, "state.json")
	data, err := os.ReadFile(statePath)
	if err != nil {
		t.Fatal(err)
	}
	ghost := fmt.Sprintf(`{"name": "node3", "index": 3, "address": "%s", "netns": "/run/netns/%s-node3", "veth": "%s-node3", "cgroup": "%s", "holderPID": 0, "sshdPID": 0, "hostKey": ""},`,
		n2.Address.Next(), o.Prefix, o.Prefix, filepath.Join(filepath.Dir(n2.Cgroup), "node3"))
	data = bytes.Replace(data, []byte(`"nodes": [`), []byte(`"nodes": [`+ghost), 1)
	if err := os.WriteFile(statePath, data, 0o644); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := lab.Down(ctx, o.Dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("TIMING down after crash: %s", time.Since(t0))
	if left := lab.Leftovers(o.Prefix); len(left) > 0 {
		t.Errorf("leftovers: %v", left)
	}
}

// With /var/lib overlaid too (what kubeadm, kubelet and containerd need) and
// the lab dir under /var/lib, like the default /var/lib/kpfree-lab.
func TestIntegrationLabVarLibOverlay(t *testing.T) {
	o := labtest.Options(t, 1)
	dir, err := os.MkdirTemp("/var/lib", "kpfree-labtest-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	o.Dir = dir
	o.ExtraOverlays = []string{"/var/lib"}
	ctx := context.Background()
	s := labtest.Up(t, o)

	marker := filepath.Join("/var/lib", "kpfree-labtest-node-only-"+o.Prefix)
	if _, err := s.Exec(ctx, "node1", "touch", marker); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(marker); !os.IsNotExist(err) {
		os.Remove(marker)
		t.Errorf("a file written in the node's /var/lib reached the host: %v", err)
	}
	// The node reads the lab's files as they are now, not as the overlay saw them.
	if err := s.RotateHostKey(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteKnownHosts(); err != nil {
		t.Fatal(err)
	}
	if got := mustSSH(t, s, "node1", lab.AdminUser, "sudo -n ls /var/lib/kpfree-labtest-node-only-"+o.Prefix); got == "" {
		t.Error("node-only file missing in the node")
	}
	if err := lab.Down(ctx, o.Dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("lab dir left: %v", err)
	}
}
