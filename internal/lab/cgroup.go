package lab

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// findCgroup2 returns the cgroup2 mount point: /sys/fs/cgroup/unified on a
// hybrid (v1 + v2) layout, /sys/fs/cgroup on a pure v2 one.
func findCgroup2() (string, error) {
	for _, p := range []string{"/sys/fs/cgroup/unified", "/sys/fs/cgroup"} {
		var st unix.Statfs_t
		if err := unix.Statfs(p, &st); err == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			return p, nil
		}
	}
	return "", errors.New("no cgroup2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup")
}

// ensureCgroup creates the node's cgroup (and the lab's parent).
func (s *State) ensureCgroup(n *Node) error {
	if err := os.MkdirAll(n.Cgroup, 0o755); err != nil {
		return fmt.Errorf("create cgroup %s: %w", n.Cgroup, err)
	}
	return nil
}

// cgroupPIDs lists the processes in cg (nil when cg does not exist).
func cgroupPIDs(cg string) ([]int, error) {
	data, err := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// emptyCgroup kills whatever still runs in the node's cgroup (everything in
// it was started inside the node: sshd sessions, commands run with Exec,
// later kubelet and containers) and waits until it is empty.
func emptyCgroup(ctx context.Context, cg string) error {
	pids, err := cgroupPIDs(cg)
	if err != nil || len(pids) == 0 {
		return err
	}
	// Child cgroups (kubelet's kubepods, ...) are covered by cgroup.kill too.
	if err := os.WriteFile(filepath.Join(cg, "cgroup.kill"), []byte("1"), 0); err != nil {
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		populated, err := cgroupPopulated(cg)
		if err != nil || !populated {
			return err
		}
		if time.Now().After(deadline) {
			pids, _ := cgroupPIDs(cg)
			return fmt.Errorf("cgroup %s still holds processes %v", cg, pids)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func cgroupPopulated(cg string) (bool, error) {
	data, err := os.ReadFile(filepath.Join(cg, "cgroup.events"))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return v == "1", nil
		}
	}
	return false, nil
}

// removeCgroup removes cg and its (empty) child cgroups, deepest first.
func removeCgroup(cg string) error {
	if _, err := os.Stat(cg); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	var dirs []string
	err := filepath.WalkDir(cg, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		// cgroupfs answers EBUSY for a moment after its last process exits.
		var err error
		for try := 0; try < 50; try++ {
			err = unix.Rmdir(dirs[i])
			if err == nil || errors.Is(err, unix.ENOENT) {
				err = nil
				break
			}
			if !errors.Is(err, unix.EBUSY) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err != nil {
			return fmt.Errorf("remove cgroup %s: %w", dirs[i], err)
		}
	}
	return nil
}
