package lab

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// joinCgroup is a tiny shim run on the host: it moves itself into the node's
// cgroup ($1/cgroup.procs) and execs the rest, so that everything a command
// starts inside a node is counted, limited and cleaned up with the node.
const joinCgroup = `echo $$ >"$1/cgroup.procs" && shift && exec "$@"`

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
	args := append([]string{"-c", joinCgroup, "sh", n.Cgroup,
		"nsenter", "-t", strconv.Itoa(n.HolderPID), "-n", "-m", "-u", "--"}, argv...)
	cmd := exec.CommandContext(ctx, "/bin/sh", args...)
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
