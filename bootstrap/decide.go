package bootstrap

import (
	"fmt"

	"github.com/kpfree/kpfree/internal/inventory"
)

// decision is what init does on one host.
type decision struct {
	// Skip: the work is done; Reason says why.
	Skip   bool
	Reason string
	// Reset: an earlier attempt left files behind; `kubeadm reset -f`
	// before doing the work again.
	Reset bool
	// Err: kpfree cannot tell what to do safely and refuses.
	Err error
}

// membership is what the API says about the cluster. Known is false when no
// API server could be asked: there is no cluster yet (no admin.conf on the
// first control plane, Err nil) or its API server did not answer (Err).
type membership struct {
	Known bool
	Err   error
	Nodes map[string]bool
}

func (m membership) has(name string) bool { return m.Known && m.Nodes[name] }

// decideInit decides `kubeadm init` on the first control plane.
func decideInit(name string, st hostState, m membership) decision {
	switch {
	case st.AdminConf && m.has(name):
		return decision{Skip: true, Reason: fmt.Sprintf("already initialised: %s exists and node %s is in the cluster", AdminConfPath, name)}
	case st.AdminConf && m.Err != nil:
		return decision{Err: fmt.Errorf("%s has %s from an earlier kubeadm init, but its API server does not answer (%v): repair it, or run `kubeadm reset -f` on %s to start over", name, AdminConfPath, m.Err, name)}
	case st.AdminConf:
		return decision{Err: fmt.Errorf("%s has %s from an earlier kubeadm init, but node %s is not in that cluster: run `kubeadm reset -f` on %s to start over", name, AdminConfPath, name, name)}
	case st.leftovers():
		return decision{Reset: true, Reason: fmt.Sprintf("an earlier attempt left %s: kubeadm reset -f first", st)}
	}
	return decision{}
}

// decideJoin decides `kubeadm join` on a host other than the first control
// plane.
func decideJoin(name string, role inventory.Role, st hostState, m membership) decision {
	joined := st.KubeletConf && m.has(name)
	switch {
	case joined && role == inventory.RoleControlPlane && !st.APIServer:
		return decision{Err: fmt.Errorf("%s is in the cluster as a worker (no %s) but the inventory says control-plane: kpfree does not change a node's role; `kubeadm reset -f` it first", name, APIServerPath)}
	case joined && role == inventory.RoleWorker && st.APIServer:
		return decision{Err: fmt.Errorf("%s is in the cluster as a control plane but the inventory says worker: kpfree does not change a node's role", name)}
	case joined:
		return decision{Skip: true, Reason: fmt.Sprintf("%s already joined: %s exists and node %s is in the cluster", name, KubeletConfPath, name)}
	case st.leftovers() && m.Err != nil:
		return decision{Err: fmt.Errorf("%s has %s but the cluster's API server does not answer (%v): cannot tell whether it is a member; not resetting it", name, st, m.Err)}
	case st.leftovers():
		return decision{Reset: true, Reason: fmt.Sprintf("%s did not finish joining (%s; node in cluster: %v): kubeadm reset -f, then join", name, st, m.has(name))}
	}
	return decision{}
}
