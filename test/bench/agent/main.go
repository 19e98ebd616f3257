// Command agent measures kpfree-agent against the real kube-apiserver
// (test/kubeenv), the real agent control plane and the real BPF datapath, in
// one run:
//
//   - connection latency through a ClusterIP vs direct to the backend (the
//     baseline, measured in the same cell), at 1, 10,000 and 50,000 Services,
//     `ab -c 1` without keep-alive from inside the agent's child cgroup and a
//     fresh client netns per cell; the tested Service is the one created last;
//   - EndpointSlice change -> map updated, p50/p99 at the largest size
//     (polling the pinned services map);
//   - full resync: agent restart with pins present -> /readyz, and the
//     agent's own sync_duration{mode="full"};
//   - agent RSS (VmRSS) at the largest size.
//
// The agent runs as a child process (this program re-executed) with exactly
// the wiring of `kpfree-agent run`, except for the map sizes: the binary's
// default services map (65,536 entries = master + one slot per backend)
// cannot hold 50,000 Services with endpoints, so the child sizes the maps
// for the run (see -services-map).
//
// Run by `make bench` (test/bench/run.sh); needs root. Attaches only to its
// own child cgroup under the cgroup2 mount and uses a private bpffs.
package main

import (
	"bufio"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/kpfree/kpfree/agent"
	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/pinned"
	"github.com/kpfree/kpfree/bpf"
	"github.com/kpfree/kpfree/test/kubeenv"
)

const envChild = "KPFREE_BENCH_AGENT_CHILD"

var (
	backendA = netip.MustParseAddr("10.244.0.1")
	backendB = netip.MustParseAddr("10.244.0.2")
)

const backendPort = 8080

func main() {
	if js := os.Getenv(envChild); js != "" {
		if err := childMain(js); err != nil {
			fmt.Fprintln(os.Stderr, "agent child:", err)
			os.Exit(1)
		}
		return
	}
	// kubeenv and the agent child are forked with Pdeathsig, which follows
	// the forking thread: fork everything from the main thread, which lives
	// as long as the process.
	runtime.LockOSThread()
	var o opts
	flag.StringVar(&o.out, "out", "", "write the result as JSON here")
	flag.StringVar(&o.logDir, "log-dir", "", "keep the agent children's logs here (default: a temporary directory, removed)")
	flag.StringVar(&o.heapProfile, "heap-profile", "", "write the agent's heap profile (pprof, in use) at the largest size here")
	flag.StringVar(&o.sizes, "sizes", "1,10000,50000", "Service counts of the latency cells (ascending)")
	flag.IntVar(&o.workers, "workers", 16, "parallel creates")
	flag.IntVar(&o.requests, "requests", 5000, "ab -n per round")
	flag.IntVar(&o.rounds, "rounds", 2, "alternating rounds (direct, ClusterIP) per cell")
	flag.IntVar(&o.changes, "changes", 200, "EndpointSlice changes timed at the largest size")
	flag.IntVar(&o.servicesMap, "services-map", 262144, "services map entries for the agent child (binary default: 65536)")
	flag.DurationVar(&o.createBudget, "create-budget", 12*time.Minute, "bound on the creates of one cell; when it runs out the cell is measured at the count reached")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Minute, "bound on the whole run")
	flag.DurationVar(&o.steady, "steady", time.Minute, "after the restart, how long the restarted agent runs with a full pass every -steady-resync before its memory is read again (0: skip)")
	flag.DurationVar(&o.steadyResync, "steady-resync", 15*time.Second, "the restarted agent's resync interval (the agent's default is 5m)")
	flag.Parse()
	for _, s := range strings.Split(o.sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			fmt.Fprintln(os.Stderr, "bad -sizes")
			os.Exit(2)
		}
		o.sizeList = append(o.sizeList, n)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "bench agent:", err)
		os.Exit(1)
	}
}

type opts struct {
	out, sizes, heapProfile, logDir                 string
	sizeList                                        []int
	workers, requests, rounds, changes, servicesMap int
	timeout, createBudget, steady, steadyResync     time.Duration
}

// ---- result ----

type cell struct {
	Services          int       `json:"services"`
	CreateSeconds     float64   `json:"createSeconds"` // API creates for this step (Services + slices)
	CreatedObjects    int       `json:"createdObjects"`
	ProgrammedSeconds float64   `json:"programmedSeconds"` // last create -> tested Service in the map
	DirectMs          []float64 `json:"directMeanMs"`
	ClusterIPMs       []float64 `json:"clusterIPMeanMs"`
	DirectMedianMs    float64   `json:"directMedianMs"`
	ClusterIPMedianMs float64   `json:"clusterIPMedianMs"`
	Ratio             float64   `json:"ratio"`
	FailedRequests    int       `json:"failedRequests"`
	AgentStartReadyS  float64   `json:"agentStartToReadySeconds,omitempty"` // agent started after the bulk creates
	AgentFullSyncS    float64   `json:"agentFullSyncSeconds,omitempty"`
}

