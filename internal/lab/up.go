package lab

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Up builds the lab described by opts, or brings an existing one to
// opts.Nodes nodes: an existing lab with that many healthy nodes is left as it
// is (a no-op), a smaller one is grown, broken nodes (a crashed Up, a dead
// holder or sshd) are rebuilt with their host keys kept. A lab that this call
// started from nothing is removed again when Up fails.
func Up(ctx context.Context, opts Options) (*State, error) {
	o, err := opts.normalize()
	if err != nil {
		return nil, err
	}
	if err := checkHost(); err != nil {
		return nil, err
	}
	_, statErr := os.Stat(o.Dir)
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, err
	}
	unlock, err := lockDir(ctx, o.Dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	s, err := load(o, errors.Is(statErr, fs.ErrNotExist))
	if err != nil {
		return nil, err
	}
	fresh := len(s.Nodes) == 0
	s.logf = o.Logf
	if !fresh && len(s.Nodes) == o.Nodes && s.healthy() {
		s.log("lab in %s is up: %d nodes", s.Dir, len(s.Nodes))
		return s, nil
	}
	start := time.Now()
	if err := s.up(ctx, o); err != nil {
		if fresh {
			s.log("lab up failed, removing what it built")
			if derr := s.down(context.WithoutCancel(ctx)); derr != nil {
				err = fmt.Errorf("%w; and removing the partial lab failed: %v (run lab down %s)", err, derr, s.Dir)
			}
		} else {
			err = fmt.Errorf("%w (lab up again repairs, lab down %s removes it)", err, s.Dir)
		}
		return nil, err
	}
	s.log("lab in %s is up: %d nodes in %s", s.Dir, len(s.Nodes), time.Since(start).Round(time.Millisecond))
	return s, nil
}

