// Command preflight measures `kpfree preflight` over 1 and over 20 lab nodes
// in one run (alternating rounds, medians), and reports the ratio. The goal:
// 20 hosts take no more than 2x the time of 1, because hosts are checked in
// parallel. Run by `make bench`; needs root (lab nodes).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/internal/ssh"
)

func main() {
	bin := flag.String("kpfree", "bin/kpfree", "kpfree binary")
	nodes := flag.Int("nodes", 20, "nodes in the large run")
	rounds := flag.Int("rounds", 5, "rounds of each size")
	out := flag.String("out", "", "write the result as JSON here")
	flag.Parse()
	if err := run(*bin, *nodes, *rounds, *out); err != nil {
		fmt.Fprintln(os.Stderr, "bench preflight:", err)
		os.Exit(1)
	}
}

type result struct {
	// The floor: the same fan-out (connect + run `true` on every host) with
	// kpfree's ssh package in-process, no gather script. On one machine the
	// lab hosts' sshd share its cores, so this bounds what any SSH tool
	// can reach here.
	FloorOneSeconds   float64 `json:"floorOneNodeMedianSeconds"`
	FloorManySeconds  float64 `json:"floorManyNodesMedianSeconds"`
	FloorRatio        float64 `json:"floorRatio"`
	MachineCPUManyRun float64 `json:"machineCPUSecondsManyRun"`
	Cores             int     `json:"cores"`

	Nodes        int       `json:"nodes"`
	Rounds       int       `json:"rounds"`
	OneSeconds   []float64 `json:"oneNodeSeconds"`
	ManySeconds  []float64 `json:"manyNodesSeconds"`
	OneMedian    float64   `json:"oneNodeMedianSeconds"`
	ManyMedian   float64   `json:"manyNodesMedianSeconds"`
	Ratio        float64   `json:"ratio"`
	GoalMaxRatio float64   `json:"goalMaxRatio"`
}

func run(bin string, nodes, rounds int, out string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "kpfree-bench-preflight-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	o := lab.Options{Nodes: nodes, Dir: filepath.Join(dir, "lab"), Prefix: "kpb",
		Subnet: netip.MustParsePrefix("198.19.250.0/24")}
	start := time.Now()
	s, err := lab.Up(ctx, o)
	if err != nil {
		return fmt.Errorf("lab up: %w", err)
	}
	defer s.Down(context.WithoutCancel(ctx))
	fmt.Fprintf(os.Stderr, "lab of %d nodes up in %s\n", nodes, time.Since(start).Round(time.Millisecond))
	for _, n := range s.NodeNames() { // as a kubeadm host would have it
		if _, err := s.Exec(ctx, n, "sysctl", "-qw", "net.ipv4.ip_forward=1"); err != nil {
			return err
		}
	}
	inv, err := inventory.Load(s.InventoryFile())
	if err != nil {
		return err
	}
	many := s.InventoryFile()
	inv.Hosts = inv.Hosts[:1]
	b, err := inv.Marshal()
	if err != nil {
		return err
	}
	one := filepath.Join(dir, "one.yaml")
	if err := os.WriteFile(one, b, 0o600); err != nil {
		return err
	}
	r := result{Nodes: nodes, Rounds: rounds, GoalMaxRatio: 2}
	time1 := func(inventory string) (float64, error) {
		t0 := time.Now()
		c := exec.CommandContext(ctx, bin, "preflight", "--nodes", inventory, "-o", "json", "--concurrency", "50")
		c.Stdout = nil
		if outb, err := c.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("kpfree preflight --nodes %s: %v\n%s", inventory, err, outb)
		}
		return time.Since(t0).Seconds(), nil
	}
	// One warm-up of each, not counted.
	if _, err := time1(one); err != nil {
		return err
	}
	if _, err := time1(many); err != nil {
		return err
	}
	for i := 0; i < rounds; i++ {
		a, err := time1(one)
		if err != nil {
			return err
		}
		m, err := time1(many)
		if err != nil {
			return err
		}
		r.OneSeconds = append(r.OneSeconds, a)
		r.ManySeconds = append(r.ManySeconds, m)
	}
	r.OneMedian, r.ManyMedian = median(r.OneSeconds), median(r.ManySeconds)

	// CPU the whole machine spent on one 20-host run (kpfree, sshd, scripts).
	c0 := machineCPU()
	if _, err := time1(many); err != nil {
		return err
	}
	r.MachineCPUManyRun = machineCPU() - c0
	r.Cores = runtime.NumCPU()

	targets := inv.Targets()
	allInv, err := inventory.Load(many)
	if err != nil {
		return err
	}
	all := allInv.Targets()
	floor := func(ts []inventory.Target) (float64, error) {
		t0 := time.Now()
		d := ssh.NewDialer(ssh.Options{Concurrency: 50})
		err := ssh.ForEach(ctx, ts, 50, func(t inventory.Target) string { return t.Name },
			func(ctx context.Context, t inventory.Target) error {
				c, err := d.Dial(ctx, t)
				if err != nil {
					return err
				}
				defer c.Close()
				_, err = c.Run(ctx, "true")
				return err
			})
		return time.Since(t0).Seconds(), err
	}
	var f1, fn []float64
	for i := 0; i < rounds; i++ {
		a, err := floor(targets)
		if err != nil {
			return err
		}
		m, err := floor(all)
		if err != nil {
			return err
		}
		f1, fn = append(f1, a), append(fn, m)
	}
	r.FloorOneSeconds, r.FloorManySeconds = median(f1), median(fn)
	r.FloorRatio = r.FloorManySeconds / r.FloorOneSeconds
	r.Ratio = r.ManyMedian / r.OneMedian
	fmt.Printf("preflight over 1 node:   median %.3f s (%d rounds)\n", r.OneMedian, rounds)
	fmt.Printf("preflight over %d nodes: median %.3f s\n", nodes, r.ManyMedian)
	verdict := "within"
	if r.Ratio > r.GoalMaxRatio {
		verdict = "OVER"
	}
	fmt.Printf("ratio %d:1 = %.2fx (goal <= %.0fx: %s)\n", nodes, r.Ratio, r.GoalMaxRatio, verdict)
	fmt.Printf("machine CPU for one %d-node run: %.2f s on %d cores (floor %.2f s wall if perfectly parallel)\n",
		nodes, r.MachineCPUManyRun, r.Cores, r.MachineCPUManyRun/float64(r.Cores))
	fmt.Printf("SSH floor (connect + `true`, in-process): 1 node %.3f s, %d nodes %.3f s, ratio %.2fx\n",
		r.FloorOneSeconds, nodes, r.FloorManySeconds, r.FloorRatio)
	if out != "" {
		b, _ := json.MarshalIndent(r, "", "  ")
		if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
			return err
		}
		return os.WriteFile(out, b, 0o644)
	}
	return nil
}

// machineCPU is the CPU time all processes have used, in seconds.
func machineCPU() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	var user, nice, sys, idle, iowait, irq, softirq float64
	fmt.Sscanf(string(b), "cpu %f %f %f %f %f %f %f", &user, &nice, &sys, &idle, &iowait, &irq, &softirq)
	return (user + nice + sys + irq + softirq) / 100 // USER_HZ
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
