package bootstrap

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/runner"
)

// changeRE matches the commands that change a host (everything but the
// read-only queries).
const changeRE = `^(kubeadm (init|join|reset|token)|mkdir|rm |set -e|\{ mountpoint -q /sys/fs/bpf \|\||upload )`

func statuses(steps []runner.StepResult) string {
	var b strings.Builder
	for _, s := range steps {
		fmt.Fprintf(&b, "%s: %s\n", s.Title, s.Status)
	}
	return b.String()
}

// TestDryRunGolden: --dry-run on 1 control plane + 2 workers prints every
// remote command per host (secrets redacted) and runs nothing but read-only
// queries.
func TestDryRunGolden(t *testing.T) {
	w := newWorld(t, inventoryFor(t, "v1.34.4"))
	o := w.options()
	o.DryRun = true
	o.KubeconfigOut = "demo.kubeconfig"
	res, err := Init(context.Background(), o)
	if err != nil {
		t.Fatalf("Init: %v\n%s", err, statuses(res.Steps))
	}
	var b strings.Builder
	if err := WritePlan(&b, res.Plan); err != nil {
		t.Fatal(err)
	}
	b.WriteString("\n## steps\n" + statuses(res.Steps))
	b.WriteString("\n## commands run on the hosts\n")
	for _, name := range []string{"cp1", "w1", "w2"} {
		for _, c := range w.hosts[name].commands() {
			fmt.Fprintf(&b, "%s: %s\n", name, c)
			if regexpMatch(changeRE, c) {
				t.Errorf("dry run changed %s: %s", name, c)
			}
		}
	}
	golden(t, "dry-run.golden", b.String())
	for _, secret := range []string{"0123456789abcdef", strings.Repeat("42", 32)} {
		if strings.Contains(b.String(), secret) {
			t.Errorf("the plan shows a secret %q", secret)
		}
	}
	if len(w.nodeNames()) != 0 || w.installs != nil || w.verified != 0 {
		t.Errorf("dry run touched the cluster: nodes %v, installs %d, verify %d", w.nodeNames(), len(w.installs), w.verified)
	}
	if _, err := os.Stat("demo.kubeconfig"); err == nil {
		t.Error("dry run wrote the kubeconfig")
	}
}

// TestInitThenNoop builds a cluster on the fakes, then runs init again:
// every step is skipped, nothing is changed, and verify runs both times.
func TestInitThenNoop(t *testing.T) {
	w := newWorld(t, inventoryFor(t, "v1.34.4"))
	o := w.options()
	res, err := Init(context.Background(), o)
	if err != nil {
		t.Fatalf("Init: %v\n%s", err, statuses(res.Steps))
	}
	for _, s := range res.Steps {
		if s.Status != runner.OK {
			t.Errorf("first run: %s: %s (%s)", s.Title, s.Status, s.Reason)
		}
	}
	if !res.OK || !res.Changed || res.Verify == nil {
		t.Errorf("first run: ok %v changed %v verify %v", res.OK, res.Changed, res.Verify)
	}
	if got := strings.Join(w.nodeNames(), ","); got != "cp1,w1,w2" {
		t.Errorf("nodes = %s", got)
	}
	if data, err := os.ReadFile(o.KubeconfigOut); err != nil || !strings.Contains(string(data), "fake admin.conf") {
		t.Errorf("kubeconfig: %q %v", data, err)
	} else if fi, _ := os.Stat(o.KubeconfigOut); fi.Mode().Perm() != 0o600 {
		t.Errorf("kubeconfig mode %v, want 0600", fi.Mode().Perm())
	}
	if len(w.installs) != 1 || w.installs[0].Values.APIServerHost != "10.0.0.11" || w.installs[0].Values.APIServerPort != 6443 {
		t.Errorf("installs: %+v", w.installs)
	}
	for name, h := range w.hosts {
		if !h.ran(`^kubeadm (init|join) --config`) {
			t.Errorf("%s: neither init nor join ran", name)
		}
		if _, ok := h.files["/etc/cni/net.d/05-kpfree.conflist"]; !ok {
			t.Errorf("%s: no CNI configuration", name)
		}
		if h.ran(`^kubeadm reset`) {
			t.Errorf("%s: reset on a clean run", name)
		}
	}
	if !w.hosts["w1"].ran(`^rm -f /etc/kubernetes/kpfree/kubeadm-join.yaml$`) || !w.hosts["cp1"].ran(`^kubeadm token delete abcdef$`) {
		t.Error("the join configuration (a secret) or the token was not removed")
	}

	before := map[string]int{}
	for name, h := range w.hosts {
		before[name] = len(h.commands())
	}
	o2 := w.options()
	o2.KubeconfigOut = o.KubeconfigOut
	res, err = Init(context.Background(), o2)
	if err != nil {
		t.Fatalf("second Init: %v\n%s", err, statuses(res.Steps))
	}
	for _, s := range res.Steps {
		if s.Status != runner.Skipped {
			t.Errorf("second run: %s: %s, want skipped", s.Title, s.Status)
		}
	}
	if res.Changed || len(res.Plan) != 0 {
		t.Errorf("second run changed something: %v", res.Plan)
	}
	for name, h := range w.hosts {
		for _, c := range h.commands()[before[name]:] {
			if regexpMatch(changeRE, c) {
				t.Errorf("second run changed %s: %s", name, c)
			}
		}
	}
	if len(w.installs) != 1 || w.verified != 2 {
		t.Errorf("installs %d (want 1), verify runs %d (want 2)", len(w.installs), w.verified)
	}
}

