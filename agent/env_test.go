//go:build linux

package agent_test

// Harness of the integration tier: a real etcd + kube-apiserver
// (test/kubeenv), and for the datapath tests a private bpffs, a child cgroup2
// directory and a network namespace with only loopback (holding the backend
// addresses), with client processes (this test binary re-executed) moved
// into the cgroup before they open a socket, as in bpf/env_test.go.

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kpfree/kpfree/test/kubeenv"
)

const envClient = "KPFREE_AGENT_TEST_CLIENT"

func TestMain(m *testing.M) {
	if req := os.Getenv(envClient); req != "" {
		os.Exit(clientMain(req))
	}
	os.Exit(m.Run())
}

func requireIntegration(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
}

// startAPIServer starts etcd + kube-apiserver and returns an admin client.
func startAPIServer(t *testing.T) (*kubeenv.ControlPlane, kubernetes.Interface) {
	t.Helper()
	t0 := time.Now()
	cp := kubeenv.StartForTest(t, kubeenv.Options{})
	t.Logf("kube-apiserver %s ready after %s", cp.URL, time.Since(t0).Round(time.Millisecond))
	cfg, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg.QPS, cfg.Burst = 100, 200
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return cp, cs
}

// ---- datapath environment (root) ----

type dpEnv struct {
	t      *testing.T
	pinDir string
	cgroup string
	netns  *os.File
}

func newDatapathEnv(t *testing.T) *dpEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root (BPF, cgroup2, bpffs mount, netns)")
	}
	root, err := cgroup2Root()
	if err != nil {
		t.Skipf("integration test: %v", err)
	}
	e := &dpEnv{t: t, pinDir: t.TempDir()}
	if err := unix.Mount("bpf", e.pinDir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(e.pinDir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs: %v", err)
		}
	})
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	e.cgroup = filepath.Join(root, "kpfree-agent-test-"+hex.EncodeToString(rnd[:]))
	if err := os.Mkdir(e.cgroup, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		var err error
		for range 50 {
			if err = os.Remove(e.cgroup); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", e.cgroup, err)
	})
	e.netns, err = newNetns()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() { e.netns.Close() })
	return e
}

// cgroup2Root finds the cgroup2 mount (the unified hierarchy on hybrid hosts).
func cgroup2Root() (string, error) {
	data, err := os.ReadFile("/proc/mounts")
	if err != nil {
		return "", err
	}
	var found []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[2] == "cgroup2" {
			found = append(found, f[1])
		}
	}
	for _, p := range found {
		if p == "/sys/fs/cgroup/unified" || p == "/sys/fs/cgroup" {
			return p, nil
		}
	}
	if len(found) > 0 {
		return found[0], nil
	}
	return "", errors.New("no cgroup2 mount")
}

// inNetns runs fn on a thread moved into ns; the thread is never unlocked,
// so the runtime discards it afterwards.
func inNetns(ns *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func newNetns() (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	c := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			c <- result{err: err}
			return
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
		c <- result{f: f, err: err}
	}()
	r := <-c
	if r.err != nil {
		return nil, r.err
	}
	h, err := netlink.NewHandleAt(netns.NsHandle(int(r.f.Fd())))
	if err != nil {
		r.f.Close()
		return nil, err
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err == nil {
		err = h.LinkSetUp(lo)
	}
	if err != nil {
		r.f.Close()
		return nil, err
	}
	return r.f, nil
}

// addAddr puts an address on the netns's loopback (pod IPs stand-ins).
func (e *dpEnv) addAddr(a netip.Addr) {
	e.t.Helper()
	h, err := netlink.NewHandleAt(netns.NsHandle(int(e.netns.Fd())))
	if err != nil {
		e.t.Fatal(err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		e.t.Fatal(err)
	}
	addr, err := netlink.ParseAddr(netip.PrefixFrom(a, a.BitLen()).String())
	if err != nil {
		e.t.Fatal(err)
	}
	if err := h.AddrAdd(lo, addr); err != nil {
		e.t.Fatalf("add %s to lo: %v", a, err)
	}
}

// tcpServer listens in the netns and answers every connection with its name.
func (e *dpEnv) tcpServer(name string, addr netip.AddrPort) {
	e.t.Helper()
	var ln net.Listener
	if err := inNetns(e.netns, func() (err error) {
		ln, err = net.Listen("tcp", addr.String())
		return err
	}); err != nil {
		e.t.Fatalf("listen %s: %v", addr, err)
	}
	e.t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(name + "\n"))
			c.Close()
		}
	}()
}

// ---- clients ----

type clientReq struct {
	Addr    string
	N       int
	Timeout time.Duration
}

type attempt struct {
	Reply  string
	Errno  string
	Err    string
	Millis float64
}

// connect runs a client process inside the cgroup and the netns: N TCP
// connections to addr, each reading the backend's name.
func (e *dpEnv) connect(addr string, n int) []attempt {
	e.t.Helper()
	js, _ := json.Marshal(clientReq{Addr: addr, N: n, Timeout: 2 * time.Second})
	exe, err := os.Executable()
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), envClient+"="+string(js))
	cmd.ExtraFiles = []*os.File{e.netns} // fd 3
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		e.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	pid := strconv.Itoa(cmd.Process.Pid)
	if err := os.WriteFile(filepath.Join(e.cgroup, "cgroup.procs"), []byte(pid), 0o644); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		e.t.Fatalf("move client into cgroup: %v", err)
	}
	_, _ = stdin.Write([]byte{'g'})
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		e.t.Fatalf("client: %v\n%s", err, stderr.String())
	}
	var as []attempt
	if err := json.Unmarshal([]byte(stdout.String()), &as); err != nil {
		e.t.Fatalf("client output: %v\n%s\n%s", err, stdout.String(), stderr.String())
	}
	return as
}

func clientMain(js string) int {
	var req clientReq
	if err := json.Unmarshal([]byte(js), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if _, err := bufio.NewReader(os.Stdin).ReadByte(); err != nil { // in the cgroup by now
		fmt.Fprintln(os.Stderr, "no go signal:", err)
		return 2
	}
	runtime.LockOSThread()
	if err := unix.Setns(3, unix.CLONE_NEWNET); err != nil {
		fmt.Fprintln(os.Stderr, "setns:", err)
		return 2
	}
	var out []attempt
	for range req.N {
		var a attempt
		t0 := time.Now()
		c, err := net.DialTimeout("tcp", req.Addr, req.Timeout)
		if err == nil {
			_ = c.SetReadDeadline(time.Now().Add(req.Timeout))
			var line string
			line, err = bufio.NewReader(c).ReadString('\n')
			a.Reply = strings.TrimSpace(line)
			c.Close()
		}
		a.Millis = float64(time.Since(t0).Microseconds()) / 1000
		if err != nil {
			a.Err = err.Error()
			var errno syscall.Errno
			if errors.As(err, &errno) {
				a.Errno = unix.ErrnoName(errno)
			} else {
				a.Errno = "other"
			}
		}
		out = append(out, a)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		return 2
	}
	return 0
}

func replies(as []attempt) map[string]int {
	m := map[string]int{}
	for _, a := range as {
		if a.Errno == "" {
			m[a.Reply]++
		} else {
			m[a.Errno]++
		}
	}
	return m
}
