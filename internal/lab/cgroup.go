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

// cgroupV1Roots lists the mount points of the cgroup v1 hierarchies (one per
// controller, or per group of co-mounted controllers, and named ones such as
// name=systemd), in mount order. On a pure cgroup2 machine it is empty.
func cgroupV1Roots() ([]string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var roots []string
	seen := map[string]bool{}
	for _, line := range strings.Split(string(data), "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 1 || g[0] != "cgroup" || f[3] != "/" {
			continue
		}
		mp := unescapeMount(f[4])
		if !seen[mp] {
			seen[mp] = true
			roots = append(roots, mp)
		}
	}
	return roots, nil
}

// cgroupDirs are the node's cgroup directories: its cgroup2 one first, then
// one per cgroup v1 hierarchy when the lab runs Kubernetes (kubelet and runc
// use the same relative path, <prefix>-lab/<node>, in every hierarchy).
func (s *State) cgroupDirs(n *Node) []string {
	dirs := []string{n.Cgroup}
	for _, root := range s.CgroupV1 {
		dirs = append(dirs, filepath.Join(root, s.Prefix+"-lab", n.Name))
	}
	return dirs
}

// CgroupPath is node's cgroup path relative to each hierarchy's root, e.g.
// "/kpfree-lab/node1": the kubelet's cgroupRoot for that node.
func (s *State) CgroupPath(node string) string {
	return "/" + s.Prefix + "-lab/" + node
}

// ensureCgroupV1 creates the node's directory (and the lab's parent) in every
// cgroup v1 hierarchy. A cpuset cgroup takes no process before it has CPUs
// and memory nodes: both levels copy them from their parent.
func (s *State) ensureCgroupV1(n *Node) error {
	for _, root := range s.CgroupV1 {
		parent := filepath.Join(root, s.Prefix+"-lab")
		for _, dir := range []string{parent, filepath.Join(parent, n.Name)} {
			if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("create cgroup %s: %w", dir, err)
			}
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if err := copyCgroupFile(filepath.Dir(dir), dir, f); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// copyCgroupFile copies file f from cgroup dir from to dir to when from has
// it and to's is empty.
func copyCgroupFile(from, to, f string) error {
	src, err := os.ReadFile(filepath.Join(from, f))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	dst, err := os.ReadFile(filepath.Join(to, f))
	if err != nil {
		return err
	}
	if len(strings.TrimSpace(string(dst))) > 0 {
		return nil
	}
	if err := os.WriteFile(filepath.Join(to, f), src, 0); err != nil {
		return fmt.Errorf("cgroup %s: write %s: %w", to, f, err)
	}
	return nil
}

// emptyCgroupV1 kills every process left in the cgroup v1 directory cg and
// its children (cgroup v1 has no cgroup.kill) and waits until they are gone.
// Normally there are none: every process of a node is in its cgroup2 subtree
// too, which emptyCgroup empties first.
func emptyCgroupV1(ctx context.Context, cg string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		pids, err := cgroupTreePIDs(cg)
		if err != nil || len(pids) == 0 {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s still holds processes %v", cg, pids)
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// cgroupTreePIDs lists the live (non-zombie) processes in cg and its
// descendants.
func cgroupTreePIDs(cg string) ([]int, error) {
	var pids []int
	err := filepath.WalkDir(cg, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if !d.IsDir() {
			return nil
		}
		ps, err := cgroupPIDs(p)
		if err != nil {
			return err
		}
		for _, pid := range ps {
			if alive(pid) {
				pids = append(pids, pid)
			}
		}
		return nil
	})
	return pids, err
}

// NodePIDs lists the processes of node: everything in its cgroup2 subtree
// (sshd and sessions, containerd, kubelet, shims and containers).
func (s *State) NodePIDs(node string) ([]int, error) {
	n := s.Node(node)
	if n == nil {
		return nil, fmt.Errorf("lab %s has no node %q", s.Dir, node)
	}
	return cgroupTreePIDs(n.Cgroup)
}
