package verify

import (
	"context"
	"fmt"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kpfree/kpfree/internal/install"
)

// kubeProxyAbsent: kubeadm installs kube-proxy as a DaemonSet and a
// ConfigMap (its configuration) in kube-system; neither may exist.
func (r *run) kubeProxyAbsent(ctx context.Context) Check {
	cs := r.o.Client
	var found, errs []string
	ds, err := cs.AppsV1().DaemonSets("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{})
	switch {
	case err == nil:
		found = append(found, fmt.Sprintf("DaemonSet kube-system/kube-proxy exists (%d desired, %d ready)",
			ds.Status.DesiredNumberScheduled, ds.Status.NumberReady))
	case !apierrors.IsNotFound(err):
		errs = append(errs, "get DaemonSet kube-system/kube-proxy: "+err.Error())
	}
	_, err = cs.CoreV1().ConfigMaps("kube-system").Get(ctx, "kube-proxy", metav1.GetOptions{})
	switch {
	case err == nil:
		found = append(found, "ConfigMap kube-system/kube-proxy exists")
	case !apierrors.IsNotFound(err):
		errs = append(errs, "get ConfigMap kube-system/kube-proxy: "+err.Error())
	}
	switch {
	case len(found) > 0:
		return fail("kube-proxy is installed: "+strings.Join(found, "; "),
			"remove it: kubectl -n kube-system delete daemonset,configmap kube-proxy (or `kpfree migrate`)")
	case len(errs) > 0:
		return fail("cannot tell: " + strings.Join(errs, "; "))
	}
	return pass("no kube-proxy DaemonSet or ConfigMap in kube-system")
}

// agentReady: the agent DaemonSet has a ready pod of its current template on
// every node (internal/install's view, the one install waits for).
func (r *run) agentReady(ctx context.Context) Check {
	o := r.o
	a, err := install.GetAgents(ctx, o.Client, o.AgentNamespace, o.AgentDaemonSet)
	if apierrors.IsNotFound(err) {
		return fail(fmt.Sprintf("DaemonSet %s/%s not found: kpfree-agent is not installed", o.AgentNamespace, o.AgentDaemonSet))
	}
	if err != nil {
		return fail("cannot read the agents: " + err.Error())
	}
	var details []string
	var bad []string
	for _, n := range a.Nodes {
		if n.Ready {
			details = append(details, fmt.Sprintf("%s: %s ready", n.Node, n.Pod))
			continue
		}
		bad = append(bad, fmt.Sprintf("%s (%s)", n.Node, n.Reason))
		details = append(details, fmt.Sprintf("%s: not ready: %s", n.Node, n.Reason))
	}
	if len(bad) > 0 {
		return fail("kpfree-agent not ready on "+strings.Join(bad, "; "), details...)
	}
	if !a.Ok() {
		return fail("rollout not complete: "+a.String(), details...)
	}
	return pass(fmt.Sprintf("DaemonSet %s ready on %s", a.DaemonSet, plural(len(a.Nodes), "node")), details...)
}