type result struct {
	Requests       int     `json:"abRequestsPerRound"`
	Rounds         int     `json:"rounds"`
	Cells          []cell  `json:"cells"`
	ChangeServices int     `json:"changeAtServices"`
	Changes        int     `json:"changes"`
	ChangeP50Ms    float64 `json:"changeToMapP50Ms"`
	ChangeP99Ms    float64 `json:"changeToMapP99Ms"`
	ChangeMaxMs    float64 `json:"changeToMapMaxMs"`
	SyncLagMeanMs  float64 `json:"agentSyncLagMeanMs"` // kpfree_sync_lag_seconds over the changes
	// IncrPassMeanMs: kpfree_sync_duration_seconds{mode="incremental"}
	// over the changes (the agent's pass alone, read to write).
	IncrPassMeanMs  float64 `json:"agentIncrementalPassMeanMs"`
	RestartReadyS   float64 `json:"restartToReadySeconds"`
	FullSyncS       float64 `json:"fullSyncSecondsMetric"` // kpfree_sync_duration_seconds{mode=full} of the restarted agent
	RSSMiB          float64 `json:"rssMiB"`
	RSSAfterRestart float64 `json:"rssAfterRestartMiB"`
	// The restarted agent after SteadySeconds with a full pass (model
	// rebuild, maps compared) every SteadyResyncSeconds: VmRSS then, and
	// VmHWM, its peak RSS since it started (initial list included).
	SteadySeconds       float64 `json:"steadySeconds,omitempty"`
	SteadyResyncSeconds float64 `json:"steadyResyncSeconds,omitempty"`
	SteadyFullPasses    float64 `json:"steadyFullPasses,omitempty"`
	RSSSteadyMiB        float64 `json:"rssSteadyMiB,omitempty"`
	HWMMiB              float64 `json:"peakRSSMiB,omitempty"`
	HeapAllocSteadyMiB  float64 `json:"heapAllocSteadyMiB,omitempty"`
	// Go heap of the agent when RSS was read (go_memstats_*): live heap
	// and what the heap spans hold; RSS minus heap in use is runtime,
	// stacks, code and freed memory not yet returned to the kernel.
	HeapAllocMiB        float64  `json:"heapAllocMiB"`
	HeapInuseMiB        float64  `json:"heapInuseMiB"`
	HeapAllocRestartMiB float64  `json:"heapAllocAfterRestartMiB"`
	HeapInuseRestartMiB float64  `json:"heapInuseAfterRestartMiB"`
	MapFull             string   `json:"mapFullTotal"`
	SyncErrors          string   `json:"syncErrorsTotal"`
	ServicesMap         int      `json:"servicesMapEntries"`
	GoalRatio           float64  `json:"goalMaxRatio"`
	GoalP99Ms           float64  `json:"goalP99Ms"`
	GoalFullSyncS       float64  `json:"goalFullSyncSeconds"`
	GoalRSSMiB          float64  `json:"goalRSSMiB"`
	Notes               []string `json:"notes"`
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, a...)...)
}

// ---- main run ----

