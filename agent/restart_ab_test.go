//go:build linux

package agent_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kpfree/kpfree/bpf"
)

// The real kpfree-agent binary restarted twice (SIGTERM, a gap with no agent,
// start again over the same pins) while ApacheBench, inside the agent's child
// cgroup and the backends' netns, sends 3000 requests through a ClusterIP to
// two local HTTP backends: every request must succeed.
func TestIntegrationAgentRestartUnderLoad(t *testing.T) {
	requireIntegration(t)
	abPath, err := exec.LookPath("ab")
	if err != nil {
		t.Skip("integration test: ab (apache2-utils) not installed")
	}
	if _, err := exec.LookPath("nsenter"); err != nil {
		t.Skip("integration test: nsenter not installed")
	}
	e := newDatapathEnv(t)
	cp, cs := startAPIServer(t)
	bin := restartAgentBinary(t)
	t.Cleanup(func() {
		if err := bpf.Uninstall(e.pinDir, e.cgroup); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	ctx := context.Background()

	// Two HTTP backends in the netns. Each answer takes 2 ms, so the 3000
	// requests (-c 2) last ~3 s, long enough for two restarts.
	podA, podB := netip.MustParseAddr("10.244.1.21"), netip.MustParseAddr("10.244.1.22")
	var hits [2]atomic.Int64
	for i, a := range []netip.Addr{podA, podB} {
		e.addAddr(a)
		var ln net.Listener
		if err := inNetns(e.netns, func() (err error) {
			ln, err = net.Listen("tcp", netip.AddrPortFrom(a, 8080).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			hits[i].Add(1)
			time.Sleep(2 * time.Millisecond)
			_, _ = io.WriteString(w, "ok\n")
		})}
		go func() { _ = srv.Serve(ln) }()
		t.Cleanup(func() { srv.Close() })
	}

	const vip = "10.96.100.40"
	must[*corev1.Service](t)(cs.CoreV1().Services(ns).Create(ctx, service("ab", vip, tcpPort("http", 80, 8080)), metav1.CreateOptions{}))
	must[*discoveryv1.EndpointSlice](t)(cs.DiscoveryV1().EndpointSlices(ns).Create(ctx, slice("ab-1", "ab", "http", 8080, podA.String(), podB.String()), metav1.CreateOptions{}))

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	health := l.Addr().String()
	l.Close()
	type run struct {
		cmd  *exec.Cmd
		logs *strings.Builder
		done chan error
	}
	start := func() *run {
		t.Helper()
		cmd := exec.Command(bin, "run", "--kubeconfig", cp.Kubeconfig, "--k8s-api-server", cp.URL, "--node-name", "node-a",
			"--cgroup-root", e.cgroup, "--bpffs", e.pinDir, "--health-addr", health,
			"--nodeport=false") // root netns: no tc programs on the host, no sysctl writes
		r := &run{cmd: cmd, logs: &strings.Builder{}, done: make(chan error, 1)}
		cmd.Stdout, cmd.Stderr = r.logs, r.logs
		t0 := time.Now()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { r.done <- cmd.Wait() }()
		t.Cleanup(func() {
			select {
			case err := <-r.done:
				r.done <- err
			default:
				_ = cmd.Process.Kill()
				<-r.done
			}
		})
		for {
			if resp, err := http.Get("http://" + health + "/readyz"); err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					t.Logf("agent pid %d ready after %s", cmd.Process.Pid, time.Since(t0).Round(time.Millisecond))
					return r
				}
			}
			if time.Since(t0) > 30*time.Second {
				t.Fatalf("agent not ready after 30 s:\n%s", r.logs.String())
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	stop := func(r *run) {
		t.Helper()
		t0 := time.Now()
		_ = r.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-r.done:
			r.done <- err
			if err != nil {
				t.Fatalf("agent exit after SIGTERM: %v\n%s", err, r.logs.String())
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("agent did not stop within 10 s of SIGTERM:\n%s", r.logs.String())
		}
		t.Logf("agent stopped %s after SIGTERM", time.Since(t0).Round(time.Millisecond))
	}

	ag := start()
	// The Service is in the maps before the load starts.
	waitUntil(t, 10*time.Second, func() bool {
		out, err := exec.Command(bin, "services", "--bpffs", e.pinDir).Output()
		return err == nil && strings.Contains(string(out), vip+":80/TCP") && strings.Contains(string(out), podB.String())
	})

	// ab inside the child cgroup (the shell moves itself before exec) and
	// the backends' netns (this process's netns fd).
	nsPath := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), e.netns.Fd())
	script := fmt.Sprintf(`echo $$ > %s && exec nsenter --net=%s %s -n 3000 -c 2 -s 10 http://%s:80/`,
		filepath.Join(e.cgroup, "cgroup.procs"), nsPath, abPath, vip)
	abCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	abCmd := exec.CommandContext(abCtx, "sh", "-c", script)
	var abOut strings.Builder
	abCmd.Stdout, abCmd.Stderr = &abOut, &abOut
	if err := abCmd.Start(); err != nil {
		t.Fatal(err)
	}
	abDone := make(chan error, 1)
	go func() { abDone <- abCmd.Wait() }()

	running := func(step string) {
		t.Helper()
		select {
		case err := <-abDone:
			abDone <- err
			t.Fatalf("ab finished before %s (the restarts were not under load): %v\n%s", step, err, abOut.String())
		default:
		}
	}
	time.Sleep(300 * time.Millisecond)
	for i := 1; i <= 2; i++ {
		running(fmt.Sprintf("restart %d", i))
		before := hits[0].Load() + hits[1].Load()
		stop(ag)
		time.Sleep(200 * time.Millisecond) // no agent at all: the pinned datapath serves
		ag = start()
		t.Logf("restart %d: %d requests served across it", i, hits[0].Load()+hits[1].Load()-before)
	}
	running("the end of the second restart")
	if err := <-abDone; err != nil {
		t.Fatalf("ab: %v\n%s", err, abOut.String())
	}
	out := abOut.String()
	t.Logf("ab:\n%s", out)
	t.Logf("backend hits: A %d, B %d", hits[0].Load(), hits[1].Load())
	if m := regexp.MustCompile(`Complete requests:\s+(\d+)`).FindStringSubmatch(out); m == nil || m[1] != "3000" {
		t.Errorf("ab: complete requests %v, want 3000", m)
	}
	if !regexp.MustCompile(`Failed requests:\s+0\n`).MatchString(out) {
		t.Errorf("ab reports failed requests")
	}
	if strings.Contains(out, "Non-2xx responses") {
		t.Errorf("ab reports Non-2xx responses")
	}
	if hits[0].Load() == 0 || hits[1].Load() == 0 {
		t.Errorf("backend hits A %d, B %d: want both", hits[0].Load(), hits[1].Load())
	}
	stop(ag)
	if !strings.Contains(ag.logs.String(), "restored from pinned maps") {
		t.Errorf("last run did not restore from the pins:\n%s", ag.logs.String())
	}
}

// restartAgentBinary is $KPFREE_AGENT_BIN, else a fresh build of cmd/kpfree-agent.
func restartAgentBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("KPFREE_AGENT_BIN"); p != "" {
		return p
	}
	out := filepath.Join(t.TempDir(), "kpfree-agent")
	cmd := exec.Command("go", "build", "-o", out, "../cmd/kpfree-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, b)
	}
	return out
}