// TestJoinFailureRollsBack: a join failing after kubeadm init undoes the
// run: kubeadm reset -f on the control plane and on every host joined or
// tried, the kubeconfig removed; the report shows the failure and the
// rollback.
func TestJoinFailureRollsBack(t *testing.T) {
	w := newWorld(t, inventoryFor(t, "v1.34.4"))
	w.failJoin["w2"] = "error execution phase kubelet-start: timed out waiting for the condition"
	o := w.options()
	res, err := Init(context.Background(), o)
	var se *runner.StepError
	if !errors.As(err, &se) || se.Step != "Join workers" {
		t.Fatalf("Init = %v, want a failure of Join workers", err)
	}
	want := map[string]runner.Status{
		"Preflight checks":             runner.OK,
		"Render kubeadm configuration": runner.OK,
		"Initialise control plane cp1": runner.RolledBack,
		"Fetch admin kubeconfig":       runner.RolledBack,
		"Join workers":                 runner.Failed,
		"Configure pod networking":     runner.NotRun,
		"Install kpfree-agent":         runner.NotRun,
	}
	for _, s := range res.Steps {
		if s.Status != want[s.Title] {
			t.Errorf("%s: %s, want %s", s.Title, s.Status, want[s.Title])
		}
		if s.Title == "Join workers" && (!strings.Contains(s.Error, "w2") || !strings.Contains(s.Error, "timed out waiting")) {
			t.Errorf("Join workers error = %q, want w2's failure", s.Error)
		}
		if s.RollbackError != "" {
			t.Errorf("%s: rollback failed: %s", s.Title, s.RollbackError)
		}
	}
	if res.OK || res.Verify != nil || !strings.Contains(res.Error, "Join workers") {
		t.Errorf("result: ok %v verify %v error %q", res.OK, res.Verify, res.Error)
	}
	for _, name := range []string{"cp1", "w1", "w2"} {
		if !w.hosts[name].ran(`^kubeadm reset -f`) {
			t.Errorf("%s: not reset", name)
		}
		if s := *w.files[name]; s.leftovers() {
			t.Errorf("%s: left %s", name, s)
		}
	}
	if nodes := w.nodeNames(); len(nodes) != 1 || nodes[0] != "cp1" {
		// The fake reset does not delete cp1's Node (the real one goes with
		// the control plane); the joined workers' Nodes are deleted.
		t.Errorf("nodes after rollback: %v, want [cp1]", nodes)
	}
	if _, err := os.Stat(o.KubeconfigOut); err == nil {
		t.Error("the kubeconfig is still there")
	}
	var rolled []string
	for _, a := range res.Plan {
		if strings.HasPrefix(a.Step, "Roll back: ") && strings.HasPrefix(a.What, "kubeadm reset") {
			rolled = append(rolled, a.Host)
		}
	}
	if got := strings.Join(rolled, ","); got != "w1,w2,cp1" && got != "w2,w1,cp1" {
		t.Errorf("resets in the plan: %s, want the workers then cp1", got)
	}
}