func run(o opts) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (BPF, cgroup2, bpffs, netns)")
	}
	for _, tool := range []string{"ab", "ip", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	ctx, stopSig := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stopSig()

	dir, err := os.MkdirTemp("", "kpfree-bench-agent-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	tag := hex.EncodeToString(rnd[:])

	// Control plane.
	t0 := time.Now()
	// BulkServices: 50,000 Services, which the 1.34 ClusterIP allocator
	// creates in quadratic time (see kubeenv.Options.BulkServices).
	cp, err := kubeenv.Start(ctx, kubeenv.Options{Dir: filepath.Join(dir, "kube"), BulkServices: true})
	if err != nil {
		return fmt.Errorf("control plane: %w", err)
	}
	defer cp.Stop()
	logf("kube-apiserver %s ready after %s", cp.URL, time.Since(t0).Round(time.Millisecond))
	cfg, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		return err
	}
	cfg.QPS, cfg.Burst = 100000, 100000
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}

	// Child cgroup (never the root) and a private bpffs.
	root, err := cgroup2Root()
	if err != nil {
		return err
	}
	cgroup := filepath.Join(root, "kpfree-bench-agent-"+tag)
	if err := os.Mkdir(cgroup, 0o755); err != nil {
		return err
	}
	bpffs := filepath.Join(dir, "bpffs")
	if err := os.Mkdir(bpffs, 0o700); err != nil {
		return err
	}
	if err := unix.Mount("bpf", bpffs, "bpf", 0, ""); err != nil {
		return fmt.Errorf("mount bpffs: %w", err)
	}
	defer func() {
		if err := bpf.Uninstall(bpffs, cgroup); err != nil {
			logf("uninstall: %v", err)
		}
		_ = unix.Unmount(bpffs, unix.MNT_DETACH)
		for range 50 {
			if err := os.Remove(cgroup); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		logf("cgroup %s left behind", cgroup)
	}()

	logDir := cmp.Or(o.logDir, dir)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return err
	}
	health := fmt.Sprintf("127.0.0.1:%d", freePort())
	ch := childReq{Kubeconfig: cp.Kubeconfig, Server: cp.URL, Cgroup: cgroup, BPFFS: bpffs, Health: health,
		Node: "bench-node", ServicesMap: uint32(o.servicesMap)}
	ag, err := startChild(ctx, ch, filepath.Join(logDir, "agent-1.log"))
	if err != nil {
		return err
	}
	defer ag.kill()
	logf("agent child pid %d ready after %s", ag.cmd.Process.Pid, ag.ready.Round(time.Millisecond))

	maps, err := pinned.OpenMaps(bpffs)
	if err != nil {
		return err
	}
	defer maps.Close()

	r := result{Requests: o.requests, Rounds: o.rounds, ServicesMap: o.servicesMap,
		GoalRatio: 1.05, GoalP99Ms: 100, GoalFullSyncS: 2, GoalRSSMiB: 150}
	r.Notes = append(r.Notes, fmt.Sprintf("agent = this program re-executed with the wiring of `kpfree-agent run` and a services map of %d entries; "+
		"the binary's default (65536 = master + one slot per backend) holds at most 21845 Services of 2 endpoints", o.servicesMap))

	created := 0
	var tested int
	for ci, n := range o.sizeList {
		c := cell{Services: n}
		// Bulk creates run with the agent stopped (SIGTERM; the pinned
		// datapath keeps serving), so the API server has both cores; the
		// restart after the creates is a cold sync of the new objects,
		// recorded per cell.
		bulk := n-created > 1000
		if bulk {
			if err := ag.term(); err != nil {
				return err
			}
		}
		t1 := time.Now()
		if n > created {
			got, err := createRange(ctx, cs, created, n, o.workers, o.createBudget)
			if err != nil {
				return fmt.Errorf("create %d..%d: %w", created, n, err)
			}
			if got < n {
				r.Notes = append(r.Notes, fmt.Sprintf("cell %d: create budget %s ran out; measured at %d Services (all via the API)", n, o.createBudget, got))
				logf("create budget ran out: cell %d measured at %d Services", n, got)
				n, c.Services = got, got
			}
		}
		c.CreateSeconds = time.Since(t1).Seconds()
		c.CreatedObjects = 2 * (n - created)
		created = n
		if bulk {
			if ag, err = startChild(ctx, ch, filepath.Join(logDir, fmt.Sprintf("agent-cell%d.log", ci))); err != nil {
				return err
			}
			defer ag.kill()
			c.AgentStartReadyS = ag.ready.Seconds()
			c.AgentFullSyncS = parseF(scrape(health)[`kpfree_sync_duration_seconds_sum{mode="full"}`])
			logf("cell %d: agent started after the creates, readyz after %.2f s (full sync metric %.3f s)", n, c.AgentStartReadyS, c.AgentFullSyncS)
		}
		tested = n - 1 // created last
		t2 := time.Now()
		if err := waitCount(ctx, maps, vipOf(tested), 2, 5*time.Minute); err != nil {
			return fmt.Errorf("tested Service %s not programmed: %w\n%s", vipOf(tested), err, tail(ag.logPath))
		}
		c.ProgrammedSeconds = time.Since(t2).Seconds()
		logf("cell %d Services: created %d objects in %.1f s (%.0f/s); tested %s programmed %.2f s later",
			n, c.CreatedObjects, c.CreateSeconds, float64(c.CreatedObjects)/c.CreateSeconds, vipOf(tested), c.ProgrammedSeconds)
		if bulk {
			// etcd compacts the bulk create's history for a while: measure
			// on a quiet machine.
			if waited, err := cp.WaitQuiet(ctx, 0.15, 5*time.Second, 3*time.Minute); err != nil {
				logf("cell %d: measuring anyway: %v", n, err)
				r.Notes = append(r.Notes, fmt.Sprintf("cell %d: %v", n, err))
			} else {
				logf("cell %d: control plane quiet after %.0f s", n, waited.Seconds())
			}
		}
		if err := latencyCell(ctx, &c, o, cgroup, fmt.Sprintf("kpfb-%s-%d", tag, ci), vipOf(tested)); err != nil {
			return err
		}
		c.DirectMedianMs, c.ClusterIPMedianMs = median(c.DirectMs), median(c.ClusterIPMs)
		c.Ratio = c.ClusterIPMedianMs / c.DirectMedianMs
		logf("cell %d: direct %.3f ms, ClusterIP %.3f ms, ratio %.3f (rounds %v / %v)", n, c.DirectMedianMs, c.ClusterIPMedianMs, c.Ratio, c.DirectMs, c.ClusterIPMs)
		r.Cells = append(r.Cells, c)
	}

	// RSS at the largest size, after the agent has settled.
	time.Sleep(2 * time.Second)
	r.RSSMiB = rssMiB(ag.cmd.Process.Pid)
	m := scrape(health)
	r.HeapAllocMiB, r.HeapInuseMiB = parseF(m["go_memstats_heap_alloc_bytes"])/(1<<20), parseF(m["go_memstats_heap_inuse_bytes"])/(1<<20)
	r.MapFull, r.SyncErrors = m["kpfree_map_full_total"], m["kpfree_sync_errors_total"]
	if o.heapProfile != "" {
		if err := fetchTo("http://"+health+"/debug/pprof/heap", o.heapProfile); err != nil {
			logf("heap profile: %v", err)
		} else {
			logf("wrote the agent's heap profile to %s (go tool pprof -sample_index=inuse_space)", o.heapProfile)
		}
	}
	logf("agent at %d Services: VmRSS %.1f MiB, kpfree_services %s, map_full %s, sync_errors %s",
		created, r.RSSMiB, m["kpfree_services"], r.MapFull, r.SyncErrors)

	// EndpointSlice change -> map.
	r.ChangeServices = created
	lag0s, lag0c := parseF(m["kpfree_sync_lag_seconds_sum"]), parseF(m["kpfree_sync_lag_seconds_count"])
	inc0s, inc0c := parseF(m[`kpfree_sync_duration_seconds_sum{mode="incremental"}`]), parseF(m[`kpfree_sync_duration_seconds_count{mode="incremental"}`])
	lats, err := changes(ctx, cs, maps, tested, o.changes)
	if err != nil {
		return err
	}
	m = scrape(health)
	if dc := parseF(m["kpfree_sync_lag_seconds_count"]) - lag0c; dc > 0 {
		r.SyncLagMeanMs = (parseF(m["kpfree_sync_lag_seconds_sum"]) - lag0s) / dc * 1000
	}
	if dc := parseF(m[`kpfree_sync_duration_seconds_count{mode="incremental"}`]) - inc0c; dc > 0 {
		r.IncrPassMeanMs = (parseF(m[`kpfree_sync_duration_seconds_sum{mode="incremental"}`]) - inc0s) / dc * 1000
	}
	r.Changes = len(lats)
	r.ChangeP50Ms, r.ChangeP99Ms, r.ChangeMaxMs = pct(lats, 50), pct(lats, 99), slices.Max(lats)
	logf("%d changes at %d Services: p50 %.1f ms, p99 %.1f ms, max %.1f ms (agent sync lag mean %.1f ms, incremental pass mean %.2f ms)",
		r.Changes, created, r.ChangeP50Ms, r.ChangeP99Ms, r.ChangeMaxMs, r.SyncLagMeanMs, r.IncrPassMeanMs)

	// Full resync: SIGTERM, start again with the pins present.
	if err := ag.term(); err != nil {
		return err
	}
	ch.Resync = o.steadyResync
	ag2, err := startChild(ctx, ch, filepath.Join(logDir, "agent-2.log"))
	if err != nil {
		return err
	}
	defer ag2.kill()
	r.RestartReadyS = ag2.ready.Seconds()
	m = scrape(health)
	r.FullSyncS = parseF(m[`kpfree_sync_duration_seconds_sum{mode="full"}`])
	if c := parseF(m[`kpfree_sync_duration_seconds_count{mode="full"}`]); c > 1 {
		r.Notes = append(r.Notes, fmt.Sprintf("restarted agent had %v full syncs; fullSyncSecondsMetric is their sum", c))
	}
	time.Sleep(2 * time.Second)
	r.RSSAfterRestart = rssMiB(ag2.cmd.Process.Pid)
	m = scrape(health)
	r.HeapAllocRestartMiB, r.HeapInuseRestartMiB = parseF(m["go_memstats_heap_alloc_bytes"])/(1<<20), parseF(m["go_memstats_heap_inuse_bytes"])/(1<<20)
	logf("restart at %d Services: start -> readyz %.2f s; full sync (metric) %.3f s; VmRSS %.1f MiB", created, r.RestartReadyS, r.FullSyncS, r.RSSAfterRestart)
	if err := waitCount(ctx, maps, vipOf(tested), 2, 10*time.Second); err != nil {
		return fmt.Errorf("after restart: %w", err)
	}
	if o.steady > 0 {
		f0 := parseF(scrape(health)[`kpfree_sync_duration_seconds_count{mode="full"}`])
		select {
		case <-time.After(o.steady):
		case <-ctx.Done():
			return ctx.Err()
		}
		m = scrape(health)
		r.SteadySeconds, r.SteadyResyncSeconds = o.steady.Seconds(), o.steadyResync.Seconds()
		r.SteadyFullPasses = parseF(m[`kpfree_sync_duration_seconds_count{mode="full"}`]) - f0
		r.RSSSteadyMiB, r.HWMMiB = procMiB(ag2.cmd.Process.Pid, "VmRSS"), procMiB(ag2.cmd.Process.Pid, "VmHWM")
		r.HeapAllocSteadyMiB = parseF(m["go_memstats_heap_alloc_bytes"]) / (1 << 20)
		logf("restarted agent after %s with %v full passes: VmRSS %.1f MiB, peak (VmHWM) %.1f MiB, heap alloc %.1f MiB",
			o.steady, r.SteadyFullPasses, r.RSSSteadyMiB, r.HWMMiB, r.HeapAllocSteadyMiB)
	}
	_ = ag2.term()

	printTable(r)
	if o.out != "" {
		b, _ := json.MarshalIndent(r, "", "  ")
		if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(o.out, append(b, '\n'), 0o644); err != nil {
			return err
		}
		logf("wrote %s", o.out)
	}
	return nil
}

