package verify

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// Names and ports of the test workload.
const (
	EchoName         = "echo"
	EchoNodePortName = "echo-nodeport"
	EchoPort         = 8080 // netexec's HTTP port in the pod
	ServicePort      = 80
	echoLabel        = "app.kubernetes.io/name"
)

// Workload is what verify creates; Options.Customize may change it before
// it is created.
type Workload struct {
	Namespace  *corev1.Namespace
	Deployment *appsv1.Deployment
	// ClusterIP is the Service "echo"; NodePort the Service "echo-nodeport".
	ClusterIP *corev1.Service
	NodePort  *corev1.Service
}

// workload is the test workload in its namespace, and what was learnt of it.
type workload struct {
	r    *run
	ns   string
	spec Workload

	done      chan struct{} // closed when create returned
	createErr error

	pods      []corev1.Pod // ready echo pods
	clusterIP string
	nodePort  int32
}

// replicas is one echo pod per schedulable Ready node, 2 to 16.
func (r *run) replicas(ctx context.Context) int32 {
	if r.o.Replicas > 0 {
		return int32(r.o.Replicas)
	}
	n := 0
	if list, err := r.o.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{}); err == nil {
		for i := range list.Items {
			if !list.Items[i].Spec.Unschedulable && nodeReady(&list.Items[i]) {
				n++
			}
		}
	}
	return int32(min(max(n, 2), 16))
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// EchoWorkload returns the workload of namespace ns: an agnhost netexec
// Deployment spread over the nodes (one pod per node, control planes
// included), a ClusterIP and a NodePort Service in front of it.
func EchoWorkload(ns, image string, pull corev1.PullPolicy, replicas int32) Workload {
	labels := map[string]string{echoLabel: EchoName, ManagedByLabel: ManagedBy}
	sel := map[string]string{echoLabel: EchoName}
	svc := func(name string, typ corev1.ServiceType) *corev1.Service {
		return &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
			Spec: corev1.ServiceSpec{
				Type:     typ,
				Selector: sel,
				Ports: []corev1.ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: ServicePort,
					TargetPort: intstr.FromInt32(EchoPort)}},
			},
		}
	}
	return Workload{
		Namespace: &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{ManagedByLabel: ManagedBy}}},
		Deployment: &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: EchoName, Namespace: ns, Labels: labels},
			Spec: appsv1.DeploymentSpec{
				Replicas: ptr.To(replicas),
				Selector: &metav1.LabelSelector{MatchLabels: sel},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels},
					Spec: corev1.PodSpec{
						// Every node, control planes too: the agent runs there.
						Tolerations: []corev1.Toleration{{Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}},
						TopologySpreadConstraints: []corev1.TopologySpreadConstraint{{
							MaxSkew:           1,
							TopologyKey:       corev1.LabelHostname,
							WhenUnsatisfiable: corev1.DoNotSchedule,
							LabelSelector:     &metav1.LabelSelector{MatchLabels: sel},
						}},
						AutomountServiceAccountToken:  ptr.To(false),
						TerminationGracePeriodSeconds: ptr.To[int64](1),
						Containers: []corev1.Container{{
							Name:            EchoName,
							Image:           image,
							ImagePullPolicy: pull,
							Args:            []string{"netexec", fmt.Sprintf("--http-port=%d", EchoPort)},
							Ports:           []corev1.ContainerPort{{Name: "http", ContainerPort: EchoPort, Protocol: corev1.ProtocolTCP}},
							ReadinessProbe: &corev1.Probe{
								ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(EchoPort)}},
								PeriodSeconds: 2,
							},
						}},
					},
				},
			},
		},
		ClusterIP: svc(EchoName, corev1.ServiceTypeClusterIP),
		NodePort:  svc(EchoNodePortName, corev1.ServiceTypeNodePort),
	}
}

func (r *run) newWorkload(ctx context.Context) *workload {
	ns := NamespacePrefix + randomSuffix()
	w := &workload{r: r, ns: ns, done: make(chan struct{})}
	w.spec = EchoWorkload(ns, r.o.Image, r.o.PullPolicy, r.replicas(ctx))
	if r.o.Customize != nil {
		r.o.Customize(&w.spec)
	}
	return w
}

// create creates the namespace and the workload.
func (w *workload) create(ctx context.Context) error {
	defer close(w.done)
	cs := w.r.o.Client
	w.r.o.Logf("creating namespace %s with %d echo pods", w.ns, ptr.Deref(w.spec.Deployment.Spec.Replicas, 1))
	if _, err := cs.CoreV1().Namespaces().Create(ctx, w.spec.Namespace, metav1.CreateOptions{}); err != nil {
		w.createErr = fmt.Errorf("create namespace %s: %w", w.ns, err)
		return w.createErr
	}
	if _, err := cs.AppsV1().Deployments(w.ns).Create(ctx, w.spec.Deployment, metav1.CreateOptions{}); err != nil {
		w.createErr = fmt.Errorf("create Deployment %s/%s: %w", w.ns, w.spec.Deployment.Name, err)
		return w.createErr
	}
	for _, s := range []*corev1.Service{w.spec.ClusterIP, w.spec.NodePort} {
		if _, err := cs.CoreV1().Services(w.ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
			w.createErr = fmt.Errorf("create Service %s/%s: %w", w.ns, s.Name, err)
			return w.createErr
		}
	}
	return nil
}

