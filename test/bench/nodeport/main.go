// Command nodeport measures NodePort request latency against direct-to-pod
// across nodes, in one run, on the three-host harness of test/nodeport (a
// client, node A and node B lab nodes, the real kpfree-agent on A and B, the
// real API server):
//
//   - baseline: client -> pod-b (on B) directly, routed via B;
//   - NodePort: client -> node A's address:nodePort, DNAT to pod-b on B and
//     SNAT at A (the remote-backend path);
//
// each as N sequential TCP connect + request + reply + close round trips
// from the client node (the harness's probe helper, real sockets), rounds
// alternating, at 1 Service and again after -services ClusterIP Services
// with EndpointSlices have been created through the API server (real
// objects, the agent's own watch path). It reports p50/p99 of both and the
// NodePort/direct ratio, as JSON (-out) and one summary line. The agents run
// with --lb-map-max sized for -services (a Service with one endpoint takes 2
// entries), and the output says how many Services the agent had actually
// programmed.
//
// Run by `make bench` (test/bench/run.sh); needs root and make k8s-binaries.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/test/kubeenv"
	"github.com/kpfree/kpfree/test/kubeproxy"
	"github.com/kpfree/kpfree/test/nodeport"
)

type opts struct {
	out, agentBin     string
	services, workers int
	requests, rounds  int
	createBudget      time.Duration
	timeout           time.Duration
}

// Stats of one path in one cell, over all rounds.
type Stats struct {
	Requests int     `json:"requests"`
	Failed   int     `json:"failed"`
	P50Ms    float64 `json:"p50Ms"`
	P99Ms    float64 `json:"p99Ms"`
	MeanMs   float64 `json:"meanMs"`
}

// Cell is one Service count.
type Cell struct {
	// Services is how many Services exist in the API server; Programmed how
	// many frontends the agent on node A reports (status "services").
	Services      int     `json:"services"`
	Programmed    int     `json:"programmedFrontends"`
	MapFull       string  `json:"agentMapFullTotal,omitempty"`
	CreateSeconds float64 `json:"createSeconds,omitempty"`
	Direct        Stats   `json:"direct"`
	NodePort      Stats   `json:"nodePort"`
	RatioP50      float64 `json:"ratioP50"`
	RatioP99      float64 `json:"ratioP99"`
	Error         string  `json:"error,omitempty"`
}

// Result is the JSON output.
type Result struct {
	Method   string    `json:"method"`
	Path     string    `json:"path"`
	Requests int       `json:"requestsPerRound"`
	Rounds   int       `json:"rounds"`
	CPU      int       `json:"cpus"`
	Started  time.Time `json:"started"`
	Cells    []Cell    `json:"cells"`
	Summary  string    `json:"summary"`
}

func main() {
	nodeport.RunHelper() // exits when re-executed as a helper in a lab node
	// Children are started with Pdeathsig, which follows the forking thread.
	runtime.LockOSThread()
	var o opts
	flag.StringVar(&o.out, "out", "", "write the result as JSON here")
	flag.StringVar(&o.agentBin, "agent", "bin/kpfree-agent", "the kpfree-agent binary")
	flag.IntVar(&o.services, "services", 50000, "Services of the large cell (ClusterIP + EndpointSlice, created through the API server)")
	flag.IntVar(&o.workers, "workers", 16, "parallel creates")
	flag.IntVar(&o.requests, "requests", 2000, "round trips per path per round")
	flag.IntVar(&o.rounds, "rounds", 2, "alternating rounds (direct, NodePort) per cell")
	flag.DurationVar(&o.createBudget, "create-budget", 15*time.Minute, "bound on creating the large cell's Services; the cell is measured at the count reached")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Minute, "bound on the whole run")
	flag.Parse()
	r, err := run(o)
	if o.out != "" && r != nil {
		data, _ := json.MarshalIndent(r, "", "  ")
		if werr := os.WriteFile(o.out, append(data, '\n'), 0o644); werr != nil {
			err = errors.Join(err, werr)
		}
	}
	if r != nil {
		fmt.Println(r.Summary)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench nodeport:", err)
		os.Exit(1)
	}
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
}