func printTable(r result) {
	fmt.Println("kpfree-agent bench (real kube-apiserver, real agent, real BPF; ab -c 1, no keep-alive, median of round means)")
	fmt.Printf("| Services | create (API) | agent start -> ready | direct | ClusterIP | ratio | goal <= %.2fx |\n|---|---|---|---|---|---|---|\n", r.GoalRatio)
	for _, c := range r.Cells {
		fmt.Printf("| %d | %d objects %.1f s | %.2f s | %.3f ms | %.3f ms | %.3fx | %s |\n", c.Services, c.CreatedObjects, c.CreateSeconds,
			c.AgentStartReadyS, c.DirectMedianMs, c.ClusterIPMedianMs, c.Ratio, verdict(c.Ratio <= r.GoalRatio))
	}
	fmt.Printf("EndpointSlice change -> map at %d Services (%d changes): p50 %.1f ms, p99 %.1f ms (goal < %.0f ms: %s), max %.1f ms\n",
		r.ChangeServices, r.Changes, r.ChangeP50Ms, r.ChangeP99Ms, r.GoalP99Ms, verdict(r.ChangeP99Ms < r.GoalP99Ms), r.ChangeMaxMs)
	fmt.Printf("full resync at %d Services: restart -> readyz %.2f s, sync_duration{full} %.3f s (goal < %.0f s: readyz %s, sync %s)\n",
		r.ChangeServices, r.RestartReadyS, r.FullSyncS, r.GoalFullSyncS, verdict(r.RestartReadyS < r.GoalFullSyncS), verdict(r.FullSyncS < r.GoalFullSyncS))
	fmt.Printf("agent VmRSS at %d Services: %.1f MiB, after restart %.1f MiB (goal < %.0f MiB: %s); Go heap alloc/inuse %.1f/%.1f MiB, after restart %.1f/%.1f MiB\n",
		r.ChangeServices, r.RSSMiB, r.RSSAfterRestart, r.GoalRSSMiB, verdict(max(r.RSSMiB, r.RSSAfterRestart) < r.GoalRSSMiB),
		r.HeapAllocMiB, r.HeapInuseMiB, r.HeapAllocRestartMiB, r.HeapInuseRestartMiB)
	if r.SteadySeconds > 0 {
		fmt.Printf("restarted agent after %.0f s with a full pass every %.0f s (%.0f passes): VmRSS %.1f MiB, peak RSS since start %.1f MiB (goal < %.0f MiB: %s), heap alloc %.1f MiB\n",
			r.SteadySeconds, r.SteadyResyncSeconds, r.SteadyFullPasses, r.RSSSteadyMiB, r.HWMMiB, r.GoalRSSMiB,
			verdict(max(r.RSSSteadyMiB, r.HWMMiB) < r.GoalRSSMiB), r.HeapAllocSteadyMiB)
	}
	fmt.Printf("map_full_total %s, sync_errors_total %s\n", r.MapFull, r.SyncErrors)
	for _, n := range r.Notes {
		fmt.Println("note:", n)
	}
}

