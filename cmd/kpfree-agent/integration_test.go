//go:build linux

package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kpfree/kpfree/bpf"
	"github.com/kpfree/kpfree/test/kubeenv"
)

// agentBinary is $KPFREE_AGENT_BIN, else a fresh build of this command.
func agentBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("KPFREE_AGENT_BIN"); p != "" {
		return p
	}
	out := filepath.Join(t.TempDir(), "kpfree-agent")
	cmd := exec.Command("go", "build", "-o", out, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return out
}

// The real binary: run (mounting its own bpffs, attaching to a child cgroup,
// reading the API server through a kubeconfig), readyz, services and
// status while it runs, SIGTERM (programs stay attached, maps pinned), and a
// second run that takes the pins over.
func TestIntegrationAgentBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root (BPF, cgroup2, bpffs mount)")
	}
	root, err := hostCgroup2Root()
	if err != nil {
		t.Skip(err)
	}
	bin := agentBinary(t)

	cp := kubeenv.StartForTest(t, kubeenv.Options{})
	cfg, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs := kubernetes.NewForConfigOrDie(cfg)

	// A child cgroup and an empty directory for the agent's own bpffs.
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	cgroup := filepath.Join(root, "kpfree-agent-cmd-"+hex.EncodeToString(rnd[:]))
	if err := os.Mkdir(cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(cgroup) })
	bpffs := filepath.Join(t.TempDir(), "bpf")
	t.Cleanup(func() {
		if err := bpf.Uninstall(bpffs, cgroup); err != nil {
			t.Errorf("uninstall: %v", err)
		}
		_ = unix.Unmount(bpffs, unix.MNT_DETACH)
	})
	port := freePort(t)
	health := "127.0.0.1:" + strconv.Itoa(port)
	common := []string{"--bpffs", bpffs, "--cgroup-root", cgroup}

	start := func() (*exec.Cmd, *strings.Builder) {
		args := append([]string{"run", "--kubeconfig", cp.Kubeconfig, "--k8s-api-server", cp.URL,
			"--node-name", "n1", "--health-addr", health, "--nodeport=false"}, common...) // root netns: no tc, no sysctl
		cmd := exec.Command(bin, args...)
		var logs strings.Builder
		cmd.Stdout, cmd.Stderr = &logs, &logs
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if cmd.ProcessState == nil {
				_ = cmd.Process.Kill()
				_ = cmd.Wait()
			}
		})
		deadline := time.Now().Add(30 * time.Second)
		for {
			resp, err := http.Get("http://" + health + "/readyz")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					return cmd, &logs
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("agent not ready after 30 s:\n%s", logs.String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	stop := func(cmd *exec.Cmd, logs *strings.Builder) {
		t0 := time.Now()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("agent exit after SIGTERM: %v\n%s", err, logs.String())
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("agent did not stop within 10 s of SIGTERM:\n%s", logs.String())
		}
		t.Logf("stopped %s after SIGTERM", time.Since(t0).Round(time.Millisecond))
	}
	cli := func(args ...string) []byte {
		t.Helper()
		out, err := exec.Command(bin, args...).Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				t.Fatalf("%v: %v\n%s", args, err, ee.Stderr)
			}
			t.Fatal(err)
		}
		return out
	}
	services := func() []serviceJSON {
		var s []serviceJSON
		if err := json.Unmarshal(cli("services", "-o", "json", "--bpffs", bpffs), &s); err != nil {
			t.Fatal(err)
		}
		return s
	}
	status := func() agentStatus {
		var st agentStatus
		if err := json.Unmarshal(cli(append([]string{"status", "-o", "json", "--health-addr", health}, common...)...), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	find := func(ss []serviceJSON, fe string) *serviceJSON {
		for i := range ss {
			if ss[i].Frontend == fe {
				return &ss[i]
			}
		}
		return nil
	}

	agent1, logs1 := start()
	if !isBPFFS(bpffs) {
		t.Fatal("run did not mount a bpffs at --bpffs")
	}

	ctx := context.Background()
	_, err = cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.96.100.30", Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)},
			{Name: "dns", Port: 53, TargetPort: intstr.FromInt32(53), Protocol: corev1.ProtocolUDP},
		}, SessionAffinity: corev1.ServiceAffinityClientIP},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	http8080, dns53, udp := int32(8080), int32(53), corev1.ProtocolUDP
	httpName, dnsName := "http", "dns"
	_, err = cs.DiscoveryV1().EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &httpName, Port: &http8080}, {Name: &dnsName, Port: &dns53, Protocol: &udp}},
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.244.1.2"}}, {Addresses: []string{"10.244.1.1"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var got []serviceJSON
	deadline := time.Now().Add(5 * time.Second)
	for {
		got = services()
		if s := find(got, "10.96.100.30:53/UDP"); s != nil && len(s.Backends) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("services: %+v\n%s", got, logs1.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	web := find(got, "10.96.100.30:80/TCP")
	if web == nil || strings.Join(web.Backends, " ") != "10.244.1.1:8080 10.244.1.2:8080" || web.AffinitySeconds != 10800 {
		t.Fatalf("services -o json: %+v", got)
	}
	table := string(cli("services", "--bpffs", bpffs))
	t.Logf("kpfree-agent services:\n%s", table)
	if !strings.Contains(table, "10.96.100.30:80/TCP") || !strings.Contains(table, "10800s") {
		t.Fatalf("services table:\n%s", table)
	}

	st := status()
	if st.AttachMode != string(bpf.AttachLink) || st.CgroupRoot != cgroup || !strings.HasPrefix(st.Agent, "ready") ||
		st.Services < 3 || len(st.Kernel) == 0 {
		t.Fatalf("status: %+v", st)
	}
	for _, p := range st.Programs {
		if !p.Attached {
			t.Fatalf("status: %s not attached: %+v", p.Name, p)
		}
	}
	t.Logf("kpfree-agent status:\n%s", cli(append([]string{"status", "--health-addr", health}, common...)...))

	// SIGTERM: exits 0, programs stay attached, maps stay pinned.
	stop(agent1, logs1)
	st = status()
	if st.AttachMode != string(bpf.AttachLink) || !strings.HasPrefix(st.Agent, "not reachable") {
		t.Fatalf("status after stop: %+v", st)
	}
	for _, p := range st.Programs {
		if !p.Attached {
			t.Fatalf("after stop: %s detached", p.Name)
		}
	}
	if s := find(services(), "10.96.100.30:80/TCP"); s == nil || len(s.Backends) != 2 {
		t.Fatalf("maps after stop: %+v", services())
	}

	// A second run takes over the pins.
	agent2, logs2 := start()
	if !strings.Contains(logs2.String(), "restored from pinned maps") {
		t.Errorf("second run did not restore:\n%s", logs2.String())
	}
	if s := find(services(), "10.96.100.30:80/TCP"); s == nil || len(s.Backends) != 2 || s.RevNatID != web.RevNatID {
		t.Fatalf("after restart: %+v (rev-nat id was %d)", services(), web.RevNatID)
	}
	// The agent's own metrics.
	resp, err := http.Get("http://" + health + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	var body strings.Builder
	_, _ = fmt.Fprint(&body, readAll(resp))
	for _, m := range []string{"kpfree_services 3", "kpfree_sync_duration_seconds_count", "kpfree_map_full_total 0"} {
		if !strings.Contains(body.String(), m) {
			t.Errorf("/metrics lacks %q", m)
		}
	}
	stop(agent2, logs2)
	t.Logf("second run's log:\n%s", logs2.String())
}

func readAll(resp *http.Response) string {
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 32<<10)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			return b.String()
		}
	}
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