// cleanup removes the namespace and waits (a while) for it to go, with a
// context of its own: it runs when ctx is cancelled too.
func (w *workload) cleanup(ctx context.Context) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	cs := w.r.o.Client
	err := cs.CoreV1().Namespaces().Delete(ctx, w.ns, metav1.DeleteOptions{PropagationPolicy: ptr.To(metav1.DeletePropagationBackground)})
	if apierrors.IsNotFound(err) {
		return
	}
	if err != nil {
		w.r.o.Logf("warning: delete namespace %s: %v", w.ns, err)
		return
	}
	for ctx.Err() == nil {
		if _, err := cs.CoreV1().Namespaces().Get(ctx, w.ns, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			w.r.o.Logf("namespace %s removed", w.ns)
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(w.r.o.Poll):
		}
	}
	w.r.o.Logf("warning: namespace %s is still terminating", w.ns)
}

func podReady(p *corev1.Pod) bool {
	if p.DeletionTimestamp != nil || p.Status.Phase != corev1.PodRunning {
		return false
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// podState says why a pod is not ready, in a few words.
func podState(p *corev1.Pod) string {
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil {
			return strings.TrimSpace(w.Reason + " " + oneLine(w.Message))
		}
		if t := cs.State.Terminated; t != nil {
			return fmt.Sprintf("terminated: %s (exit %d)", t.Reason, t.ExitCode)
		}
	}
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue && c.Message != "" {
			return oneLine(c.Reason + " " + c.Message)
		}
	}
	return string(p.Status.Phase)
}

// waitReady waits for every echo pod to be ready and the Services to have
// their addresses; it reports the echo-ready check.
func (w *workload) waitReady(ctx context.Context) Check {
	<-w.done
	if w.createErr != nil {
		return fail("test workload not created: " + w.createErr.Error())
	}
	cs := w.r.o.Client
	want := int(ptr.Deref(w.spec.Deployment.Spec.Replicas, 1))
	sel := metav1.FormatLabelSelector(w.spec.Deployment.Spec.Selector)
	ctx2, cancel := context.WithTimeout(ctx, w.r.o.WaitTimeout)
	defer cancel()
	var last []corev1.Pod
	for {
		list, err := cs.CoreV1().Pods(w.ns).List(ctx2, metav1.ListOptions{LabelSelector: sel})
		if err == nil {
			last = list.Items
			var ready []corev1.Pod
			for i := range list.Items {
				if podReady(&list.Items[i]) {
					ready = append(ready, list.Items[i])
				}
			}
			if len(ready) >= want {
				slices.SortFunc(ready, func(a, b corev1.Pod) int { return strings.Compare(a.Spec.NodeName, b.Spec.NodeName) })
				w.pods = ready
				break
			}
		}
		select {
		case <-ctx2.Done():
			var details []string
			for i := range last {
				p := &last[i]
				node := p.Spec.NodeName
				if node == "" {
					node = "unscheduled"
				}
				details = append(details, fmt.Sprintf("%s on %s: %s", p.Name, node, podState(p)))
			}
			return fail(fmt.Sprintf("%d of %d echo pods ready after %s (image %s)", countReady(last), want, w.r.o.WaitTimeout, w.r.o.Image), details...)
		case <-time.After(w.r.o.Poll):
		}
	}
	svc, err := cs.CoreV1().Services(w.ns).Get(ctx, w.spec.ClusterIP.Name, metav1.GetOptions{})
	if err != nil {
		return fail("read Service " + w.spec.ClusterIP.Name + ": " + err.Error())
	}
	w.clusterIP = svc.Spec.ClusterIP
	np, err := cs.CoreV1().Services(w.ns).Get(ctx, w.spec.NodePort.Name, metav1.GetOptions{})
	if err != nil {
		return fail("read Service " + w.spec.NodePort.Name + ": " + err.Error())
	}
	if len(np.Spec.Ports) > 0 {
		w.nodePort = np.Spec.Ports[0].NodePort
	}
	// Give the EndpointSlice controller a moment: the probes are what count.
	w.waitEndpoints(ctx, w.spec.ClusterIP.Name, want, min(10*time.Second, w.r.o.WaitTimeout))
	var details []string
	nodes := map[string]bool{}
	for _, p := range w.pods {
		nodes[p.Spec.NodeName] = true
		details = append(details, fmt.Sprintf("%s on %s (%s)", p.Name, p.Spec.NodeName, p.Status.PodIP))
	}
	return pass(fmt.Sprintf("%d/%d echo pods ready on %s; Service %s %s:%d, NodePort %d", len(w.pods), want,
		plural(len(nodes), "node"), w.spec.ClusterIP.Name, w.clusterIP, ServicePort, w.nodePort), details...)
}

func countReady(pods []corev1.Pod) int {
	n := 0
	for i := range pods {
		if podReady(&pods[i]) {
			n++
		}
	}
	return n
}

// readyEndpoints counts the ready endpoints of a Service.
func (w *workload) readyEndpoints(ctx context.Context, svc string) int {
	list, err := w.r.o.Client.DiscoveryV1().EndpointSlices(w.ns).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
	if err != nil {
		return -1
	}
	n := 0
	for _, s := range list.Items {
		for _, e := range s.Endpoints {
			if e.Conditions.Ready == nil || *e.Conditions.Ready {
				n += len(e.Addresses)
			}
		}
	}
	return n
}

func (w *workload) waitEndpoints(ctx context.Context, svc string, want int, d time.Duration) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if w.readyEndpoints(ctx, svc) >= want {
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(w.r.o.Poll):
		}
	}
}

// podNode maps pod names (what /hostname answers) to their nodes.
func (w *workload) podNode() map[string]string {
	m := map[string]string{}
	for _, p := range w.pods {
		m[p.Name] = p.Spec.NodeName
	}
	return m
}