func verdict(ok bool) string {
	if ok {
		return "within"
	}
	return "OVER"
}

// ---- objects ----

func vipOf(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, byte(100 + i>>16), byte(i >> 8), byte(i)})
}

// createRange creates Services+slices from..to-1, the last one alone after
// all the others. If budget runs out, the workers stop, and the next index is
// created last: it returns the count reached.
func createRange(ctx context.Context, cs kubernetes.Interface, from, to, workers int, budget time.Duration) (int, error) {
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	last := to - 1
	var stopped atomic.Bool
	deadline := time.Now().Add(budget)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if time.Now().After(deadline) {
					stopped.Store(true)
					return
				}
				i := int(next.Add(1) - 1)
				if i >= last {
					return
				}
				if err := createOne(ctx, cs, i); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errc:
		return 0, err
	default:
	}
	if stopped.Load() {
		// Every index below next was taken by a worker that finished it.
		last = min(int(next.Load()), last)
	}
	return last + 1, createOne(ctx, cs, last)
}

func createOne(ctx context.Context, cs kubernetes.Interface, i int) error {
	name := fmt.Sprintf("svc-%06d", i)
	vip := vipOf(i).String()
	for attempt := 0; ; attempt++ {
		_, err := cs.CoreV1().Services("default").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{ClusterIP: vip, ClusterIPs: []string{vip},
				Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(backendPort), Protocol: corev1.ProtocolTCP}}},
		}, metav1.CreateOptions{})
		if err == nil || strings.Contains(err.Error(), "already exists") {
			break
		}
		if attempt >= 5 || ctx.Err() != nil {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
	for attempt := 0; ; attempt++ {
		_, err := cs.DiscoveryV1().EndpointSlices("default").Create(ctx, endpointSlice(i, backendA, backendB), metav1.CreateOptions{})
		if err == nil || strings.Contains(err.Error(), "already exists") {
			return nil
		}
		if attempt >= 5 || ctx.Err() != nil {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func endpointSlice(i int, addrs ...netip.Addr) *discoveryv1.EndpointSlice {
	port, pname, tcp := int32(backendPort), "http", corev1.ProtocolTCP
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: fmt.Sprintf("svc-%06d-1", i), Labels: map[string]string{discoveryv1.LabelServiceName: fmt.Sprintf("svc-%06d", i)}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &pname, Port: &port, Protocol: &tcp}},
	}
	for _, a := range addrs {
		ready := true
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{a.String()}, Conditions: discoveryv1.EndpointConditions{Ready: &ready}})
	}
	return es
}

