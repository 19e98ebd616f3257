package bootstrap

import (
	"context"
	"fmt"
	"io/fs"
	"strings"
	"sync"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/ssh"
)

// host is one inventory host with its executor. Every change goes through
// run or upload, which record it and, under --dry-run, do nothing else;
// read-only queries go through query and always run.
type host struct {
	t      inventory.Target
	exec   ssh.Executor
	c      *cluster
	dryRun bool

	mu       sync.Mutex
	state    *hostState
	stateErr error
}

func (h *host) name() string { return h.t.Name }

// query runs a read-only command and returns its stdout; a non-zero exit
// is an error.
func (h *host) query(ctx context.Context, cmd string) (string, error) {
	out, err := ssh.Output(ctx, h.exec, cmd)
	return string(out), err
}

// run makes a change: it records cmd in the journal under step and, unless
// this is a dry run, runs it. dryOut is what a dry run returns as stdout.
func (h *host) run(ctx context.Context, step, cmd, dryOut string) (string, error) {
	h.c.journal.record(step, h.name(), "run", cmd)
	if h.dryRun {
		return dryOut, nil
	}
	out, err := ssh.Output(ctx, h.exec, cmd)
	if err != nil {
		return string(out), err
	}
	return string(out), nil
}

// upload writes a file (creating its directory) as a change.
func (h *host) upload(ctx context.Context, step string, data []byte, path string, mode fs.FileMode) error {
	h.c.journal.record(step, h.name(), "upload", fmt.Sprintf("upload %s (%d bytes, mode %04o)", path, len(data), uint32(mode.Perm())))
	if h.dryRun {
		return nil
	}
	dir := path[:strings.LastIndex(path, "/")]
	if dir != "" {
		if _, err := ssh.Output(ctx, h.exec, "mkdir -p "+ssh.ShellQuote(dir)); err != nil {
			return err
		}
	}
	return h.exec.Upload(ctx, data, path, mode)
}

// hostState is what is on a host from an earlier kubeadm run.
type hostState struct {
	AdminConf   bool // /etc/kubernetes/admin.conf: kubeadm init ran here
	KubeletConf bool // /etc/kubernetes/kubelet.conf: the kubelet joined a cluster
	APIServer   bool // the kube-apiserver static pod manifest: a control plane
	PKI         bool // /etc/kubernetes/pki/ca.crt
}

// leftovers reports whether an earlier kubeadm run left anything.
func (s hostState) leftovers() bool { return s.AdminConf || s.KubeletConf || s.APIServer || s.PKI }

func (s hostState) String() string {
	var have []string
	for _, x := range []struct {
		ok   bool
		what string
	}{{s.AdminConf, AdminConfPath}, {s.KubeletConf, KubeletConfPath}, {s.APIServer, APIServerPath}, {s.PKI, caCertPath}} {
		if x.ok {
			have = append(have, x.what)
		}
	}
	if len(have) == 0 {
		return "no kubeadm files"
	}
	return strings.Join(have, ", ")
}

const caCertPath = "/etc/kubernetes/pki/ca.crt"

// StateCommand lists which of kubeadm's files exist on a host, one path a
// line. It changes nothing.
var StateCommand = "for f in " + strings.Join([]string{AdminConfPath, KubeletConfPath, APIServerPath, caCertPath}, " ") +
	`; do if [ -e "$f" ]; then echo "$f"; fi; done`

func parseState(out string) hostState {
	var s hostState
	for line := range strings.SplitSeq(out, "\n") {
		switch strings.TrimSpace(line) {
		case AdminConfPath:
			s.AdminConf = true
		case KubeletConfPath:
			s.KubeletConf = true
		case APIServerPath:
			s.APIServer = true
		case caCertPath:
			s.PKI = true
		}
	}
	return s
}

// getState returns the host's kubeadm files, asking the host once; forget
// makes the next call ask again (after a change).
func (h *host) getState(ctx context.Context) (hostState, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.state != nil || h.stateErr != nil {
		if h.state == nil {
			return hostState{}, h.stateErr
		}
		return *h.state, nil
	}
	out, err := h.query(ctx, StateCommand)
	if err != nil {
		h.stateErr = err
		return hostState{}, err
	}
	s := parseState(out)
	h.state = &s
	return s, nil
}

func (h *host) forget() {
	h.mu.Lock()
	h.state, h.stateErr = nil, nil
	h.mu.Unlock()
}

// resetCommand undoes kubeadm init or join on a host and removes kpfree's
// own files there; with the built-in pod networking, its configuration,
// routes and bridge too (kubeadm reset leaves the CNI alone, and a node that
// joins again gets another pod CIDR).
func (c *cluster) resetCommand() string {
	cmd := "kubeadm reset -f && rm -rf " + RemoteDir
	if c.o.CNI == CNIKpfree {
		cmd += " && { " + c.o.PodNet.CleanupScript() + "; }"
	}
	return cmd
}