// TestRerunJoinsFailedNode: without rollback, a worker that failed to join
// is reset and joined by the next run; the others are left alone.
func TestRerunJoinsFailedNode(t *testing.T) {
	w := newWorld(t, inventoryFor(t, "v1.34.4"))
	w.failJoin["w2"] = "error execution phase preflight: boom"
	o := w.options()
	o.NoRollback = true
	if _, err := Init(context.Background(), o); err == nil {
		t.Fatal("first run succeeded")
	}
	delete(w.failJoin, "w2")
	before := len(w.hosts["w1"].commands())
	o2 := w.options()
	o2.KubeconfigOut = o.KubeconfigOut
	res, err := Init(context.Background(), o2)
	if err != nil {
		t.Fatalf("second run: %v\n%s", err, statuses(res.Steps))
	}
	got := statuses(res.Steps)
	for _, want := range []string{"Initialise control plane cp1: skipped", "Join workers: ok", "Fetch admin kubeconfig: skipped"} {
		if !strings.Contains(got, want) {
			t.Errorf("second run lacks %q:\n%s", want, got)
		}
	}
	if !w.hosts["w2"].ran(`^kubeadm reset -f`) {
		t.Error("w2 was not reset before joining again")
	}
	for _, c := range w.hosts["w1"].commands()[before:] {
		if regexpMatch(`^kubeadm (join|reset)`, c) {
			t.Errorf("w1, already joined, got %s", c)
		}
	}
	if strings.Join(w.nodeNames(), ",") != "cp1,w1,w2" {
		t.Errorf("nodes: %v", w.nodeNames())
	}
}

func TestDecide(t *testing.T) {
	none := hostState{}
	initd := hostState{AdminConf: true, KubeletConf: true, APIServer: true, PKI: true}
	worker := hostState{KubeletConf: true, PKI: true}
	cp := hostState{KubeletConf: true, PKI: true, APIServer: true}
	in := func(names ...string) membership {
		m := membership{Known: true, Nodes: map[string]bool{}}
		for _, n := range names {
			m.Nodes[n] = true
		}
		return m
	}
	down := membership{Err: errors.New("connection refused")}
	noCluster := membership{}
	type want struct {
		skip, reset, err bool
	}
	for _, tt := range []struct {
		name  string
		init  bool
		role  inventory.Role
		state hostState
		m     membership
		want  want
	}{
		{"init: fresh host", true, inventory.RoleControlPlane, none, noCluster, want{}},
		{"init: initialised and in the cluster", true, inventory.RoleControlPlane, initd, in("cp1"), want{skip: true}},
		{"init: admin.conf but the API is down", true, inventory.RoleControlPlane, initd, down, want{err: true}},
		{"init: admin.conf of another cluster", true, inventory.RoleControlPlane, initd, in("other"), want{err: true}},
		{"init: leftovers of a failed init", true, inventory.RoleControlPlane, hostState{PKI: true, APIServer: true}, noCluster, want{reset: true}},
		{"join: fresh worker", false, inventory.RoleWorker, none, in("cp1"), want{}},
		{"join: worker already joined", false, inventory.RoleWorker, worker, in("cp1", "w1"), want{skip: true}},
		{"join: worker failed to join", false, inventory.RoleWorker, worker, in("cp1"), want{reset: true}},
		{"join: leftovers, API down", false, inventory.RoleWorker, worker, down, want{err: true}},
		{"join: leftovers of a cluster that is gone", false, inventory.RoleWorker, worker, noCluster, want{reset: true}},
		{"join: control plane joined", false, inventory.RoleControlPlane, cp, in("cp1", "w1"), want{skip: true}},
		{"join: control plane in the cluster as a worker", false, inventory.RoleControlPlane, worker, in("cp1", "w1"), want{err: true}},
		{"join: worker in the cluster as a control plane", false, inventory.RoleWorker, cp, in("cp1", "w1"), want{err: true}},
		{"join: Node left over, host clean", false, inventory.RoleWorker, none, in("cp1", "w1"), want{}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var d decision
			if tt.init {
				d = decideInit("cp1", tt.state, tt.m)
			} else {
				d = decideJoin("w1", tt.role, tt.state, tt.m)
			}
			got := want{skip: d.Skip, reset: d.Reset, err: d.Err != nil}
			if got != tt.want {
				t.Errorf("decision %+v, want %+v", d, tt.want)
			}
			if (d.Skip || d.Reset) && d.Reason == "" {
				t.Error("no reason given")
			}
		})
	}
}