// ---- map polling ----

// masterKey is the services map key of a frontend's master entry (slot 0),
// laid out as lbmap writes it: the address as ::ffff:a.b.c.d and the port,
// both in network byte order.
func masterKey(vip netip.Addr, port uint16) bpf.SvcKey {
	b := vip.As16()
	var k bpf.SvcKey
	for i := range k.Addr {
		k.Addr[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	var p [2]byte
	binary.BigEndian.PutUint16(p[:], port)
	k.Port = binary.NativeEndian.Uint16(p[:])
	k.Proto = uint8(lbmap.TCP)
	return k
}

func backendCount(m bpf.MapSet, vip netip.Addr) int {
	k := masterKey(vip, 80)
	var v bpf.SvcVal
	if err := m.Services.Lookup(&k, &v); err != nil {
		return -1
	}
	return int(v.Count)
}

func waitCount(ctx context.Context, m bpf.MapSet, vip netip.Addr, want int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for backendCount(m, vip) != want {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s: %d backends in the map after %s, want %d", vip, backendCount(m, vip), limit, want)
		}
		time.Sleep(200 * time.Microsecond)
	}
	return nil
}

// changes alternates the tested Service's slice between 1 and 2 endpoints
// and times each API write -> master entry count in the pinned map.
func changes(ctx context.Context, cs kubernetes.Interface, m bpf.MapSet, i, n int) ([]float64, error) {
	api := cs.DiscoveryV1().EndpointSlices("default")
	var lats []float64
	for k := range n {
		time.Sleep(150 * time.Millisecond) // isolated changes, not batched (min-sync-interval 100 ms)
		want := 1
		addrs := []netip.Addr{backendA}
		if k%2 == 1 {
			want, addrs = 2, []netip.Addr{backendA, backendB}
		}
		cur, err := api.Get(ctx, fmt.Sprintf("svc-%06d-1", i), metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		es := endpointSlice(i, addrs...)
		es.ResourceVersion = cur.ResourceVersion
		t0 := time.Now()
		if _, err := api.Update(ctx, es, metav1.UpdateOptions{}); err != nil {
			return nil, err
		}
		if err := waitCount(ctx, m, vipOf(i), want, 10*time.Second); err != nil {
			return nil, fmt.Errorf("change %d: %w", k, err)
		}
		lats = append(lats, float64(time.Since(t0).Microseconds())/1000)
	}
	// Leave it at 2 endpoints.
	if backendCount(m, vipOf(i)) != 2 {
		cur, err := api.Get(ctx, fmt.Sprintf("svc-%06d-1", i), metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		es := endpointSlice(i, backendA, backendB)
		es.ResourceVersion = cur.ResourceVersion
		if _, err := api.Update(ctx, es, metav1.UpdateOptions{}); err != nil {
			return nil, err
		}
		if err := waitCount(ctx, m, vipOf(i), 2, 10*time.Second); err != nil {
			return nil, err
		}
	}
	return lats, nil
}

// ---- latency cell ----

func latencyCell(ctx context.Context, c *cell, o opts, cgroup, nsName string, vip netip.Addr) error {
	if out, err := exec.CommandContext(ctx, "ip", "netns", "add", nsName).CombinedOutput(); err != nil {
		return fmt.Errorf("ip netns add: %v %s", err, out)
	}
	defer func() { _ = exec.Command("ip", "netns", "del", nsName).Run() }()
	for _, args := range [][]string{{"link", "set", "lo", "up"},
		{"addr", "add", backendA.String() + "/32", "dev", "lo"}, {"addr", "add", backendB.String() + "/32", "dev", "lo"}} {
		if out, err := exec.CommandContext(ctx, "ip", append([]string{"-n", nsName}, args...)...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %v: %v %s", args, err, out)
		}
	}
	for _, a := range []netip.Addr{backendA, backendB} {
		ln, err := listenIn("/run/netns/"+nsName, netip.AddrPortFrom(a, backendPort).String())
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })}
		go func() { _ = srv.Serve(ln) }()
		defer srv.Close()
	}
	direct := fmt.Sprintf("http://%s:%d/", backendA, backendPort)
	viaVIP := fmt.Sprintf("http://%s:80/", vip)
	// Warm-up of both paths, not counted.
	for _, u := range []string{direct, viaVIP} {
		if _, err := ab(ctx, cgroup, nsName, u, 200); err != nil {
			return err
		}
	}
	for range o.rounds {
		for _, u := range []string{direct, viaVIP} {
			res, err := ab(ctx, cgroup, nsName, u, o.requests)
			if err != nil {
				return err
			}
			c.FailedRequests += res.failed
			if u == direct {
				c.DirectMs = append(c.DirectMs, res.meanMs)
			} else {
				c.ClusterIPMs = append(c.ClusterIPMs, res.meanMs)
			}
		}
	}
	return nil
}

