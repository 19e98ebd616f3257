package bootstrap

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"

	"github.com/kpfree/kpfree/internal/ssh"
)

// Action is one change a step makes (or, under --dry-run, would make): a
// command on a host, a file uploaded to a host, a local file written, or a
// request to the Kubernetes API. Commands are redacted (ssh.Redact): a
// bootstrap token's secret or a certificate key never shows.
type Action struct {
	Step string `json:"step"`
	// Host is the inventory host, "local" for this machine and "api" for the
	// Kubernetes API.
	Host string `json:"host"`
	// Kind is "run", "upload", "write" or "api".
	Kind string `json:"kind"`
	What string `json:"what"`

	seq       int
	stepIndex int
}

// Hosts of actions that are not inventory hosts.
const (
	HostLocal = "local"
	HostAPI   = "api"
)

// journal records actions from concurrent steps and fan-outs.
type journal struct {
	mu      sync.Mutex
	actions []Action
	steps   map[string]int // step title -> position
}

func newJournal() *journal { return &journal{steps: map[string]int{}} }

func (j *journal) addStep(title string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if _, ok := j.steps[title]; !ok {
		j.steps[title] = len(j.steps)
	}
}

func (j *journal) record(step, host, kind, what string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if _, ok := j.steps[step]; !ok { // a rollback: after every step
		j.steps[step] = len(j.steps)
	}
	j.actions = append(j.actions, Action{Step: step, Host: host, Kind: kind, What: ssh.Redact(what), seq: len(j.actions), stepIndex: j.steps[step]})
}

// list returns the actions by step, then in the order they were made. A dry
// run works on one host at a time, so its list is the same on every run.
func (j *journal) list() []Action {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := slices.Clone(j.actions)
	slices.SortStableFunc(out, func(a, b Action) int {
		if a.stepIndex != b.stepIndex {
			return a.stepIndex - b.stepIndex
		}
		return a.seq - b.seq
	})
	return out
}

// WritePlan writes actions as text, one block per step:
//
//	# Initialise control plane cp1
//	cp1: kubeadm init --config /etc/kubernetes/kpfree/kubeadm-init.yaml
func WritePlan(w io.Writer, actions []Action) error {
	var b strings.Builder
	step := ""
	for i, a := range actions {
		if i == 0 || a.Step != step {
			if i > 0 {
				b.WriteString("\n")
			}
			step = a.Step
			fmt.Fprintf(&b, "# %s\n", step)
		}
		lines := strings.Split(strings.TrimRight(a.What, "\n"), "\n")
		fmt.Fprintf(&b, "%s: %s\n", a.Host, lines[0])
		for _, l := range lines[1:] {
			fmt.Fprintf(&b, "%s  %s\n", strings.Repeat(" ", len(a.Host)), l)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}
