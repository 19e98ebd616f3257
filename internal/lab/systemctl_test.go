package lab

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// systemctlEnv runs the systemctl stand-in against fake containerd, kubelet
// and ctr, with its state under a temporary root. No root needed.
type systemctlEnv struct {
	t    *testing.T
	root string
	bin  string
}

func newSystemctlEnv(t *testing.T) *systemctlEnv {
	t.Helper()
	if _, err := exec.LookPath("setsid"); err != nil {
		t.Skip("no setsid")
	}
	dir := t.TempDir()
	e := &systemctlEnv{t: t, root: filepath.Join(dir, "root"), bin: filepath.Join(dir, "bin")}
	fakes := map[string]string{
		"systemctl": string(systemctlScript),
		// The fakes record how they were started, then run until killed.
		"kubelet":    "#!/bin/sh\necho \"$*\" >\"$KPFREE_SYSTEMCTL_ROOT/kubelet.args\"\nexec sleep 1000\n",
		"containerd": "#!/bin/sh\ntouch \"$KPFREE_SYSTEMCTL_ROOT/containerd.up\"\nexec sleep 1000\n",
		"ctr":        "#!/bin/sh\n[ -e \"$KPFREE_SYSTEMCTL_ROOT/containerd.up\" ]\n",
	}
	for name, body := range fakes {
		if err := os.MkdirAll(e.bin, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(e.bin, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		e.run("stop", "kubelet", "containerd")
		// Whatever a failed test left running.
		for _, f := range []string{"kubelet.pid", "kubelet.main", "containerd.pid", "containerd.main"} {
			if pid := e.pid(f); pid > 0 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
	})
	return e
}

// run runs systemctl args and returns stdout and the exit code.
func (e *systemctlEnv) run(args ...string) (string, int) {
	e.t.Helper()
	cmd := exec.Command(filepath.Join(e.bin, "systemctl"), args...)
	path := e.bin + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	cmd.Env = []string{"PATH=" + path, "KPFREE_SYSTEMCTL_ROOT=" + e.root, "KPFREE_SYSTEMCTL_PATH=" + path,
		"KPFREE_SYSTEMCTL_RESTART_SEC=0.2"}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatal(err)
	}
	return stdout.String() + stderr.String(), code
}

func (e *systemctlEnv) write(rel, data string) {
	e.t.Helper()
	p := filepath.Join(e.root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

func (e *systemctlEnv) pid(file string) int {
	data, _ := os.ReadFile(filepath.Join(e.root, "run/kpfree-lab/units", file))
	pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
	return pid
}

// waitActive waits until unit's main process runs and returns its pid;
// other than 0, it must differ from old.
func (e *systemctlEnv) waitActive(unit string, old int) int {
	e.t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if out, code := e.run("is-active", unit); code == 0 && out == "active\n" {
			if pid := e.pid(unit + ".main"); pid != 0 && pid != old {
				return pid
			}
		}
	}
	out, _ := e.run("status", unit)
	e.t.Fatalf("%s not active (with a main pid other than %d):\n%s", unit, old, out)
	return 0
}

func TestSystemctlStandIn(t *testing.T) {
	e := newSystemctlEnv(t)
	expect := func(args string, wantOut string, wantCode int) string {
		t.Helper()
		out, code := e.run(strings.Fields(args)...)
		if code != wantCode || !strings.Contains(out, wantOut) {
			t.Errorf("systemctl %s: exit %d, want %d; output %q, want it to contain %q", args, code, wantCode, out, wantOut)
		}
		return out
	}
	// kubeadm's SystemdInitSystem: status (ServiceExists), is-enabled,
	// is-active, daemon-reload, start, restart, stop.
	expect("is-active kubelet", "inactive", 3)
	expect("is-enabled kubelet.service", "disabled", 1)
	expect("status nosuch", "could not be found", 4)
	if out := expect("status kubelet", "Loaded: loaded", 3); strings.Contains(out, "not-found") {
		t.Errorf("status kubelet says not-found: %s", out)
	}
	expect("daemon-reload", "", 0)
	expect("frobnicate kubelet", "Unknown command verb", 1)
	expect("start nosuch", "not found", 5)

	// 10-kubeadm.conf's command line, from kubeadm-flags.env and /etc/default/kubelet.
	e.write("var/lib/kubelet/kubeadm-flags.env", `KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock --node-ip=198.18.0.11"`+"\n")
	e.write("etc/default/kubelet", "KUBELET_EXTRA_ARGS=--v=2\n")
	expect("enable --now containerd kubelet", "", 0)
	expect("is-enabled kubelet", "enabled", 0)
	e.waitActive("containerd", 0)
	kubelet := e.waitActive("kubelet", 0)
	args, _ := os.ReadFile(filepath.Join(e.root, "kubelet.args"))
	want := "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf " +
		"--config=/var/lib/kubelet/config.yaml --container-runtime-endpoint=unix:///var/run/containerd/containerd.sock " +
		"--node-ip=198.18.0.11 --v=2\n"
	if string(args) != want {
		t.Errorf("kubelet started with\n%q, want\n%q", args, want)
	}
	expect("start kubelet", "", 0) // already running: a no-op
	if pid := e.pid("kubelet.main"); pid != kubelet {
		t.Errorf("start of a running kubelet restarted it: %d -> %d", kubelet, pid)
	}
	out := expect("status kubelet", "Active: active (running)", 0)
	if !strings.Contains(out, "Main PID: "+strconv.Itoa(kubelet)) {
		t.Errorf("status lacks the main pid %d:\n%s", kubelet, out)
	}

	// Restart=always: a kubelet that dies comes back.
	if err := syscall.Kill(kubelet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	kubelet = e.waitActive("kubelet", kubelet)
	log, _ := os.ReadFile(filepath.Join(e.root, "var/log/kpfree-lab/kubelet.log"))
	if !strings.Contains(string(log), "restarting in 0.2s") {
		t.Errorf("kubelet.log:\n%s", log)
	}

	expect("restart kubelet", "", 0)
	kubelet = e.waitActive("kubelet", kubelet)

	// Stop: the units' processes are gone, the supervisors too.
	containerd := e.pid("containerd.main")
	sup := e.pid("kubelet.pid")
	expect("stop kubelet containerd", "", 0)
	expect("is-active kubelet", "inactive", 3)
	expect("is-active containerd", "inactive", 3)
	for _, pid := range []int{kubelet, containerd, sup} {
		if alive(pid) {
			t.Errorf("process %d still runs after stop", pid)
		}
	}
	expect("disable kubelet", "", 0)
	expect("is-enabled kubelet", "disabled", 1)
}