func run(o opts) (*Result, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root (lab nodes, BPF)")
	}
	agentBin, err := filepath.Abs(o.agentBin)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(agentBin); err != nil {
		return nil, fmt.Errorf("%w: run make build first", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	dir, err := os.MkdirTemp("", "kpfree-bench-nodeport-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)

	lo := lab.Options{Nodes: 3, Dir: filepath.Join(dir, "lab"), Prefix: "kpbnp",
		Subnet: netip.MustParsePrefix("198.19.251.0/24"), Logf: logf}
	if left := lab.Leftovers(lo.Prefix); len(left) > 0 {
		return nil, fmt.Errorf("leftovers of an earlier run (remove them first): %s", strings.Join(left, ", "))
	}
	s, err := lab.Up(ctx, lo)
	defer func() {
		dctx, dcancel := context.WithTimeout(context.Background(), time.Minute)
		defer dcancel()
		if derr := lab.Down(dctx, lo.Dir); derr != nil {
			logf("lab down: %v", derr)
		}
		if left := lab.Leftovers(lo.Prefix); len(left) > 0 {
			logf("lab down left: %s", strings.Join(left, ", "))
		}
	}()
	if err != nil {
		return nil, fmt.Errorf("lab up: %w", err)
	}
	// BulkServices: -services 50,000, which the 1.34 ClusterIP allocator
	// creates in quadratic time (see kubeenv.Options.BulkServices).
	cp, err := kubeenv.Start(ctx, kubeenv.Options{Dir: filepath.Join(dir, "cp"), BindAddress: s.Gateway.String(), BulkServices: true})
	if err != nil {
		return nil, err
	}
	defer cp.Stop()
	client, err := kubeproxy.NewClient(cp.Kubeconfig)
	if err != nil {
		return nil, err
	}
	c, err := nodeport.Setup(ctx, s, cp, client, nodeport.Options{AgentBin: agentBin, LogDir: filepath.Join(dir, "logs"), Logf: logf,
		AgentArgs: []string{fmt.Sprintf("--lb-map-max=%d", lbMapMax(o.services))}})
	if c != nil {
		defer func() {
			if cerr := c.Close(context.Background()); cerr != nil {
				logf("close: %v", cerr)
			}
		}()
	}
	if err != nil {
		return nil, err
	}

	res := &Result{
		Method:   "real Services + EndpointSlices created through the API server; the agents follow them with their own watch",
		Path:     "client -> node A NodePort -> pod-b on node B (DNAT at A, SNAT to A) vs client -> pod-b directly",
		Requests: o.requests, Rounds: o.rounds, CPU: runtime.NumCPU(), Started: time.Now(),
	}
	svc, err := c.CreateService(ctx, nodeport.ServiceSpec{Name: "bench", Type: corev1.ServiceTypeNodePort, Backends: []*nodeport.Pod{c.PodB}})
	if err != nil {
		return res, err
	}
	nodeA := s.Node(nodeport.NodeA).Address
	direct := netip.AddrPortFrom(c.PodB.Addr, nodeport.EchoPort)
	viaNP := netip.AddrPortFrom(nodeA, svc.NodePortTCP)
	logf("bench Service: NodePort %s -> pod-b %s", viaNP, direct)

	var errs []error
	cellErr := func(cell *Cell, err error) {
		cell.Error = err.Error()
		errs = append(errs, err)
		logf("cell %d: %v", cell.Services, err)
	}
	measureCell := func(n int, createSec float64) {
		cell := Cell{Services: n, CreateSeconds: createSec}
		cell.Programmed, cell.MapFull = programmed(ctx, c)
		if err := waitServed(ctx, c, viaNP, 15*time.Second); err != nil {
			cellErr(&cell, err)
		}
		if err := measure(ctx, c, o, direct, viaNP, &cell); err != nil {
			cellErr(&cell, err)
		}
		res.Cells = append(res.Cells, cell)
		logf("cell %d Services (%d frontends programmed): direct p50 %.3f p99 %.3f ms, NodePort p50 %.3f p99 %.3f ms, ratio p50 %.2f",
			n, cell.Programmed, cell.Direct.P50Ms, cell.Direct.P99Ms, cell.NodePort.P50Ms, cell.NodePort.P99Ms, cell.RatioP50)
	}
	measureCell(1, 0)

	if o.services > 1 {
		t0 := time.Now()
		made, err := createMany(ctx, client, o.services-1, o.workers, o.createBudget, c.PodB)
		sec := time.Since(t0).Seconds()
		logf("created %d ClusterIP Services + EndpointSlices in %.0f s (%.0f objects/s)", made, sec, float64(2*made)/sec)
		if err != nil {
			errs = append(errs, err)
		}
		// Let the agent catch up: its frontend count stops growing.
		waitSettled(ctx, c, 2*time.Minute)
		// And the control plane settle (etcd compacts the bulk create's
		// history for a while): measure on a quiet machine.
		if waited, err := cp.WaitQuiet(ctx, 0.15, 5*time.Second, 3*time.Minute); err != nil {
			logf("measuring anyway: %v", err)
		} else {
			logf("control plane quiet after %.0f s", waited.Seconds())
		}
		measureCell(made+1, sec)
	}
	res.Summary = summary(res)
	return res, errors.Join(errs...)
}

// waitServed waits until the NodePort answers from the client.
func waitServed(ctx context.Context, c *nodeport.Cluster, to netip.AddrPort, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	var last string
	for time.Now().Before(deadline) {
		rs, err := c.Probe(ctx, nodeport.ProbeRequest{Proto: "tcp", Addr: to, Count: 1})
		if err != nil {
			return err
		}
		if rs[0].Err == "" && rs[0].Name == "pod-b" {
			return nil
		}
		last = rs[0].Err + rs[0].Name
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("NodePort %s not served by the agent on node A within %s (last: %s): NodePort latency not measured", to, limit, last)
}

// measure alternates rounds of direct and NodePort round trips.
func measure(ctx context.Context, c *nodeport.Cluster, o opts, direct, viaNP netip.AddrPort, cell *Cell) error {
	var d, n []time.Duration
	var errs []error
	served := cell.Error == ""
	// Warm-up, not counted.
	_, _ = c.Probe(ctx, nodeport.ProbeRequest{Proto: "tcp", Addr: direct, Count: 100})
	if served {
		_, _ = c.Probe(ctx, nodeport.ProbeRequest{Proto: "tcp", Addr: viaNP, Count: 100})
	}
	for range o.rounds {
		for _, p := range []struct {
			to  netip.AddrPort
			out *[]time.Duration
			st  *Stats
		}{{direct, &d, &cell.Direct}, {viaNP, &n, &cell.NodePort}} {
			if p.to == viaNP && !served {
				continue
			}
			rs, err := c.Probe(ctx, nodeport.ProbeRequest{Proto: "tcp", Addr: p.to, Count: o.requests,
				Timeout: 2 * time.Second, Budget: 3 * time.Minute})
			if err != nil {
				return err
			}
			for _, r := range rs {
				p.st.Requests++
				if r.Err != "" || r.Name != "pod-b" {
					p.st.Failed++
					continue
				}
				*p.out = append(*p.out, r.RTT)
			}
		}
	}
	cell.Direct.fill(d)
	cell.NodePort.fill(n)
	if cell.Direct.P50Ms > 0 && cell.NodePort.P50Ms > 0 {
		cell.RatioP50 = cell.NodePort.P50Ms / cell.Direct.P50Ms
		cell.RatioP99 = cell.NodePort.P99Ms / cell.Direct.P99Ms
	}
	if cell.Direct.Failed+cell.NodePort.Failed > 0 {
		errs = append(errs, fmt.Errorf("%d direct and %d NodePort requests failed", cell.Direct.Failed, cell.NodePort.Failed))
	}
	return errors.Join(errs...)
}

func (s *Stats) fill(ds []time.Duration) {
	if len(ds) == 0 {
		return
	}
	slices.Sort(ds)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	s.P50Ms = ms(ds[len(ds)*50/100])
	s.P99Ms = ms(ds[min(len(ds)-1, len(ds)*99/100)])
	s.MeanMs = ms(sum / time.Duration(len(ds)))
}

// programmed reads the frontend count of node A's agent (status -o json)
// and its kpfree_map_full_total metric.
func programmed(ctx context.Context, c *nodeport.Cluster) (int, string) {
	out, err := c.AgentCLI(ctx, nodeport.NodeA, "status", "-o", "json")
	var st struct {
		Services int `json:"services"`
	}
	if err == nil {
		_ = json.Unmarshal(out, &st)
	}
	a := c.Agents[nodeport.NodeA]
	_, body, _ := nodeport.HTTPGet(ctx, "http://"+netip.AddrPortFrom(a.Addr, nodeport.HealthPort).String()+"/metrics")
	full := ""
	for line := range strings.Lines(body) {
		if strings.HasPrefix(line, "kpfree_map_full_total") {
			full = strings.TrimSpace(strings.TrimPrefix(line, "kpfree_map_full_total"))
		}
	}
	return st.Services, full
}

// waitSettled waits until node A's agent reports the same frontend count
// twice, 2 s apart.
func waitSettled(ctx context.Context, c *nodeport.Cluster, limit time.Duration) {
	deadline := time.Now().Add(limit)
	last := -1
	for time.Now().Before(deadline) {
		n, _ := programmed(ctx, c)
		if n == last {
			return
		}
		last = n
		time.Sleep(2 * time.Second)
	}
}

// createMany creates n ClusterIP Services (80/TCP) with an EndpointSlice
// listing pod, n at most, within budget, and returns how many it made.
func createMany(ctx context.Context, cs kubernetes.Interface, n, workers int, budget time.Duration, pod *nodeport.Pod) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	var next, made atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1))
				if i > n || ctx.Err() != nil {
					return
				}
				if err := createOne(ctx, cs, i, pod); err != nil {
					if ctx.Err() == nil {
						mu.Lock()
						if firstErr == nil {
							firstErr = err
						}
						mu.Unlock()
					}
					return
				}
				if m := made.Add(1); m%5000 == 0 {
					logf("created %d/%d Services", m, n)
				}
			}
		}()
	}
	wg.Wait()
	if firstErr == nil && int(made.Load()) < n {
		firstErr = fmt.Errorf("create budget %s ran out at %d of %d Services: the large cell is measured at that count", budget, made.Load(), n)
	}
	return int(made.Load()), firstErr
}

