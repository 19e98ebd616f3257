package nodeport

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/kpfree/kpfree/test/kubeenv"
	"github.com/kpfree/kpfree/test/kubeproxy"
	labtest "github.com/kpfree/kpfree/test/lab"
)

func TestMain(m *testing.M) {
	RunHelper() // exits when this binary was started as a helper
	os.Exit(m.Run())
}

// Addresses outside every lab network, routed by the client via node A.
var (
	externalIP  = netip.MustParseAddr("203.0.113.10")
	lbIP        = netip.MustParseAddr("203.0.113.20")
	lbRangedIP  = netip.MustParseAddr("203.0.113.30")
	externalNet = netip.MustParsePrefix("203.0.113.0/24")
)

// settle bounds how long a change may take to reach the datapath.
const settle = 10 * time.Second

// TestIntegrationNodePort runs the real kpfree-agent on nodes A and B of a
// three-host lab (client, A, B) against a real API server and checks the
// datapath for traffic entering a node: NodePort with SNAT to a remote pod,
// externalTrafficPolicy Local and its health check, ExternalIPs and
// LoadBalancer IPs, loadBalancerSourceRanges, ClientIP affinity, hairpin
// and Maglev's same choice on every node.
func TestIntegrationNodePort(t *testing.T) {
	labtest.Skip(t)
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := kubeenv.Binary(b); err != nil {
			t.Skipf("integration test: %v", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	agentBin := agentBinary(t)

	s := labtest.New(t, 3)
	cp, err := kubeenv.Start(ctx, kubeenv.Options{Dir: filepath.Join(t.TempDir(), "cp"), BindAddress: s.Gateway.String()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)
	client, err := kubeproxy.NewClient(cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Setup(ctx, s, cp, client, Options{AgentBin: agentBin, LogDir: t.TempDir(), Logf: t.Logf})
	if c != nil {
		t.Cleanup(func() {
			if err := c.Close(context.Background()); err != nil {
				t.Errorf("close: %v", err)
			}
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Exec(ctx, ClientNode, "ip", "route", "replace", externalNet.String(), "via", s.Node(NodeA).Address.String()); err != nil {
		t.Fatal(err)
	}
	e := &env{c: c, ctx: ctx}
	nodeA, nodeB := s.Node(NodeA).Address, s.Node(NodeB).Address

	t.Run("Agent", func(t *testing.T) {
		out, err := c.AgentCLI(ctx, NodeA, "status", "-o", "json")
		if err != nil {
			t.Fatal(err)
		}
		var st map[string]any
		if err := json.Unmarshal(out, &st); err != nil {
			t.Fatalf("status -o json: %v\n%s", err, out)
		}
		if _, ok := st["devices"]; !ok || !strings.Contains(string(out), `"eth0"`) {
			t.Errorf("kpfree-agent status on %s lists no device eth0 (the device holding the InternalIP %s, auto-selected): want a \"devices\" entry naming eth0; got:\n%s",
				NodeA, nodeA, out)
		}
		got, err := s.Exec(ctx, NodeA, "cat", "/proc/sys/net/ipv4/ip_local_reserved_ports")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(got), "30000-32767") {
			t.Errorf("%s: ip_local_reserved_ports = %q; want the NodePort range 30000-32767 reserved by the agent (--nodeport-range)", NodeA, strings.TrimSpace(string(got)))
		}
	})

	both, err := c.CreateService(ctx, ServiceSpec{Name: "np", Type: corev1.ServiceTypeNodePort, Backends: []*Pod{c.PodA, c.PodB}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Service np: ClusterIP %s, NodePort %d/TCP %d/UDP -> pod-a %s (on A), pod-b %s (on B)", both.ClusterIP, both.NodePortTCP, both.NodePortUDP, c.PodA.Addr, c.PodB.Addr)

	t.Run("NodePort", func(t *testing.T) {
		for _, proto := range []string{"tcp", "udp"} {
			t.Run(proto, func(t *testing.T) { testNodePort(t, e, proto, both) })
		}
	})

	t.Run("ExternalTrafficPolicyLocal", func(t *testing.T) {
		loc, err := c.CreateService(ctx, ServiceSpec{Name: "local", Type: corev1.ServiceTypeLoadBalancer, Local: true, Backends: []*Pod{c.PodA}})
		if err != nil {
			t.Fatal(err)
		}
		if loc.HealthCheckNP == 0 {
			t.Fatalf("Service local: the API server allocated no healthCheckNodePort")
		}
		toA := netip.AddrPortFrom(nodeA, loc.NodePortTCP)
		e.waitAnswer(t, NodeA, ProbeRequest{Proto: "tcp", Addr: toA}, "pod-a")
		rs := e.probe(t, nil, ProbeRequest{Proto: "tcp", Addr: toA, Count: 10})
		for _, r := range rs {
			if r.Err != "" || r.Name != "pod-a" || r.SeenAddr() != c.ClientAddr {
				t.Errorf("eTP Local %s: got %+v; want pod-a (A's only local pod) seeing the client's real address %s", toA, r, c.ClientAddr)
			}
		}
		toB := netip.AddrPortFrom(nodeB, loc.NodePortTCP)
		for _, r := range e.probe(t, nil, ProbeRequest{Proto: "tcp", Addr: toB, Count: 3, Timeout: time.Second}) {
			if r.Err == "" {
				t.Errorf("eTP Local %s: node B has no local endpoint but %s answered (seen %s); want a drop or refusal", toB, r.Name, r.Seen)
			}
		}
		for _, hc := range []struct {
			addr netip.Addr
			node string
			code int
			want int
		}{{nodeA, NodeA, http.StatusOK, 1}, {nodeB, NodeB, http.StatusServiceUnavailable, 0}} {
			url := fmt.Sprintf("http://%s/", netip.AddrPortFrom(hc.addr, loc.HealthCheckNP))
			var code int
			var body string
			deadline := time.Now().Add(settle)
			for {
				code, body, err = HTTPGet(ctx, url)
				if err == nil && code == hc.code || time.Now().After(deadline) {
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
			if err != nil || code != hc.code {
				t.Errorf("healthCheckNodePort on %s (%s): %d %q, %v; want %d", hc.node, url, code, body, err, hc.code)
				continue
			}
			var h struct {
				LocalEndpoints *int `json:"localEndpoints"`
			}
			if hc.code == http.StatusOK {
				if err := json.Unmarshal([]byte(body), &h); err != nil || h.LocalEndpoints == nil || *h.LocalEndpoints != hc.want {
					t.Errorf("healthCheckNodePort on %s: body %q; want JSON with localEndpoints %d", hc.node, body, hc.want)
				}
			}
			t.Logf("healthCheckNodePort %s on %s: %d %s", url, hc.node, code, strings.TrimSpace(body))
		}
	})

	t.Run("ExternalIPAndLoadBalancer", func(t *testing.T) {
		svc, err := c.CreateService(ctx, ServiceSpec{Name: "lb", Type: corev1.ServiceTypeLoadBalancer,
			ExternalIPs: []netip.Addr{externalIP}, LoadBalancerIP: lbIP, Backends: []*Pod{c.PodA, c.PodB}})
		if err != nil {
			t.Fatal(err)
		}
		if ing := svc.Object.Status.LoadBalancer.Ingress; len(ing) != 1 || ing[0].IP != lbIP.String() {
			t.Fatalf("Service lb status: %+v; want ingress %s", ing, lbIP)
		}
		for _, ip := range []netip.Addr{externalIP, lbIP} {
			for _, proto := range []string{"tcp", "udp"} {
				to := netip.AddrPortFrom(ip, 80)
				e.waitAnswer(t, NodeA, ProbeRequest{Proto: proto, Addr: to}, "")
				rs := e.probe(t, nil, ProbeRequest{Proto: proto, Addr: to, Count: 10})
				if fails := failures(rs); len(fails) > 0 {
					t.Errorf("%s %s (client route via A): %d of %d failed: %s", proto, to, len(rs)-total(tally(rs)), len(rs), strings.Join(fails, "; "))
				}
				t.Logf("%s %s: %v", proto, to, tally(rs))
			}
		}
	})

	t.Run("SourceRanges", func(t *testing.T) {
		allowed := netip.PrefixFrom(c.ClientAddr2, 32)
		_, err := c.CreateService(ctx, ServiceSpec{Name: "ranged", Type: corev1.ServiceTypeLoadBalancer,
			LoadBalancerIP: lbRangedIP, SourceRanges: []netip.Prefix{allowed}, Backends: []*Pod{c.PodA, c.PodB}})
		if err != nil {
			t.Fatal(err)
		}
		to := netip.AddrPortFrom(lbRangedIP, 80)
		// The allowed source first: it proves the frontend is programmed.
		e.waitAnswer(t, NodeA, ProbeRequest{Proto: "tcp", Addr: to, Source: c.ClientAddr2}, "")
		for _, r := range e.probe(t, nil, ProbeRequest{Proto: "tcp", Addr: to, Source: c.ClientAddr2, Count: 5}) {
			if r.Err != "" {
				t.Errorf("%s from %s (inside loadBalancerSourceRanges %s): %s", to, c.ClientAddr2, allowed, r.Err)
			}
		}
		for _, r := range e.probe(t, nil, ProbeRequest{Proto: "tcp", Addr: to, Source: c.ClientAddr, Count: 3, Timeout: time.Second}) {
			if r.Err == "" {
				t.Errorf("%s from %s (outside loadBalancerSourceRanges %s) answered by %s; want it blocked", to, c.ClientAddr, allowed, r.Name)
			}
		}
	})

	t.Run("SessionAffinity", func(t *testing.T) {
		aff, err := c.CreateService(ctx, ServiceSpec{Name: "sticky", Type: corev1.ServiceTypeNodePort, Affinity: true, Backends: []*Pod{c.PodA, c.PodB}})
		if err != nil {
			t.Fatal(err)
		}
		to := netip.AddrPortFrom(nodeA, aff.NodePortTCP)
		e.waitAnswer(t, NodeA, ProbeRequest{Proto: "tcp", Addr: to}, "")
		rs := e.probe(t, nil, ProbeRequest{Proto: "tcp", Addr: to, Count: 20})
		names := tally(rs)
		if fails := failures(rs); len(fails) > 0 || len(names) != 1 {
			t.Errorf("ClientIP affinity %s: 20 connections from %s reached %v (failures: %v); want one pod every time", to, c.ClientAddr, names, fails)
		}
		t.Logf("ClientIP affinity %s: %v", to, names)
	})

	t.Run("Hairpin", func(t *testing.T) {
		hp, err := c.CreateService(ctx, ServiceSpec{Name: "hairpin", Type: corev1.ServiceTypeNodePort, Backends: []*Pod{c.PodA}})
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			what, proto string
			to          netip.AddrPort
		}{
			{"ClusterIP", "tcp", netip.AddrPortFrom(hp.ClusterIP, 80)},
			{"ClusterIP", "udp", netip.AddrPortFrom(hp.ClusterIP, 80)},
			{"NodePort", "tcp", netip.AddrPortFrom(nodeA, hp.NodePortTCP)},
		} {
			t.Run(tc.what+"/"+tc.proto, func(t *testing.T) {
				r := e.waitAnswerFrom(t, c.PodA, ProbeRequest{Proto: tc.proto, Addr: tc.to}, "pod-a")
				if r.Err != "" || r.Name != "pod-a" {
					t.Fatalf("hairpin: pod-a -> its own Service %s %s %s: %+v; want pod-a itself", tc.what, tc.proto, tc.to, r)
				}
				t.Logf("hairpin: pod-a -> %s %s %s answered by %s (seen %s)", tc.what, tc.proto, tc.to, r.Name, r.Seen)
			})
		}
	})

	// Last: it restarts the agents with another algorithm.
	t.Run("Maglev", func(t *testing.T) {
		defer func() {
			if t.Failed() { // leave random agents behind for Close
				for _, n := range []string{NodeA, NodeB} {
					if _, err := c.StartAgent(ctx, n, ""); err != nil {
						t.Logf("restart %s with the default algorithm: %v", n, err)
					}
				}
			}
		}()
		for _, n := range []string{NodeA, NodeB} {
			if _, err := c.StartAgent(ctx, n, "maglev"); err != nil {
				t.Fatalf("--lb-algorithm maglev: %v", err)
			}
		}
		toA, toB := netip.AddrPortFrom(nodeA, both.NodePortTCP), netip.AddrPortFrom(nodeB, both.NodePortTCP)
		e.waitAnswer(t, NodeA, ProbeRequest{Proto: "tcp", Addr: toA}, "")
		e.waitAnswer(t, NodeB, ProbeRequest{Proto: "tcp", Addr: toB}, "")
		seen := map[string]int{}
		for sport := uint16(40001); sport <= 40016; sport++ {
			ra := e.probe(t, nil, ProbeRequest{Proto: "tcp", Addr: toA, SourcePort: sport, Count: 1})[0]
			rb := e.probe(t, nil, ProbeRequest{Proto: "tcp", Addr: toB, SourcePort: sport, Count: 1})[0]
			if ra.Err != "" || rb.Err != "" || ra.Name != rb.Name {
				t.Errorf("Maglev: client %s:%d -> A %s: %s%s, -> B %s: %s%s; want the same backend from both nodes",
					c.ClientAddr, sport, toA, ra.Name, ra.Err, toB, rb.Name, rb.Err)
			}
			seen[ra.Name]++
		}
		if seen["pod-a"] == 0 || seen["pod-b"] == 0 {
			t.Errorf("Maglev: 16 client ports all went to %v; want both backends used", seen)
		}
		t.Logf("Maglev: 16 client ports, same choice on A and B: %v", seen)
	})
}

// env bundles what the subtests' probes need.
type env struct {
	c   *Cluster
	ctx context.Context
}

// probe runs req from the client (from == nil) or from a pod.
func (e *env) probe(t *testing.T, from *Pod, req ProbeRequest) []Reply {
	t.Helper()
	var rs []Reply
	var err error
	if from == nil {
		rs, err = e.c.Probe(e.ctx, req)
	} else {
		rs, err = e.c.ProbeFromPod(e.ctx, from, req)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) == 0 {
		t.Fatalf("probe %s %s: no attempt made", req.Proto, req.Addr)
	}
	return rs
}

// waitAnswer retries one request from the client until it is answered
// (by want, when set) or settle passes, and then fails t with what was
// seen, the frontends node's agent has programmed and its log tail.
func (e *env) waitAnswer(t *testing.T, node string, req ProbeRequest, want string) Reply {
	t.Helper()
	return e.wait(t, nil, node, req, want)
}

// waitAnswerFrom is waitAnswer from inside pod p.
func (e *env) waitAnswerFrom(t *testing.T, p *Pod, req ProbeRequest, want string) Reply {
	t.Helper()
	return e.wait(t, p, p.Node, req, want)
}

func (e *env) wait(t *testing.T, from *Pod, node string, req ProbeRequest, want string) Reply {
	t.Helper()
	req.Count, req.Timeout = 1, time.Second
	deadline := time.Now().Add(settle)
	var last Reply
	errs := map[string]int{}
	for {
		last = e.probe(t, from, req)[0]
		if last.Err == "" && (want == "" || last.Name == want) {
			return last
		}
		if last.Err != "" {
			errs[last.Err]++
		} else {
			errs["answered by "+last.Name]++
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	src := "the client " + e.c.ClientAddr.String()
	if req.Source.IsValid() {
		src = "the client " + req.Source.String()
	}
	if from != nil {
		src = from.Name
	}
	services, _ := e.c.AgentCLI(e.ctx, node, "services")
	t.Fatalf("%s %s from %s: no good answer within %s (want %q); attempts: %v\n"+
		"the agent on %s must serve this frontend; its programmed services:\n%s\nagent log tail:\n%s",
		req.Proto, req.Addr, src, settle, want, errs, node, services, e.c.Agents[node].LogTail(15))
	return last
}

func tally(rs []Reply) map[string]int {
	m := map[string]int{}
	for _, r := range rs {
		if r.Err == "" {
			m[r.Name]++
		}
	}
	return m
}

func total(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// failures lists the distinct errors of rs.
func failures(rs []Reply) []string {
	var out []string
	for _, r := range rs {
		if r.Err != "" && !slices.Contains(out, r.Err) {
			out = append(out, r.Err)
		}
	}
	return out
}

// agentBinary is $KPFREE_AGENT_BIN, else a fresh build of cmd/kpfree-agent.
func agentBinary(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("KPFREE_AGENT_BIN"); p != "" {
		return p
	}
	out := filepath.Join(t.TempDir(), "kpfree-agent")
	cmd := exec.Command("go", "build", "-o", out, "github.com/kpfree/kpfree/cmd/kpfree-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build kpfree-agent: %v\n%s", err, b)
	}
	return out
}

// testNodePort: 30 requests from the client to node A's NodePort reach
// both pods; pod-b (on B) sees node A (SNAT), pod-a (local) the client.
func testNodePort(t *testing.T, e *env, proto string, svc *Service) {
	c := e.c
	nodeA := c.Lab.Node(NodeA).Address
	port := svc.NodePortTCP
	if proto == "udp" {
		port = svc.NodePortUDP
	}
	to := netip.AddrPortFrom(nodeA, port)
	e.waitAnswer(t, NodeA, ProbeRequest{Proto: proto, Addr: to}, "")
	rs := e.probe(t, nil, ProbeRequest{Proto: proto, Addr: to, Count: 30})
	names := tally(rs)
	if fails := failures(rs); len(fails) > 0 {
		t.Errorf("%s %s from the client: %d of %d requests failed: %s", proto, to, len(rs)-total(names), len(rs), strings.Join(fails, "; "))
	}
	if names["pod-a"] == 0 || names["pod-b"] == 0 {
		t.Errorf("%s %s: 30 requests reached %v; want both pod-a (on A) and pod-b (on B)", proto, to, names)
	}
	for _, r := range rs {
		switch r.Name {
		case "pod-b":
			if r.SeenAddr() != nodeA {
				t.Errorf("%s %s -> pod-b on B saw client %s; want node A's %s (SNAT at A's egress)", proto, to, r.Seen, nodeA)
			}
		case "pod-a":
			if r.SeenAddr() != c.ClientAddr {
				t.Errorf("%s %s -> pod-a on A saw client %s; want the client's %s (a local backend is not SNATed)", proto, to, r.Seen, c.ClientAddr)
			}
		}
	}
	t.Logf("%s %s: %v", proto, to, names)
}
