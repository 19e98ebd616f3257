package install

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"helm.sh/helm/v3/pkg/release"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kpfree/kpfree/test/kubeenv"
)

// apiserver starts a real etcd + kube-apiserver (no controller manager, no
// kubelets: DaemonSets get no status and no pods) and returns options for it
// and a clientset.
func apiserver(t *testing.T) (Options, kubernetes.Interface) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: starts etcd and kube-apiserver")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cp, err := kubeenv.Start(ctx, kubeenv.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop)
	rc, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	o := Options{
		Kubeconfig: cp.Kubeconfig,
		Values: Values{
			APIServerHost: "198.18.0.11",
			Image:         Image{Repository: "localhost/kpfree-agent", Tag: "dev", PullPolicy: "Never"},
			CgroupMount:   "/sys/fs/cgroup/unified",
			CgroupRoot:    "/sys/fs/cgroup/unified/kpfree-lab/$(NODE_NAME)",
		},
		Timeout: 30 * time.Second,
		Log:     t.Logf,
	}
	return o, cs
}

// objectsLeft lists the chart's objects that exist, and the Helm release secrets.
func objectsLeft(t *testing.T, cs kubernetes.Interface) []string {
	t.Helper()
	ctx := context.Background()
	var left []string
	check := func(kind string, err error) {
		switch {
		case err == nil:
			left = append(left, kind)
		case !apierrors.IsNotFound(err):
			t.Fatalf("get %s: %v", kind, err)
		}
	}
	_, err := cs.AppsV1().DaemonSets("kube-system").Get(ctx, "kpfree-agent", metav1.GetOptions{})
	check("DaemonSet", err)
	_, err = cs.CoreV1().ServiceAccounts("kube-system").Get(ctx, "kpfree-agent", metav1.GetOptions{})
	check("ServiceAccount", err)
	_, err = cs.CoreV1().ConfigMaps("kube-system").Get(ctx, "kpfree-agent-config", metav1.GetOptions{})
	check("ConfigMap", err)
	_, err = cs.RbacV1().ClusterRoles().Get(ctx, "kpfree-agent", metav1.GetOptions{})
	check("ClusterRole", err)
	_, err = cs.RbacV1().ClusterRoleBindings().Get(ctx, "kpfree-agent", metav1.GetOptions{})
	check("ClusterRoleBinding", err)
	secrets, err := cs.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{LabelSelector: "owner=helm,name=kpfree-agent"})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range secrets.Items {
		left = append(left, "Secret/"+s.Name)
	}
	return left
}