func listenIn(nsPath, addr string) (net.Listener, error) {
	type res struct {
		ln  net.Listener
		err error
	}
	c := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread is discarded
		f, err := os.Open(nsPath)
		if err != nil {
			c <- res{err: err}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			c <- res{err: err}
			return
		}
		ln, err := net.Listen("tcp", addr)
		c <- res{ln, err}
	}()
	r := <-c
	return r.ln, r.err
}

type abResult struct {
	meanMs   float64
	failed   int
	complete int
}

var (
	reMean     = regexp.MustCompile(`Time per request:\s+([0-9.]+) \[ms\] \(mean\)`)
	reFailed   = regexp.MustCompile(`Failed requests:\s+(\d+)`)
	reComplete = regexp.MustCompile(`Complete requests:\s+(\d+)`)
)

// ab runs ApacheBench inside the agent's cgroup and the client netns.
func ab(ctx context.Context, cgroup, nsName, url string, n int) (abResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	script := fmt.Sprintf(`echo $$ > %s/cgroup.procs && exec nsenter --net=/run/netns/%s ab -q -n %d -c 1 -s 5 %s`, cgroup, nsName, n, url)
	out, err := exec.CommandContext(ctx, "sh", "-c", script).CombinedOutput()
	s := string(out)
	if err != nil {
		return abResult{}, fmt.Errorf("ab %s: %v\n%s", url, err, s)
	}
	var r abResult
	mm, mf, mc := reMean.FindStringSubmatch(s), reFailed.FindStringSubmatch(s), reComplete.FindStringSubmatch(s)
	if mm == nil || mf == nil || mc == nil {
		return r, fmt.Errorf("ab output:\n%s", s)
	}
	r.meanMs, _ = strconv.ParseFloat(mm[1], 64)
	r.failed, _ = strconv.Atoi(mf[1])
	r.complete, _ = strconv.Atoi(mc[1])
	if r.complete != n || r.failed != 0 || strings.Contains(s, "Non-2xx") {
		return r, fmt.Errorf("ab %s: %d/%d complete, %d failed:\n%s", url, r.complete, n, r.failed, s)
	}
	return r, nil
}

