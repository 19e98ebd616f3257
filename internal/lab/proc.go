package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// procInfo is what the lab reads about a process before it signals it.
type procInfo struct {
	argv    []string
	exe     string
	cgroup  string   // cgroup2 path relative to the cgroup2 root, e.g. /kpfree-lab/node1
	cgroups []string // the paths in every hierarchy, cgroup2 and v1
	zombie  bool
}

func readProc(pid int) (procInfo, error) {
	var pi procInfo
	dir := "/proc/" + strconv.Itoa(pid)
	stat, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return pi, err
	}
	// pid (comm) STATE ...: comm may hold spaces and parentheses.
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) {
		pi.zombie = stat[i+2] == 'Z' || stat[i+2] == 'X'
	}
	if cmdline, err := os.ReadFile(dir + "/cmdline"); err == nil {
		pi.argv = strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	}
	pi.exe, _ = os.Readlink(dir + "/exe")
	if cg, err := os.ReadFile(dir + "/cgroup"); err == nil {
		for _, line := range strings.Split(string(cg), "\n") {
			if p, ok := strings.CutPrefix(line, "0::"); ok {
				pi.cgroup = p
			}
			// ID:CONTROLLERS:PATH
			if f := strings.SplitN(line, ":", 3); len(f) == 3 {
				pi.cgroups = append(pi.cgroups, f[2])
			}
		}
	}
	return pi, nil
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	pi, err := readProc(pid)
	return err == nil && !pi.zombie
}

// cgroupRel is a node cgroup's path as /proc/PID/cgroup shows it.
func (s *State) cgroupRel(n *Node) string {
	rel, err := filepath.Rel(s.CgroupRoot, n.Cgroup)
	if err != nil {
		return n.Cgroup
	}
	return "/" + rel
}

// isHolder reports whether pid is the holder of node n: argv[0] carries the
// holder marker with the node's netns name and it sits in the node's cgroup.
func (s *State) isHolder(n *Node, pid int) bool {
	if pid <= 0 {
		return false
	}
	pi, err := readProc(pid)
	if err != nil || pi.zombie || len(pi.argv) == 0 {
		return false
	}
	return pi.argv[0] == HolderMarker+s.netnsName(n.Name) && pi.cgroup == s.cgroupRel(n)
}

// isSSHD reports whether pid is node n's sshd: the sshd binary, in the
// node's cgroup, with the node's sshd_config on its command line (which sshd
// rewrites to "sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] ...").
func (s *State) isSSHD(n *Node, pid int) bool {
	if pid <= 0 {
		return false
	}
	pi, err := readProc(pid)
	if err != nil || pi.zombie {
		return false
	}
	return strings.TrimSuffix(pi.exe, " (deleted)") == sshdPath && pi.cgroup == s.cgroupRel(n) &&
		strings.Contains(strings.Join(pi.argv, " "), " -f "+s.sshdConfigPath(n.Name))
}

// killVerified stops pid if check still holds once a pidfd pins the process
// (so a recycled PID is never signalled): SIGTERM, then SIGKILL after grace.
// A process that is gone already is not an error.
func killVerified(ctx context.Context, pid int, check func(int) bool, grace time.Duration) error {
	if pid <= 0 {
		return nil
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(fd)
	if !check(pid) {
		return nil // not ours (any more): leave it alone
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGTERM, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil
		}
		return fmt.Errorf("signal %d: %w", pid, err)
	}
	if waitPidfd(ctx, fd, grace) {
		return nil
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill %d: %w", pid, err)
	}
	if waitPidfd(ctx, fd, 5*time.Second) {
		return nil
	}
	return fmt.Errorf("process %d did not exit after SIGKILL", pid)
}

// waitPidfd waits until the process behind fd exits (it may stay a zombie).
func waitPidfd(ctx context.Context, fd int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		ms := int(time.Until(deadline) / time.Millisecond)
		if ms <= 0 || ctx.Err() != nil {
			return false
		}
		ms = min(ms, 100)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, ms)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return false
		}
		if n > 0 {
			return true
		}
	}
}

// startDaemon starts cmd inside the cgroup dir cg (clone3 CLONE_INTO_CGROUP,
// so not even the first instruction runs outside it), in a session of its
// own, and reaps it in the background when it exits while we still run.
func startDaemon(cmd *exec.Cmd, cg string) error {
	dirfd, err := unix.Open(cg, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open cgroup %s: %w", cg, err)
	}
	defer unix.Close(dirfd)
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true
	cmd.SysProcAttr.UseCgroupFD = true
	cmd.SysProcAttr.CgroupFD = dirfd
	if cmd.Dir == "" {
		cmd.Dir = "/"
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	go func() { _ = cmd.Wait() }()
	return nil
}

// baseEnv is the environment of every process the lab starts.
func baseEnv(extra ...string) []string {
	return append([]string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG=C.UTF-8",
	}, extra...)
}

// run runs a short host command and returns its error with its output.
func run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = baseEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// StopStarted stops a process the caller started itself and is waiting for
// (done closes when its Wait returns): SIGTERM, then SIGKILL after grace.
// A process already gone is left alone. For test helpers' Stop methods.
func StopStarted(p *os.Process, done <-chan struct{}, grace time.Duration) {
	select {
	case <-done:
		return
	default:
	}
	_ = p.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(grace):
		_ = p.Kill()
		<-done
	}
}