func getDS(t *testing.T, cs kubernetes.Interface) *appsv1.DaemonSet {
	t.Helper()
	ds, err := cs.AppsV1().DaemonSets("kube-system").Get(context.Background(), "kpfree-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return ds
}

func history(t *testing.T, o Options) []string {
	t.Helper()
	o.setDefaults()
	c, err := newClient(o)
	if err != nil {
		t.Fatal(err)
	}
	h, err := c.history()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range h {
		out = append(out, r.Info.Status.String())
	}
	return out
}

func TestIntegrationInstallUpgradeUninstall(t *testing.T) {
	o, cs := apiserver(t)
	ctx := context.Background()
	o.NoWait = true // no kubelets: no agent will ever be ready

	// Dry run first: checked against the server, nothing created.
	dry := o
	dry.DryRun = true
	res, err := Install(ctx, dry)
	if err != nil {
		t.Fatal(err)
	}
	if !res.DryRun || res.Action != "install" || !strings.Contains(res.Manifest, "kind: DaemonSet") {
		t.Errorf("dry run result %+v", res)
	}
	if left := objectsLeft(t, cs); len(left) > 0 {
		t.Fatalf("dry run created %v", left)
	}

	res, err = Install(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	if res.Action != "install" || res.Revision != 1 || res.Status != "deployed" || res.DaemonSet != "kpfree-agent" {
		t.Errorf("install result: action %s revision %d status %s ds %s", res.Action, res.Revision, res.Status, res.DaemonSet)
	}
	if left := objectsLeft(t, cs); len(left) != 6 {
		t.Errorf("after install: %v", left)
	}
	ds := getDS(t, cs)
	c := ds.Spec.Template.Spec.Containers[0]
	if c.Image != "localhost/kpfree-agent:dev" || c.ImagePullPolicy != corev1.PullNever {
		t.Errorf("image %s %s", c.Image, c.ImagePullPolicy)
	}
	args := strings.Join(c.Args, " ")
	for _, want := range []string{"--k8s-api-server=https://198.18.0.11:6443", "--cgroup-root=/run/kpfree/cgroupv2/kpfree-lab/$(NODE_NAME)", "--node-name=$(NODE_NAME)"} {
		if !strings.Contains(args, want) {
			t.Errorf("args %q lack %s", args, want)
		}
	}
	if ds.Spec.Template.Spec.ServiceAccountName != "kpfree-agent" || !ds.Spec.Template.Spec.HostNetwork {
		t.Errorf("pod spec %+v", ds.Spec.Template.Spec)
	}
	cm, err := cs.CoreV1().ConfigMaps("kube-system").Get(ctx, "kpfree-agent-config", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(cm.Data["config.yaml"], `apiServer: "https://198.18.0.11:6443"`) {
		t.Errorf("config.yaml:\n%s", cm.Data["config.yaml"])
	}
	crb, err := cs.RbacV1().ClusterRoleBindings().Get(ctx, "kpfree-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := (rbacv1.Subject{Kind: "ServiceAccount", Name: "kpfree-agent", Namespace: "kube-system"}); len(crb.Subjects) != 1 || crb.Subjects[0] != want {
		t.Errorf("binding subjects %+v", crb.Subjects)
	}

	// The same release through a rest.Config instead of a kubeconfig file.
	rc, err := clientcmd.BuildConfigFromFlags("", o.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	st, err := Status(ctx, Options{RESTConfig: rc})
	if err != nil {
		t.Fatal(err)
	}
	if st.Revision != 1 || st.Status != "deployed" || st.Chart != "kpfree-agent-0.1.0" || st.Agents == nil || st.Values["k8sServiceHost"] != "198.18.0.11" {
		t.Errorf("status %+v", st)
	}

	// Upgrade: a new tag, and privileged (the API server accepts
	// Bidirectional bpffs propagation only for a privileged container).
	up := o
	up.Values.Image.Tag = "dev2"
	up.Values.Privileged = true
	res, err = Install(ctx, up)
	if err != nil {
		t.Fatal(err)
	}
	if res.Action != "upgrade" || res.Revision != 2 {
		t.Errorf("upgrade result: action %s revision %d", res.Action, res.Revision)
	}
	ds = getDS(t, cs)
	c = ds.Spec.Template.Spec.Containers[0]
	if c.Image != "localhost/kpfree-agent:dev2" || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged || ds.Generation != 2 {
		t.Errorf("after upgrade: image %s, security %+v, generation %d", c.Image, c.SecurityContext, ds.Generation)
	}
	if h := strings.Join(history(t, o), ","); h != "superseded,deployed" {
		t.Errorf("history %s", h)
	}

	// A dry-run upgrade changes nothing.
	dry = up
	dry.DryRun = true
	dry.Values.Image.Tag = "dev3"
	if _, err := Install(ctx, dry); err != nil {
		t.Fatal(err)
	}
	if img := getDS(t, cs).Spec.Template.Spec.Containers[0].Image; img != "localhost/kpfree-agent:dev2" {
		t.Errorf("dry-run upgrade changed the image to %s", img)
	}
	if st, _ := Status(ctx, o); st.Revision != 2 {
		t.Errorf("dry-run upgrade made revision %d", st.Revision)
	}

	removed, err := Uninstall(ctx, o)
	if err != nil || !removed {
		t.Fatalf("uninstall: %v %v", removed, err)
	}
	if left := objectsLeft(t, cs); len(left) > 0 {
		t.Errorf("after uninstall: %v", left)
	}
	removed, err = Uninstall(ctx, o)
	if err != nil || removed {
		t.Errorf("second uninstall: %v %v", removed, err)
	}
	if _, err := Status(ctx, o); !errors.Is(err, ErrNotInstalled) {
		t.Errorf("status after uninstall: %v", err)
	}
}

// TestIntegrationInstallConflictRefused: a ClusterRole of the same name that
// the release does not own stops the install before anything is created.
func TestIntegrationInstallConflictRefused(t *testing.T) {
	o, cs := apiserver(t)
	ctx := context.Background()
	o.NoWait = true
	foreign := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "kpfree-agent", Labels: map[string]string{"owner": "someone"}},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get"}}}}
	if _, err := cs.RbacV1().ClusterRoles().Create(ctx, foreign, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err := Install(ctx, o)
	if err == nil {
		t.Fatal("install over a foreign ClusterRole succeeded")
	}
	t.Logf("install: %v", err)
	for _, want := range []string{"ClusterRole", "kpfree-agent", "exists"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q", want)
		}
	}
	if left := objectsLeft(t, cs); len(left) != 1 || left[0] != "ClusterRole" {
		t.Errorf("left: %v, want only the foreign ClusterRole", left)
	}
	cr, err := cs.RbacV1().ClusterRoles().Get(ctx, "kpfree-agent", metav1.GetOptions{})
	if err != nil || cr.Labels["owner"] != "someone" || len(cr.Rules) != 1 || cr.Rules[0].Resources[0] != "pods" {
		t.Errorf("foreign ClusterRole changed: %+v %v", cr, err)
	}
}

// TestIntegrationInstallRolledBack: the API server rejects the DaemonSet
// after the ServiceAccount, ConfigMap and RBAC objects were created; the
// install is undone.
func TestIntegrationInstallRolledBack(t *testing.T) {
	o, cs := apiserver(t)
	ctx := context.Background()
	o.NoWait = true
	bad := o
	// The schema accepts any string as a quantity; the API server does not.
	bad.ExtraValues = map[string]any{"resources": map[string]any{"limits": map[string]any{"cpu": "lots"}}}

	_, err := Install(ctx, bad)
	var rb *RolledBackError
	if !errors.As(err, &rb) || rb.Revision != 0 {
		t.Fatalf("install with a bad quantity: %v, want a rollback to nothing", err)
	}
	t.Logf("install: %v", err)
	if !strings.Contains(err.Error(), "quantities must match") {
		t.Errorf("error does not say what the server rejected: %v", err)
	}
	if left := objectsLeft(t, cs); len(left) > 0 {
		t.Errorf("left after a rolled back install: %v", left)
	}

	// The same failure on upgrade goes back to the deployed revision.
	if _, err := Install(ctx, o); err != nil {
		t.Fatal(err)
	}
	bad.Values.Image.Tag = "broken"
	_, err = Install(ctx, bad)
	if !errors.As(err, &rb) || rb.Revision != 1 {
		t.Fatalf("upgrade with a bad quantity: %v, want a rollback to revision 1", err)
	}
	t.Logf("upgrade: %v", err)
	if img := getDS(t, cs).Spec.Template.Spec.Containers[0].Image; img != "localhost/kpfree-agent:dev" {
		t.Errorf("image after rollback: %s", img)
	}
	if h := strings.Join(history(t, o), ","); h != "superseded,failed,deployed" {
		t.Errorf("history %s", h)
	}
	st, err := Status(ctx, o)
	if err != nil || st.Revision != 3 || st.Status != release.StatusDeployed.String() || !strings.Contains(st.Description, "Rollback to 1") {
		t.Errorf("status after rollback: %+v %v", st, err)
	}
}

// TestIntegrationWait: the wait names the nodes without a ready agent, and an
// install whose agents never become ready is rolled back.
func TestIntegrationWait(t *testing.T) {
	o, cs := apiserver(t)
	ctx := context.Background()

	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-x"}}
	if _, err := cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	o.Timeout = 5 * time.Second
	t0 := time.Now()
	_, err := Install(ctx, o)
	var rb *RolledBackError
	var nr *NotReadyError
	if !errors.As(err, &rb) || !errors.As(err, &nr) {
		t.Fatalf("install without kubelets: %v, want a rolled back NotReadyError", err)
	}
	t.Logf("install (%s): %v", time.Since(t0).Round(time.Millisecond), err)
	if !strings.Contains(err.Error(), "- node-x: no agent pod; the node is not Ready") {
		t.Errorf("error does not name node-x:\n%v", err)
	}
	if d := time.Since(t0); d > 20*time.Second {
		t.Errorf("install took %s with a 5s timeout", d)
	}
	if left := objectsLeft(t, cs); len(left) > 0 {
		t.Errorf("left: %v", left)
	}

	// Play the DaemonSet controller and the kubelets: a ready pod on node-a,
	// a crashing one on node-b, none on node-x.
	o.NoWait = true
	if _, err := Install(ctx, o); err != nil {
		t.Fatal(err)
	}
	ds := getDS(t, cs)
	gen := ds.Annotations[templateGenerationAnnotation]
	setNodeReady := func(name string) {
		n, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
		if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setNodeReady("node-a")
	setNodeReady("node-b")
	ctrl := true
	makePod := func(node string, ready bool, cstat corev1.ContainerStatus) {
		labels := map[string]string{templateGenerationLabel: gen}
		for k, v := range ds.Spec.Selector.MatchLabels {
			labels[k] = v
		}
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "kpfree-agent-" + node, Namespace: "kube-system", Labels: labels,
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: ds.Name, UID: ds.UID, Controller: &ctrl}}},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "kpfree-agent", AutomountServiceAccountToken: new(bool),
				Containers: []corev1.Container{{Name: "agent", Image: "localhost/kpfree-agent:dev"}}},
		}
		p, err := cs.CoreV1().Pods("kube-system").Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		st := corev1.ConditionFalse
		if ready {
			st = corev1.ConditionTrue
		}
		p.Status = corev1.PodStatus{Phase: corev1.PodRunning,
			Conditions:        []corev1.PodCondition{{Type: corev1.PodReady, Status: st}},
			ContainerStatuses: []corev1.ContainerStatus{cstat}}
		if _, err := cs.CoreV1().Pods("kube-system").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	makePod("node-a", true, corev1.ContainerStatus{Name: "agent", Ready: true, State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}})
	makePod("node-b", false, corev1.ContainerStatus{Name: "agent", RestartCount: 3,
		State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "CrashLoopBackOff", Message: "back-off 40s restarting failed container"}},
		LastTerminationState: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{Reason: "Error", ExitCode: 1,
			Message: "error: attach cgroup: operation not permitted"}}})
	setDSStatus := func(desired, ready int32) {
		ds := getDS(t, cs)
		ds.Status = appsv1.DaemonSetStatus{ObservedGeneration: ds.Generation, DesiredNumberScheduled: desired,
			CurrentNumberScheduled: desired, UpdatedNumberScheduled: desired, NumberReady: ready, NumberAvailable: ready}
		if _, err := cs.AppsV1().DaemonSets("kube-system").UpdateStatus(ctx, ds, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setDSStatus(2, 1)

	_, err = WaitForAgents(ctx, cs, "kube-system", "kpfree-agent", 3*time.Second)
	if !errors.As(err, &nr) {
		t.Fatalf("wait: %v", err)
	}
	t.Logf("wait: %v", err)
	msg := err.Error()
	for _, want := range []string{"not ready on 2 of 3 nodes", "- node-b: pod kpfree-agent-node-b Running; container agent waiting: CrashLoopBackOff",
		"last terminated: Error (exit code 1): error: attach cgroup: operation not permitted", "- node-x: no agent pod; the node is not Ready"} {
		if !strings.Contains(msg, want) {
			t.Errorf("wait error lacks %q", want)
		}
	}
	if strings.Contains(msg, "- node-a") {
		t.Error("wait error names node-a, whose agent is ready")
	}

	// Once every node has a ready agent, the wait is over.
	if err := cs.CoreV1().Nodes().Delete(ctx, "node-x", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := cs.CoreV1().Pods("kube-system").Delete(ctx, "kpfree-agent-node-b", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	makePod("node-b", true, corev1.ContainerStatus{Name: "agent", Ready: true, State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}})
	setDSStatus(2, 2)
	a, err := WaitForAgents(ctx, cs, "kube-system", "kpfree-agent", 10*time.Second)
	if err != nil {
		t.Fatalf("wait with every agent ready: %v", err)
	}
	if len(a.Nodes) != 2 || !a.Ok() {
		t.Errorf("agents %s", a)
	}
	st, err := Status(ctx, o)
	if err != nil || st.Agents == nil || !st.Agents.Ok() {
		t.Errorf("status: %+v %v", st, err)
	}
}