// ---- agent child ----

type childReq struct {
	Kubeconfig, Server, Cgroup, BPFFS, Health, Node string
	ServicesMap                                     uint32
	Resync                                          time.Duration // 0: 5 min
}

type child struct {
	cmd     *exec.Cmd
	logPath string
	ready   time.Duration
	done    chan error
}

func startChild(ctx context.Context, req childReq, logPath string) (*child, error) {
	js, _ := json.Marshal(req)
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), envChild+"="+string(js))
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, err
	}
	c := &child{cmd: cmd, logPath: logPath, done: make(chan error, 1)}
	go func() { c.done <- cmd.Wait(); lf.Close() }()
	for {
		resp, err := http.Get("http://" + req.Health + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				c.ready = time.Since(t0)
				return c, nil
			}
		}
		select {
		case err := <-c.done:
			c.done <- err
			return nil, fmt.Errorf("agent child exited: %v\n%s", err, tail(logPath))
		default:
		}
		if time.Since(t0) > 3*time.Minute || ctx.Err() != nil {
			c.kill()
			return nil, fmt.Errorf("agent child not ready after %s\n%s", time.Since(t0).Round(time.Second), tail(logPath))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (c *child) term() error {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-c.done:
		c.done <- err
		if err != nil {
			return fmt.Errorf("agent exit after SIGTERM: %v\n%s", err, tail(c.logPath))
		}
		return nil
	case <-time.After(20 * time.Second):
		c.kill()
		return errors.New("agent did not stop within 20 s of SIGTERM")
	}
}

func (c *child) kill() {
	select {
	case err := <-c.done:
		c.done <- err
	default:
		_ = c.cmd.Process.Kill()
		c.done <- <-c.done
	}
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

// childMain is `kpfree-agent run` (cmd/kpfree-agent/run.go) minus the flags,
// with the maps sized by the request.
func childMain(js string) error {
	var req childReq
	if err := json.Unmarshal([]byte(js), &req); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	klog.SetSlogLogger(log.With("source", "client-go"))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	dp, err := bpf.Load(bpf.Options{PinDir: req.BPFFS, CgroupPath: req.Cgroup,
		MapSizes: bpf.MapSizes{Services: req.ServicesMap, RevNat: req.ServicesMap / 2, AffinityMatch: req.ServicesMap}})
	if err != nil {
		return fmt.Errorf("load datapath: %w", err)
	}
	defer dp.Close()
	maps, err := lbmap.New(dp.Maps)
	if err != nil {
		return err
	}
	if n := maps.Len(); n > 0 {
		log.Info("restored from pinned maps", "services", n)
	}
	cfg, err := clientcmd.BuildConfigFromFlags(req.Server, req.Kubeconfig)
	if err != nil {
		return err
	}
	cfg.UserAgent = agent.Component + "/bench"
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	cfg.QPS, cfg.Burst = 20, 40
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	a, err := agent.New(agent.Config{Client: client, Maps: maps, Reload: func() (lbmap.Maps, error) { return lbmap.New(dp.Maps) },
		NodeName: req.Node, MinSyncInterval: 100 * time.Millisecond, ResyncInterval: cmp.Or(req.Resync, 5*time.Minute), Log: log})
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.Handle("/", a.Handler(true))
	mux.HandleFunc("GET /debug/pprof/heap", func(w http.ResponseWriter, _ *http.Request) {
		runtime.GC()
		_ = pprof.Lookup("heap").WriteTo(w, 0)
	})
	_, served, err := agent.Serve(ctx, req.Health, mux, log)
	if err != nil {
		return err
	}
	err = a.Run(ctx)
	if serr := <-served; serr != nil {
		err = errors.Join(err, serr)
	}
	return err
}

// ---- helpers ----

func fetchTo(url, path string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

func rssMiB(pid int) float64 { return procMiB(pid, "VmRSS") }

// procMiB reads a /proc/PID/status memory field (VmRSS, VmHWM) in MiB.
func procMiB(pid int, field string) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field+":") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return -1
}

// scrape returns the agent's metrics, "name{labels}" -> value.
func scrape(addr string) map[string]string {
	m := map[string]string{}
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return m
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") {
			continue
		}
		if i := strings.LastIndexByte(l, ' '); i > 0 {
			m[l[:i]] = l[i+1:]
		}
	}
	return m
}

func parseF(s string) float64 { f, _ := strconv.ParseFloat(s, 64); return f }

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

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func pct(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(p/100*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}
