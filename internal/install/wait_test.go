package install

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

func testDS(desired, ready, updated, available int32) *appsv1.DaemonSet {
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "kpfree-agent", Namespace: "kube-system", UID: "ds-uid", Generation: 2,
			Annotations: map[string]string{templateGenerationAnnotation: "2"}},
		Status: appsv1.DaemonSetStatus{ObservedGeneration: 2, DesiredNumberScheduled: desired, NumberReady: ready,
			UpdatedNumberScheduled: updated, NumberAvailable: available},
	}
}

func testNode(name string, ready bool) corev1.Node {
	st := corev1.ConditionTrue
	if !ready {
		st = corev1.ConditionFalse
	}
	return corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name},
		Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: st}}}}
}

func testPod(name, node, gen string, ready bool, cs ...corev1.ContainerStatus) corev1.Pod {
	t := true
	st := corev1.ConditionFalse
	if ready {
		st = corev1.ConditionTrue
	}
	return corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "kube-system",
			Labels:          map[string]string{templateGenerationLabel: gen},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "kpfree-agent", UID: types.UID("ds-uid"), Controller: &t}}},
		Spec: corev1.PodSpec{NodeName: node},
		Status: corev1.PodStatus{Phase: corev1.PodRunning,
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: st}},
			ContainerStatuses: cs},
	}
}

func TestAgentsAllReady(t *testing.T) {
	a := agents(testDS(2, 2, 2, 2),
		[]corev1.Node{testNode("b", true), testNode("a", true)},
		[]corev1.Pod{testPod("p-a", "a", "2", true), testPod("p-b", "b", "2", true)})
	if !a.Ok() {
		t.Fatalf("not ok: %s %+v", a, a.Nodes)
	}
	want := []NodeAgent{{Node: "a", NodeReady: true, Pod: "p-a", Ready: true}, {Node: "b", NodeReady: true, Pod: "p-b", Ready: true}}
	if d := cmp.Diff(want, a.Nodes); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}

// TestAgentsCountsAreNotEnough: the DaemonSet's counts can look complete
// while a node has no agent (a node the controller has not seen yet, or
// counts that tolerate maxUnavailable): every Node must have a ready pod.
func TestAgentsCountsAreNotEnough(t *testing.T) {
	a := agents(testDS(1, 1, 1, 1),
		[]corev1.Node{testNode("a", true), testNode("new", true)},
		[]corev1.Pod{testPod("p-a", "a", "2", true)})
	if a.Ok() {
		t.Fatal("ok with a node without an agent")
	}
	err := (&NotReadyError{Agents: a, Timeout: time.Minute}).Error()
	for _, want := range []string{"not ready on 1 of 2 nodes after 1m0s", "- new: no agent pod", "1 desired"} {
		if !strings.Contains(err, want) {
			t.Errorf("error lacks %q:\n%s", want, err)
		}
	}
	if strings.Contains(err, "- a:") {
		t.Errorf("error names a ready node:\n%s", err)
	}
}

func TestAgentsReasons(t *testing.T) {
	crash := corev1.ContainerStatus{Name: "agent", RestartCount: 4,
		State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff", Message: "back-off 1m20s restarting failed container=agent"}},
		LastTerminationState: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Reason: "Error", ExitCode: 1,
			Message: "loading programs\nerror: attach cgroup /run/kpfree/cgroupv2: operation not permitted\n"}}}
	pull := corev1.ContainerStatus{Name: "agent",
		State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ErrImageNeverPull", Message: `Container image "localhost/kpfree-agent:dev" is not present with pull policy of Never`}}}
	running := corev1.ContainerStatus{Name: "agent", State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))}}}
	pending := testPod("p-e", "e", "2", false)
	pending.Status.Phase = corev1.PodPending
	pending.Status.Conditions = append(pending.Status.Conditions, corev1.PodCondition{Type: corev1.PodScheduled, Status: corev1.ConditionFalse, Reason: "Unschedulable", Message: "0/5 nodes are available: insufficient memory."})
	oldTemplate := testPod("p-f", "f", "1", true)
	terminating := testPod("p-g-old", "g", "1", false)
	terminating.DeletionTimestamp = &metav1.Time{Time: time.Now()}
	replacement := testPod("p-g", "g", "2", true)
	foreign := testPod("other", "h", "2", true)
	foreign.OwnerReferences[0].UID = "someone-else"

	a := agents(testDS(8, 2, 6, 2),
		[]corev1.Node{testNode("a", true), testNode("b", true), testNode("c", true), testNode("d", false),
			testNode("e", true), testNode("f", true), testNode("g", true), testNode("h", true)},
		[]corev1.Pod{testPod("p-a", "a", "2", false, crash), testPod("p-b", "b", "2", false, pull),
			testPod("p-c", "c", "2", false, running), pending, oldTemplate, terminating, replacement, foreign})
	got := map[string]string{}
	for _, n := range a.NotReady() {
		got[n.Node] = n.Reason
	}
	want := map[string][]string{
		"a": {"pod p-a Running", "container agent waiting: CrashLoopBackOff", "4 restarts",
			"last terminated: Error (exit code 1): error: attach cgroup /run/kpfree/cgroupv2: operation not permitted"},
		"b": {"ErrImageNeverPull", "pull policy of Never"},
		"c": {"running since 2026-01-02T03:04:05Z, not ready (readiness probe /readyz failing)"},
		"d": {"no agent pod", "the node is not Ready"},
		"e": {"Pending", "not scheduled: Unschedulable 0/5 nodes are available: insufficient memory."},
		"f": {"runs the old template (generation 1, want 2)"},
		"h": {"no agent pod"},
	}
	if len(got) != len(want) {
		t.Errorf("not ready: %v", got)
	}
	for node, subs := range want {
		for _, s := range subs {
			if !strings.Contains(got[node], s) {
				t.Errorf("node %s: reason %q lacks %q", node, got[node], s)
			}
		}
	}
	if a.Ok() {
		t.Error("ok")
	}
}

func TestAgentsGenerationNotObserved(t *testing.T) {
	ds := testDS(1, 1, 1, 1)
	ds.Status.ObservedGeneration = 1
	a := agents(ds, []corev1.Node{testNode("a", true)}, []corev1.Pod{testPod("p-a", "a", "2", true)})
	if a.Ok() {
		t.Error("ok before the controller observed the new generation")
	}
	if err := (&NotReadyError{Agents: a, Timeout: time.Second}).Error(); !strings.Contains(err, "rollout not complete") || !strings.Contains(err, "generation 2, observed 1") {
		t.Errorf("error %q", err)
	}
}

func TestAgentsNoNodes(t *testing.T) {
	if a := agents(testDS(0, 0, 0, 0), nil, nil); !a.Ok() {
		t.Errorf("no nodes, nothing scheduled: %s", a)
	}
}
