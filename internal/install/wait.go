package install

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
)

// Agents is the state of the agent DaemonSet and of the agent on every node.
type Agents struct {
	DaemonSet string // namespace/name
	// Generation of the DaemonSet, and the one its controller has acted on.
	Generation, ObservedGeneration int64
	// The DaemonSet's status counts.
	Desired, Ready, Updated, Available int32
	// Nodes: every Node in the cluster, sorted by name.
	Nodes []NodeAgent
}

// NodeAgent is the agent on one node.
type NodeAgent struct {
	Node      string
	NodeReady bool
	// Pod is the node's agent pod; empty when the node has none.
	Pod   string
	Ready bool
	// Reason says why the agent is not ready: the pod's phase, its
	// container's current and last state, or that there is no pod.
	Reason string
}

// Ok reports whether the rollout is complete: the DaemonSet controller has
// seen the current spec, every scheduled pod is updated, ready and
// available, and every node has a ready agent pod of the current template.
func (a *Agents) Ok() bool {
	if a.ObservedGeneration < a.Generation || a.Ready != a.Desired || a.Updated != a.Desired || a.Available != a.Desired {
		return false
	}
	return len(a.NotReady()) == 0
}

// NotReady returns the nodes without a ready agent.
func (a *Agents) NotReady() []NodeAgent {
	var out []NodeAgent
	for _, n := range a.Nodes {
		if !n.Ready {
			out = append(out, n)
		}
	}
	return out
}

// String describes the rollout in one line.
func (a *Agents) String() string {
	return fmt.Sprintf("DaemonSet %s: %d desired, %d updated, %d ready, %d available (generation %d, observed %d); agents ready on %d of %d nodes",
		a.DaemonSet, a.Desired, a.Updated, a.Ready, a.Available, a.Generation, a.ObservedGeneration,
		len(a.Nodes)-len(a.NotReady()), len(a.Nodes))
}

// NotReadyError is returned when the agents did not become ready in time.
type NotReadyError struct {
	Agents  *Agents
	Timeout time.Duration
}

func (e *NotReadyError) Error() string {
	var b strings.Builder
	timeout := e.Timeout.Round(time.Second)
	if timeout == 0 {
		timeout = e.Timeout
	}
	nr := e.Agents.NotReady()
	if len(nr) > 0 {
		fmt.Fprintf(&b, "kpfree-agent not ready on %d of %d nodes after %s:", len(nr), len(e.Agents.Nodes), timeout)
		for _, n := range nr {
			fmt.Fprintf(&b, "\n  - %s: %s", n.Node, n.Reason)
		}
		fmt.Fprintf(&b, "\n%s", e.Agents)
	} else {
		fmt.Fprintf(&b, "kpfree-agent rollout not complete after %s: %s", timeout, e.Agents)
	}
	return b.String()
}

// WaitForAgents polls until the agent DaemonSet namespace/name has rolled
// out to every node (Agents.Ok) or timeout passes, and returns the last
// state. Helm's own DaemonSet wait accepts maxUnavailable pods not ready; a
// load balancer must run on every node, so this one does not.
func WaitForAgents(ctx context.Context, cs kubernetes.Interface, namespace, name string, timeout time.Duration) (*Agents, error) {
	var last *Agents
	var lastErr error
	err := wait.PollUntilContextTimeout(ctx, 2*time.Second, timeout, true, func(ctx context.Context) (bool, error) {
		a, err := GetAgents(ctx, cs, namespace, name)
		if err != nil {
			lastErr = err
			return false, nil
		}
		last, lastErr = a, nil
		return a.Ok(), nil
	})
	if err == nil {
		return last, nil
	}
	if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return last, ctx.Err()
	}
	if last == nil {
		return nil, fmt.Errorf("kpfree-agent not ready after %s: %w", timeout, lastErr)
	}
	return last, &NotReadyError{Agents: last, Timeout: timeout}
}