func createOne(ctx context.Context, cs kubernetes.Interface, i int, pod *nodeport.Pod) error {
	name := fmt.Sprintf("bulk-%05d", i)
	svc, err := cs.CoreV1().Services(nodeport.Namespace).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: nodeport.PortTCP, Protocol: corev1.ProtocolTCP,
			Port: 80, TargetPort: intstr.FromInt32(nodeport.EchoPort)}}},
	}, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("create service %s: %w", name, err)
	}
	es := nodeport.EndpointSlice(svc, []*nodeport.Pod{pod})
	es.Ports = es.Ports[:1]
	if _, err := cs.DiscoveryV1().EndpointSlices(nodeport.Namespace).Create(ctx, es, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create endpointslice %s: %w", es.Name, err)
	}
	return nil
}

func summary(r *Result) string {
	var parts []string
	for _, c := range r.Cells {
		p := fmt.Sprintf("%d Services (%d frontends programmed): direct p50 %.3f/p99 %.3f ms, NodePort p50 %.3f/p99 %.3f ms, ratio %.2fx/%.2fx",
			c.Services, c.Programmed, c.Direct.P50Ms, c.Direct.P99Ms, c.NodePort.P50Ms, c.NodePort.P99Ms, c.RatioP50, c.RatioP99)
		if c.Error != "" {
			p += " [" + c.Error + "]"
		}
		parts = append(parts, p)
	}
	return "nodeport (" + r.Method + "): " + strings.Join(parts, "; ")
}

// lbMapMax sizes the agent's Service maps for n single-endpoint Services
// (master + one slot each) with room to spare.
func lbMapMax(n int) int {
	return max(65536, 4*n)
}
