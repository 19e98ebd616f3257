package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kpfree/kpfree/internal/image"
)

// privateContainerd is a containerd of our own: root, state, sockets and config under a temp
// dir, and a private mount namespace with a tmpfs on /run (containerd 1.6 puts shim sockets in
// /run/containerd/s whatever its --state, and ctr its FIFOs in /run/containerd/fifo), so
// nothing lands on the host's default paths. ctr runs in the same mount namespace.
type privateContainerd struct {
	dir    string
	sock   string
	cmd    *exec.Cmd
	log    *os.File
	cgroup string // parent of our containers' cgroups, removed at the end
}

func needRoot(t *testing.T, tools ...string) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test (-short)")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%v (apt-get install containerd runc)", err)
		}
	}
}

func startContainerd(t *testing.T) *privateContainerd {
	t.Helper()
	dir := t.TempDir()
	c := &privateContainerd{dir: dir, sock: filepath.Join(dir, "containerd.sock"),
		cgroup: fmt.Sprintf("kpfree-imagetest-%d", os.Getpid())}
	cfg := fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = %[3]q
[ttrpc]
  address = "%[3]s.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), c.sock, filepath.Join(dir, "opt"))
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	var err error
	if c.log, err = os.Create(filepath.Join(dir, "containerd.log")); err != nil {
		t.Fatal(err)
	}
	// unshare and sh exec: the PID we hold is containerd's.
	c.cmd = exec.Command("unshare", "--mount", "--propagation", "private", "--",
		"sh", "-c", `mount -t tmpfs -o mode=0755 tmpfs /run && exec containerd --config "$1"`, "sh", cfgPath)
	c.cmd.Stdout, c.cmd.Stderr = c.log, c.log
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Logf("containerd PID %d, root %s", c.cmd.Process.Pid, dir)
	t.Cleanup(func() { c.stop(t) })

	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := c.ctr(context.Background(), "version"); err == nil {
			return c
		} else if time.Now().After(deadline) {
			t.Fatalf("containerd did not come up: %v\n%s", err, c.logTail())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *privateContainerd) logTail() string {
	b, _ := os.ReadFile(c.log.Name())
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// stop ends containerd by its PID (SIGTERM, then SIGKILL), and removes our cgroups. The
// mount namespace, its tmpfs and the overlay mounts go with the last process in it; the temp
// dir is removed by the testing package.
func (c *privateContainerd) stop(t *testing.T) {
	done := make(chan error, 1)
	go func() { done <- c.cmd.Wait() }()
	c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Errorf("containerd (PID %d) ignored SIGTERM; killing it", c.cmd.Process.Pid)
		c.cmd.Process.Kill()
		<-done
	}
	c.log.Close()
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*/" + c.cgroup)
	if d := "/sys/fs/cgroup/" + c.cgroup; isDir(d) {
		dirs = append(dirs, d)
	}
	for _, d := range dirs {
		if err := os.Remove(d); err != nil {
			t.Errorf("removing cgroup %s: %v", d, err)
		}
	}
}

func isDir(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

func (c *privateContainerd) ctrCmd(ctx context.Context, args ...string) *exec.Cmd {
	if len(args) == 0 || args[0] != "-n" {
		args = append([]string{"-n", "k8s.io"}, args...)
	}
	full := append([]string{fmt.Sprintf("--mount=/proc/%d/ns/mnt", c.cmd.Process.Pid), "--",
		"ctr", "--address", c.sock}, args...)
	return exec.CommandContext(ctx, "nsenter", full...)
}

// ctr runs ctr against our containerd and returns its stdout (stderr in the error).
func (c *privateContainerd) ctr(ctx context.Context, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd := c.ctrCmd(ctx, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("ctr %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

var runSeq int

// run runs a container of img to completion and returns its output.
func (c *privateContainerd) run(ctx context.Context, opts []string, img string, args ...string) (string, error) {
	runSeq++
	id := fmt.Sprintf("t%d", runSeq)
	a := append([]string{"run", "--rm", "--cgroup", "/" + c.cgroup + "/" + id}, opts...)
	a = append(append(a, img, id), args...)
	return c.ctr(ctx, a...)
}

// TestIntegrationContainerd imports the image set into a real (private) containerd and runs
// the tools of the kube-proxy image. It uses the real Kubernetes binaries when
// test/k8s/build.sh has built them, else the pause binary in their place.
func TestIntegrationContainerd(t *testing.T) {
	needRoot(t, "containerd", "ctr", "runc", "containerd-shim-runc-v2", "unshare", "nsenter")
	needTools(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	binDir := k8sBinDir()
	realBins := true
	for _, b := range requiredBinaries {
		if !isFile(filepath.Join(binDir, b)) {
			realBins = false
		}
	}
	if !realBins {
		t.Logf("no Kubernetes binaries in %s: using the pause binary as each of them", binDir)
		binDir = fakeBinDir(t, buildTestPause(t), requiredBinaries...)
	}

	out := filepath.Join(t.TempDir(), "images.tar")
	var stdout, stderr bytes.Buffer
	start := time.Now()
	o := options{binDir: binDir, out: out, format: formatDocker, iptablesMode: "nft", force: true}
	if err := run(ctx, o, &stdout, &stderr); err != nil {
		t.Fatalf("%v\n%s", err, stderr.String())
	}
	t.Logf("built in %v:\n%s%s", time.Since(start).Round(time.Millisecond), stdout.String(), stderr.String())
	images, _, err := imageSet(binDir, "/pause", "nft")
	if err != nil {
		t.Fatal(err)
	}
	wantRefs := refs(images)

	c := startContainerd(t)
	if _, err := c.ctr(ctx, "images", "import", out); err != nil {
		t.Fatal(err)
	}
	list, err := c.ctr(ctx, "images", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	gotRefs := strings.Fields(list)
	slices.Sort(gotRefs)
	slices.Sort(wantRefs)
	if !slices.Equal(gotRefs, wantRefs) {
		t.Errorf("containerd has %v\nwant %v", gotRefs, wantRefs)
	}
	t.Logf("imported:\n%s", list)

	// An OCI archive imports under the full names too (index.json annotations).
	ociRef := "registry.k8s.io/kpfree/oci-test:v1"
	ociImg, err := image.Build(image.Spec{Ref: ociRef, Files: []image.File{{Dst: "/hello", Data: []byte("hi\n")}}})
	if err != nil {
		t.Fatal(err)
	}
	ociOut := filepath.Join(t.TempDir(), "test.oci.tar")
	if err := image.WriteOCIArchive(ociOut, map[string]v1.Image{ociRef: ociImg}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ctr(ctx, "-n", "kpfree-oci", "images", "import", ociOut); err != nil {
		t.Fatal(err)
	}
	if list, err := c.ctr(ctx, "-n", "kpfree-oci", "images", "ls", "-q"); err != nil ||
		strings.TrimSpace(list) != ociRef {
		t.Errorf("OCI archive import: %q, %v", list, err)
	}

	// kubeadm's manifests run the control plane by name: PATH must find them.
	versionFlag := "--version"
	if !realBins {
		versionFlag = "-v" // the pause binary
	}
	for _, name := range []string{"kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kube-proxy"} {
		var img string
		for _, r := range wantRefs {
			if strings.Contains(r, "/"+name+":") {
				img = r
			}
		}
		got, err := c.run(ctx, nil, img, name, versionFlag)
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		t.Logf("%s %s: %s", name, versionFlag, strings.TrimSpace(got))
		if realBins && name != "etcd" && !strings.Contains(got, KubernetesVersion) {
			t.Errorf("%s --version: %q, want %s", name, got, KubernetesVersion)
		}
	}

	// The optional images start too (their entrypoints are the binaries at /).
	for _, tc := range []struct{ ref, want string }{
		{Registry + "/coredns/coredns:" + CoreDNSTag, "CoreDNS-1.12.1"},
		{Registry + "/e2e-test-images/agnhost:" + AgnhostTag, "version " + AgnhostTag},
	} {
		if !slices.Contains(wantRefs, tc.ref) {
			continue
		}
		name := "/" + strings.SplitN(path.Base(tc.ref), ":", 2)[0]
		arg := "-version"
		if name == "/agnhost" {
			arg = "--version"
		}
		if got, err := c.run(ctx, nil, tc.ref, name, arg); err != nil || !strings.Contains(got, tc.want) {
			t.Errorf("%s %s: %q, %v; want %q", name, arg, got, err, tc.want)
		}
	}

	proxy := Registry + "/kube-proxy:" + KubernetesVersion
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"iptables-nft", "--version"}, "(nf_tables)"},
		{[]string{"iptables", "--version"}, "(nf_tables)"}, // --iptables-mode nft
		{[]string{"ip6tables-restore", "--version"}, "(nf_tables)"},
		{[]string{"iptables-legacy", "-V"}, "(legacy)"},
		{[]string{"ip6tables-legacy-save", "--version"}, "(legacy)"},
		{[]string{"nft", "--version"}, "nftables v"},
		{[]string{"conntrack", "--version"}, "conntrack v"},
	} {
		got, err := c.run(ctx, nil, proxy, tc.args...)
		if err != nil || !strings.Contains(got, tc.want) {
			t.Errorf("%v: %q, %v; want %q", tc.args, got, err, tc.want)
			continue
		}
		t.Logf("%v: %s", tc.args, strings.TrimSpace(got))
	}

	// Rules as kube-proxy writes them, in a network namespace of the test's own (made inside
	// containerd's mount namespace, so it goes away with it): extensions are dlopen'd, the
	// libraries of both backends load, and nft talks to the kernel.
	netns := filepath.Join(c.dir, "netns")
	if err := os.WriteFile(netns, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("nsenter", fmt.Sprintf("--mount=/proc/%d/ns/mnt", c.cmd.Process.Pid), "--",
		"unshare", "--net="+netns, "true").CombinedOutput(); err != nil {
		t.Fatalf("making a netns: %v\n%s", err, out)
	}
	inNetns := []string{"--privileged", "--with-ns", "network:" + netns}
	for _, step := range [][]string{
		{"iptables", "-t", "nat", "-N", "KUBE-SERVICES"},
		{"iptables", "-t", "nat", "-A", "KUBE-SERVICES", "-d", "10.96.0.1/32", "-p", "tcp", "-m", "comment",
			"--comment", "default/kubernetes:https", "-m", "tcp", "--dport", "443", "-j", "MARK", "--set-xmark", "0x4000/0x4000"},
		{"ip6tables", "-t", "filter", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"},
		{"iptables-legacy", "-t", "filter", "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"},
		{"nft", "add", "table", "ip", "kube-proxy"},
		{"nft", "add", "chain", "ip", "kube-proxy", "services"},
		{"conntrack", "-L"},
	} {
		if _, err := c.run(ctx, inNetns, proxy, step...); err != nil {
			t.Errorf("%v: %v", step, err)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"iptables-save", "-t", "nat"}, `--comment "default/kubernetes:https"`},
		{[]string{"ip6tables-save"}, "--ctstate INVALID -j DROP"},
		{[]string{"iptables-legacy-save"}, "-A FORWARD -m conntrack --ctstate INVALID -j DROP"},
		{[]string{"nft", "list", "table", "ip", "kube-proxy"}, "chain services"},
	} {
		got, err := c.run(ctx, inNetns, proxy, tc.args...)
		if err != nil || !strings.Contains(got, tc.want) {
			t.Errorf("%v: %q, %v; want %q", tc.args, got, err, tc.want)
		}
	}

	// The pause image runs until SIGTERM, then exits 0 (ctr run returns the task's status).
	pauseRef := Registry + "/pause:" + PauseTag
	cmd := c.ctrCmd(ctx, "run", "--rm", "--cgroup", "/"+c.cgroup+"/pause", pauseRef, "pause")
	var pauseOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &pauseOut, &pauseOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		tasks, _ := c.ctr(ctx, "tasks", "ls")
		if strings.Contains(tasks, "RUNNING") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pause did not start: %s", pauseOut.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := c.ctr(ctx, "tasks", "kill", "-s", "SIGTERM", "pause"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-waited:
		if err != nil {
			t.Errorf("pause after SIGTERM: %v\n%s", err, pauseOut.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("pause ignored SIGTERM: %s", pauseOut.String())
	}
}

// TestIntegrationPauseReaps runs pause as PID 1 of a new PID namespace, orphans a process into
// it, and checks that no zombie is left once that process exits.
func TestIntegrationPauseReaps(t *testing.T) {
	needRoot(t, "nsenter", "sh", "sleep")
	pause := buildTestPause(t)
	cmd := exec.Command(pause)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		<-waited
	}()

	// sh starts sleep in the background and exits: sleep is reparented to pause.
	out, err := exec.Command("nsenter", "--target", strconv.Itoa(pid), "--pid", "--",
		"sh", "-c", "sleep 1 </dev/null >/dev/null 2>&1 & exit 0").CombinedOutput()
	if err != nil {
		t.Fatalf("nsenter: %v\n%s", err, out)
	}
	time.Sleep(200 * time.Millisecond)
	if kids := children(pid); len(kids) == 0 {
		t.Fatal("the orphan was not reparented to pause")
	} else {
		t.Logf("children of pause: %v", kids)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		kids := children(pid)
		if len(kids) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("children left: %v (a Z is an unreaped zombie)", kids)
		}
		time.Sleep(100 * time.Millisecond)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-waited:
		waited <- err // for the deferred cleanup
		if err != nil {
			t.Errorf("pause (PID 1) after SIGTERM: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pause as PID 1 ignored SIGTERM")
	}
}

// children lists "PID:STATE" of the processes whose parent is pid.
func children(pid int) []string {
	var out []string
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, s := range stats {
		b, err := os.ReadFile(s)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) >= 2 && f[1] == strconv.Itoa(pid) {
			out = append(out, filepath.Base(filepath.Dir(s))+":"+f[0])
		}
	}
	return out
}
