package kubeenv

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// WaitQuiet waits until etcd and kube-apiserver together use less than
// maxCores of CPU over a window (etcd compactions and the API server's own
// housekeeping after a bulk create go on for a while), so a latency
// measurement that follows does not share the machine with them. It gives
// up after limit and says how busy they still were; it returns how long it
// waited.
func (cp *ControlPlane) WaitQuiet(ctx context.Context, maxCores float64, window, limit time.Duration) (time.Duration, error) {
	t0 := time.Now()
	var pids []int
	for _, c := range []*os.Process{procOf(cp.etcd), procOf(cp.apiserver)} {
		if c != nil {
			pids = append(pids, c.Pid)
		}
	}
	for {
		c0, w0 := cpuSeconds(pids), time.Now()
		select {
		case <-ctx.Done():
			return time.Since(t0), ctx.Err()
		case <-time.After(window):
		}
		used := (cpuSeconds(pids) - c0) / time.Since(w0).Seconds()
		if used < maxCores {
			return time.Since(t0), nil
		}
		if time.Since(t0) > limit {
			return time.Since(t0), fmt.Errorf("kubeenv: etcd + kube-apiserver still use %.2f cores after %s (want < %.2f)", used, limit, maxCores)
		}
	}
}

// cpuSeconds is the user + system CPU time of the processes so far.
func cpuSeconds(pids []int) float64 {
	var ticks float64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		// Fields after the command (which may hold spaces) in parentheses:
		// utime and stime are the 14th and 15th of the whole line.
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 13 {
			continue
		}
		u, _ := strconv.ParseFloat(f[11], 64)
		s, _ := strconv.ParseFloat(f[12], 64)
		ticks += u + s
	}
	return ticks / 100 // USER_HZ
}