// load returns the lab in o.Dir, or the state of a new one, checked and
// saved. A dir that this call created is removed again when that fails.
func load(o Options, createdDir bool) (*State, error) {
	s, err := Load(o.Dir)
	if err == nil {
		return s, s.reconcile(o)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if entries, _ := os.ReadDir(o.Dir); len(entries) > 0 {
		return nil, fmt.Errorf("%s is not empty and holds no lab: refusing to use it as a lab dir", o.Dir)
	}
	s, err = newState(o)
	if err == nil {
		if left := Leftovers(s.Prefix); len(left) > 0 {
			err = fmt.Errorf("another lab with prefix %q exists (or its remains): %s; run lab down in its dir, or choose another prefix", s.Prefix, strings.Join(left, ", "))
		} else if linkExists(s.Bridge) {
			err = fmt.Errorf("bridge %s exists already: another lab? choose another bridge name", s.Bridge)
		}
	}
	if err == nil {
		err = s.saveLocked()
	}
	if err != nil {
		if createdDir {
			os.Remove(o.Dir)
		}
		return nil, err
	}
	return s, nil
}

// up creates the missing nodes and rebuilds the broken ones.
func (s *State) up(ctx context.Context, o Options) error {
	if s.Kubernetes {
		if err := checkKubernetesHost(s.K8sBinDir, s.Images); err != nil {
			return err
		}
	}
	userKey, err := s.ensureUserKey()
	if err != nil {
		return err
	}
	if err := s.ensureBridge(); err != nil {
		return err
	}
	users, err := loadUsers("/etc")
	if err != nil {
		return err
	}
	users.authorized = []byte(userKey + "\n")

	// Record the new nodes before creating anything, so that Down finds
	// whatever a crash leaves behind. Their names must be free.
	s.mu.Lock()
	newNodes := map[string]bool{}
	for i := len(s.Nodes) + 1; i <= o.Nodes; i++ {
		name := nodeName(i)
		addr, err := s.nodeAddr(i)
		if err != nil {
			s.mu.Unlock()
			return err
		}
		n := &Node{Name: name, Index: i, Address: addr,
			NetNS: filepath.Join(netnsDir, s.netnsName(name)), Veth: s.vethName(name),
			Cgroup: filepath.Join(s.cgroupParent(), name)}
		if _, err := os.Lstat(n.NetNS); err == nil {
			s.mu.Unlock()
			return fmt.Errorf("netns %s exists already: another lab with prefix %q?", n.NetNS, s.Prefix)
		}
		if linkExists(n.Veth) {
			s.mu.Unlock()
			return fmt.Errorf("link %s exists already: another lab with prefix %q?", n.Veth, s.Prefix)
		}
		s.Nodes = append(s.Nodes, n)
		newNodes[name] = true
	}
	nodes := append([]*Node{}, s.Nodes...)
	err = s.save()
	s.mu.Unlock()
	if err != nil {
		return err
	}

	hosts := s.hostsFile()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		sem  = make(chan struct{}, o.Parallel)
		kept []*Node
	)
	for _, n := range nodes {
		if !newNodes[n.Name] && s.nodeHealthy(n) {
			kept = append(kept, n)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := s.buildNode(ctx, n, hosts, users, !newNodes[n.Name]); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("%s: %w", n.Name, err))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if err := joinNodeErrors(errs); err != nil {
		return err
	}
	// Nodes that were there already learn the new nodes' names.
	if len(newNodes) > 0 {
		for _, n := range kept {
			if _, err := s.ExecInput(ctx, n.Name, hosts, "sh", "-c", "cat >/etc/hosts"); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := joinNodeErrors(errs); err != nil {
		return err
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writeKnownHosts(); err != nil {
		return err
	}
	inv, err := s.inventory()
	if err != nil {
		return err
	}
	if err := writeFileAtomic(s.InventoryFile(), inv, 0o644); err != nil {
		return err
	}
	return s.save()
}

// joinNodeErrors reports every node's error, k0sctl style.
func joinNodeErrors(errs []error) error {
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errs[0]
	}
	msgs := make([]string, len(errs))
	for i, e := range errs {
		msgs[i] = "- " + e.Error()
	}
	return fmt.Errorf("failed on %d nodes:\n%s", len(errs), strings.Join(msgs, "\n"))
}

// buildNode creates node n from scratch; rebuild says that n may have remains
// of an earlier run (recorded in the state, so ours) to remove first.
func (s *State) buildNode(ctx context.Context, n *Node, hosts []byte, users *userDB, rebuild bool) error {
	t0 := time.Now()
	if rebuild {
		if err := s.teardownNode(ctx, n); err != nil {
			return err
		}
		// A rebuilt node boots with an empty /run, as a rebooted host does:
		// no stale pid files, sockets or containerd task state.
		run, _ := s.overlayDirs(n.Name, "/run")
		if err := os.RemoveAll(run); err != nil {
			return err
		}
	}
	hostKey, err := s.prepareNode(n, hosts, users)
	if err != nil {
		return fmt.Errorf("prepare: %w", err)
	}
	if err := s.set(func() { n.HostKey = hostKey }); err != nil {
		return err
	}
	if err := s.ensureCgroup(n); err != nil {
		return err
	}
	if err := s.ensureCgroupV1(n); err != nil {
		return err
	}
	if err := s.createNetNS(ctx, n); err != nil {
		return err
	}
	if err := s.wireNode(n); err != nil {
		return err
	}
	pid, err := s.startHolder(ctx, n)
	if err != nil {
		return err
	}
	if err := s.set(func() { n.HolderPID = pid }); err != nil {
		return err
	}
	sshd, err := s.startSSHD(ctx, n)
	if err != nil {
		return err
	}
	if err := s.set(func() { n.SSHDPID = sshd }); err != nil {
		return err
	}
	if s.Kubernetes {
		if err := s.startKubernetes(ctx, n); err != nil {
			return err
		}
	}
	s.log("%s: up at %s (holder %d, sshd %d) in %s", n.Name, n.Address, pid, sshd, time.Since(t0).Round(time.Millisecond))
	return nil
}

// set changes the state under its lock and saves it.
func (s *State) set(f func()) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	f()
	return s.save()
}

// healthy reports whether every node runs and the lab's files are there.
func (s *State) healthy() bool {
	for _, p := range []string{s.IdentityFile(), s.KnownHostsFile(), s.InventoryFile()} {
		if _, err := os.Stat(p); err != nil {
			return false
		}
	}
	if !linkExists(s.Bridge) {
		return false
	}
	for _, n := range s.Nodes {
		if !s.nodeHealthy(n) {
			return false
		}
	}
	return true
}

func (s *State) nodeHealthy(n *Node) bool {
	if _, err := os.Stat(n.NetNS); err != nil {
		return false
	}
	return linkExists(n.Veth) && n.HostKey != "" && s.isHolder(n, n.HolderPID) && s.isSSHD(n, n.SSHDPID)
}

// teardownNode stops node n's processes (its recorded sshd and holder, then
// whatever else still runs in its cgroups), removes its cgroups and deletes
// its veth and netns. Files stay.
func (s *State) teardownNode(ctx context.Context, n *Node) error {
	var errs []error
	if err := killVerified(ctx, n.SSHDPID, func(p int) bool { return s.isSSHD(n, p) }, 3*time.Second); err != nil {
		errs = append(errs, fmt.Errorf("stop sshd: %w", err))
	}
	if err := killVerified(ctx, n.HolderPID, func(p int) bool { return s.isHolder(n, p) }, 3*time.Second); err != nil {
		errs = append(errs, fmt.Errorf("stop holder: %w", err))
	}
	// The cgroups go too, not only their processes: once a cgroup has had
	// cgroup.kill, this kernel (6.18) SIGKILLs every process cloned straight
	// into it (CLONE_INTO_CGROUP, as startDaemon does; seen here), so a
	// rebuilt node needs fresh ones. Kubelet's and runc's cgroups below go
	// with them.
	if err := emptyCgroup(ctx, n.Cgroup); err != nil {
		errs = append(errs, err)
	} else if err := removeCgroup(n.Cgroup); err != nil {
		errs = append(errs, err)
	}
	if err := s.removeCgroupsV1(ctx, n); err != nil {
		errs = append(errs, err)
	}
	if err := deleteLink(n.Veth); err != nil {
		errs = append(errs, err)
	}
	if err := deleteNetNS(n.NetNS); err != nil {
		errs = append(errs, err)
	}
	if err := s.set(func() { n.SSHDPID, n.HolderPID = 0, 0 }); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Down removes the lab in dir ("" means ResolveDir("")): its processes,
// netns, veths, bridge, cgroups and the state dir itself. Down of a dir
// without a lab succeeds; Down after a failed or crashed Up removes what
// the state records.
func Down(ctx context.Context, dir string) error {
	dir, err := filepath.Abs(ResolveDir(dir))
	if err != nil {
		return err
	}
	if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	unlock, err := lockDir(ctx, dir)
	if err != nil {
		return err
	}
	defer unlock()
	s, err := Load(dir)
	if errors.Is(err, fs.ErrNotExist) {
		entries, rerr := os.ReadDir(dir)
		if rerr == nil && len(entries) == 0 {
			return os.Remove(dir)
		}
		return fmt.Errorf("%s holds no lab state (%s): left alone", dir, stateFile)
	}
	if err != nil {
		return err
	}
	return s.down(ctx)
}

// Down removes this lab (see the package function Down).
func (s *State) Down(ctx context.Context) error {
	unlock, err := lockDir(ctx, s.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unlock()
	return s.down(ctx)
}

func (s *State) down(ctx context.Context) error {
	t0 := time.Now()
	s.mu.Lock()
	nodes := append([]*Node{}, s.Nodes...)
	s.mu.Unlock()
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for _, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.teardownNode(ctx, n); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("%s: %w", n.Name, err))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if err := joinNodeErrors(errs); err != nil {
		return fmt.Errorf("lab down %s: %w", s.Dir, err)
	}
	if err := removeCgroup(s.cgroupParent()); err != nil {
		return err
	}
	for _, root := range s.CgroupV1 {
		if err := removeCgroup(filepath.Join(root, s.Prefix+"-lab")); err != nil {
			return err
		}
	}
	if err := s.deleteBridge(); err != nil {
		return err
	}
	if m := mountsUnder(s.Dir); len(m) > 0 {
		return fmt.Errorf("lab down %s: still mounted: %s", s.Dir, strings.Join(m, ", "))
	}
	if err := os.RemoveAll(s.Dir); err != nil {
		return err
	}
	s.log("lab in %s is down (%d nodes) in %s", s.Dir, len(nodes), time.Since(t0).Round(time.Millisecond))
	return nil
}

// mountsUnder lists this mount namespace's mounts at or below dir.
func mountsUnder(dir string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && within(unescapeMount(fields[4]), dir) {
			out = append(out, fields[4])
		}
	}
	return out
}

func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// checkHost checks that this is root and the tools the lab runs are here.
func checkHost() error {
	if os.Geteuid() != 0 {
		return errors.New("the lab needs root (netns, veths, cgroups, mounts)")
	}
	var missing []string
	for tool, pkg := range map[string]string{"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux",
		"mount": "mount", "umount": "mount", "bash": "bash", "sleep": "coreutils", "ssh": "openssh-client"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, fmt.Sprintf("%s (apt-get install %s)", tool, pkg))
		}
	}
	if _, err := os.Stat(sshdPath); err != nil {
		missing = append(missing, sshdPath+" (apt-get install openssh-server)")
	}
	if len(missing) > 0 {
		return fmt.Errorf("the lab needs: %s", strings.Join(missing, ", "))
	}
	return nil
}