// GetAgents reads the agent DaemonSet, the Nodes and the agent pods once.
func GetAgents(ctx context.Context, cs kubernetes.Interface, namespace, name string) (*Agents, error) {
	ds, err := cs.AppsV1().DaemonSets(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil {
		return nil, err
	}
	pods, err := cs.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
	if err != nil {
		return nil, err
	}
	return agents(ds, nodes.Items, pods.Items), nil
}

// The API server counts the DaemonSet's pod template changes in
// templateGenerationAnnotation; the DaemonSet controller labels the pods it
// creates with the count (templateGenerationLabel).
const (
	templateGenerationAnnotation = "deprecated.daemonset.template.generation"
	templateGenerationLabel      = "pod-template-generation"
)

// agents computes the agent state from the objects, without the API.
func agents(ds *appsv1.DaemonSet, nodes []corev1.Node, pods []corev1.Pod) *Agents {
	a := &Agents{
		DaemonSet:          ds.Namespace + "/" + ds.Name,
		Generation:         ds.Generation,
		ObservedGeneration: ds.Status.ObservedGeneration,
		Desired:            ds.Status.DesiredNumberScheduled,
		Ready:              ds.Status.NumberReady,
		Updated:            ds.Status.UpdatedNumberScheduled,
		Available:          ds.Status.NumberAvailable,
	}
	wantGen := ds.Annotations[templateGenerationAnnotation]
	byNode := map[string][]*corev1.Pod{}
	for i := range pods {
		p := &pods[i]
		if ref := metav1.GetControllerOf(p); ref == nil || ref.UID != ds.UID || p.Spec.NodeName == "" {
			continue
		}
		byNode[p.Spec.NodeName] = append(byNode[p.Spec.NodeName], p)
	}
	for _, n := range nodes {
		na := NodeAgent{Node: n.Name, NodeReady: nodeReady(&n)}
		p := pick(byNode[n.Name], wantGen)
		switch {
		case p == nil:
			na.Reason = "no agent pod"
		default:
			na.Pod = p.Name
			na.Ready, na.Reason = podState(p)
			if g, ok := p.Labels[templateGenerationLabel]; ok && wantGen != "" && g != wantGen {
				na.Ready = false
				na.Reason = fmt.Sprintf("pod %s runs the old template (generation %s, want %s); %s", p.Name, g, wantGen, na.Reason)
			}
		}
		if !na.Ready && !na.NodeReady {
			na.Reason += "; the node is not Ready"
		}
		a.Nodes = append(a.Nodes, na)
	}
	sort.Slice(a.Nodes, func(i, j int) bool { return a.Nodes[i].Node < a.Nodes[j].Node })
	return a
}

// pick chooses the pod that speaks for a node: not terminating, of the
// current template, then the newest.
func pick(pods []*corev1.Pod, wantGen string) *corev1.Pod {
	score := func(p *corev1.Pod) int {
		s := 0
		if p.DeletionTimestamp == nil {
			s += 2
		}
		if p.Labels[templateGenerationLabel] == wantGen {
			s++
		}
		return s
	}
	var best *corev1.Pod
	for _, p := range pods {
		if best == nil || score(p) > score(best) ||
			score(p) == score(best) && p.CreationTimestamp.After(best.CreationTimestamp.Time) {
			best = p
		}
	}
	return best
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podState reports whether the pod is ready and, when it is not, why.
func podState(p *corev1.Pod) (bool, string) {
	if p.DeletionTimestamp != nil {
		return false, fmt.Sprintf("pod %s is terminating", p.Name)
	}
	ready := false
	var condMsg string
	for _, c := range p.Status.Conditions {
		switch {
		case c.Type == corev1.PodReady:
			ready = c.Status == corev1.ConditionTrue
		case c.Type == corev1.PodScheduled && c.Status != corev1.ConditionTrue:
			condMsg = fmt.Sprintf("not scheduled: %s %s", c.Reason, c.Message)
		}
	}
	if ready {
		return true, ""
	}
	parts := []string{fmt.Sprintf("pod %s %s", p.Name, p.Status.Phase)}
	if condMsg != "" {
		parts = append(parts, strings.TrimSpace(condMsg))
	}
	statuses := append(append([]corev1.ContainerStatus(nil), p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...)
	for _, cs := range statuses {
		if cs.Ready {
			continue
		}
		parts = append(parts, containerState(cs))
	}
	if len(statuses) == 0 && p.Status.Message != "" {
		parts = append(parts, p.Status.Message)
	}
	return false, strings.Join(parts, "; ")
}

func containerState(cs corev1.ContainerStatus) string {
	s := "container " + cs.Name
	switch st := cs.State; {
	case st.Waiting != nil:
		s += " waiting: " + reasonMessage(st.Waiting.Reason, st.Waiting.Message)
	case st.Terminated != nil:
		s += " " + terminated(st.Terminated)
	case st.Running != nil:
		s += fmt.Sprintf(" running since %s, not ready (readiness probe /readyz failing)", st.Running.StartedAt.UTC().Format(time.RFC3339))
	default:
		s += " not started"
	}
	if cs.RestartCount > 0 {
		s += fmt.Sprintf(", %d restarts", cs.RestartCount)
	}
	if t := cs.LastTerminationState.Terminated; t != nil {
		s += "; last " + terminated(t)
	}
	return s
}

func terminated(t *corev1.ContainerStateTerminated) string {
	s := fmt.Sprintf("terminated: %s (exit code %d", t.Reason, t.ExitCode)
	if t.Signal != 0 {
		s += fmt.Sprintf(", signal %d", t.Signal)
	}
	s += ")"
	if m := strings.TrimSpace(t.Message); m != "" {
		s += ": " + oneLine(m)
	}
	return s
}

func reasonMessage(reason, msg string) string {
	if msg = strings.TrimSpace(msg); msg != "" {
		return reason + ": " + oneLine(msg)
	}
	return reason
}

// oneLine keeps the last line of a message (a crashed agent's termination
// message ends with its error) and at most 300 bytes of it.
func oneLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	l := strings.TrimSpace(lines[len(lines)-1])
	if len(l) > 300 {
		l = "..." + l[len(l)-300:]
	}
	return l
}
