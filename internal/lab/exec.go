package lab

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// joinCgroups is a tiny shim run on the host: it moves itself into the
// node's cgroups (the dirs before "--": cgroup2, and the cgroup v1 ones of
// Kubernetes nodes) and execs the rest, so that everything a command starts
// inside a node is counted, limited and cleaned up with the node.
const joinCgroups = `while [ "$1" != -- ]; do echo $$ >"$1/cgroup.procs" || exit 125; shift; done; shift; exec "$@"`

// inCgroups wraps argv in joinCgroups for all of node n's cgroups.
func (s *State) inCgroups(n *Node, argv []string) []string {
	return joinArgs(s.cgroupDirs(n), argv)
}

// inV1Cgroups wraps argv in joinCgroups for node n's cgroup v1 dirs (none
// unless the lab runs Kubernetes): for daemons that startDaemon puts into the
// node's cgroup2 cgroup itself.
func (s *State) inV1Cgroups(n *Node, argv []string) []string {
	dirs := s.cgroupDirs(n)[1:]
	if len(dirs) == 0 {
		return argv
	}
	return joinArgs(dirs, argv)
}

func joinArgs(dirs, argv []string) []string {
	out := append([]string{"/bin/sh", "-c", joinCgroups, "sh"}, dirs...)
	return append(append(out, "--"), argv...)
}

// Command prepares argv to run inside node: in its cgroup, network, mount and
// UTS namespaces (through its holder), as root, in /, with a clean
// environment (PATH, LANG, HOME=/root, KPFREE_LAB_NODE); callers may add to
// cmd.Env, Stdin and so on before running it.
func (s *State) Command(ctx context.Context, node string, argv ...string) (*exec.Cmd, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("%s: no command", node)
	}
	n := s.Node(node)
	if n == nil {
		return nil, fmt.Errorf("lab %s has no node %q", s.Dir, node)
	}
	if !s.isHolder(n, n.HolderPID) {
		return nil, fmt.Errorf("%s: the node's holder (pid %d) is not running: run lab up again", node, n.HolderPID)
	}
	args := s.inCgroups(n, append([]string{"nsenter", "-t", strconv.Itoa(n.HolderPID), "-n", "-m", "-u", "--"}, argv...))
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = baseEnv("HOME=/root", "KPFREE_LAB_NODE="+node)
	cmd.Dir = "/"
	return cmd, nil
}

// Exec runs argv inside node (see Command) and returns its stdout. A failure
// reports the exit status and stderr.
func (s *State) Exec(ctx context.Context, node string, argv ...string) ([]byte, error) {
	return s.ExecInput(ctx, node, nil, argv...)
}

// ExecInput is Exec with stdin.
func (s *State) ExecInput(ctx context.Context, node string, stdin []byte, argv ...string) ([]byte, error) {
	cmd, err := s.Command(ctx, node, argv...)
	if err != nil {
		return nil, err
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s: %s: %w: %s", node, strings.Join(argv, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.Bytes(), nil
}
