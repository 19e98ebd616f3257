package verify

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"net/netip"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"

	"github.com/kpfree/kpfree/agent"
	"github.com/kpfree/kpfree/internal/ssh"
)

// cluster is a fake cluster: Nodes cp1 and w1, the agent DaemonSet with a
// pod per node, and a fake "kubelet + EndpointSlice controller" that runs
// the echo pods and fills the Services' endpoints as the real ones would.
type cluster struct {
	t  *testing.T
	cs *fake.Clientset

	mu sync.Mutex
	// pods of the echo Deployment, by name -> node.
	echo      map[string]string
	clusterIP string
	// broken says what is wrong.
	noAgentOn string // node without an agent pod
	kubeRule  string // node with a kube-proxy rule left
	kubeProxy bool   // kube-proxy DaemonSet and ConfigMap present
}

var nodes = []struct{ name, ip string }{{"cp1", "10.0.0.11"}, {"w1", "10.0.0.21"}}

func newCluster(t *testing.T, mutate func(*cluster)) *cluster {
	c := &cluster{t: t, echo: map[string]string{}}
	if mutate != nil {
		mutate(c)
	}
	var objs []runtime.Object
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: "kpfree-agent", Namespace: "kube-system", UID: "ds-uid", Generation: 1,
			Annotations: map[string]string{"deprecated.daemonset.template.generation": "1"}},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "kpfree-agent"}},
			Template: corev1.PodTemplateSpec{Spec: corev1.PodSpec{Containers: []corev1.Container{{
				Name: "agent", Args: []string{"run", "--health-addr=:9876"}, Ports: []corev1.ContainerPort{{Name: "health", ContainerPort: 9876}},
			}}}},
		},
		Status: appsv1.DaemonSetStatus{ObservedGeneration: 1, DesiredNumberScheduled: 2, NumberReady: 2, UpdatedNumberScheduled: 2, NumberAvailable: 2},
	}
	objs = append(objs, ds, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "kube-dns-x", Namespace: "kube-system", Labels: map[string]string{discoveryv1.LabelServiceName: "kube-dns"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.244.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}}},
	})
	for _, n := range nodes {
		objs = append(objs, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n.name},
			Status: corev1.NodeStatus{
				Addresses:  []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.ip}},
				Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}},
			},
		})
		if n.name == c.noAgentOn {
			continue
		}
		objs = append(objs, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "kpfree-agent-" + n.name, Namespace: "kube-system",
				Labels:          map[string]string{"app": "kpfree-agent", "pod-template-generation": "1"},
				OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "kpfree-agent", UID: "ds-uid", Controller: ptr.To(true)}}},
			Spec: corev1.PodSpec{NodeName: n.name},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: n.ip,
				Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
		})
	}
	if c.kubeProxy {
		objs = append(objs,
			&appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "kube-proxy", Namespace: "kube-system"},
				Status: appsv1.DaemonSetStatus{DesiredNumberScheduled: 2, NumberReady: 2}},
			&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "kube-proxy", Namespace: "kube-system"}})
	}
	c.cs = fake.NewClientset(objs...)
	c.cs.PrependReactor("create", "deployments", c.runDeployment)
	c.cs.PrependReactor("create", "services", c.allocate)
	return c
}

// runDeployment starts the echo pods, one per node, ready at once.
func (c *cluster) runDeployment(a k8stesting.Action) (bool, runtime.Object, error) {
	d := a.(k8stesting.CreateAction).GetObject().(*appsv1.Deployment)
	for i := range int(*d.Spec.Replicas) {
		n := nodes[i%len(nodes)]
		name := fmt.Sprintf("%s-%d", d.Name, i)
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: d.Namespace, Labels: d.Spec.Template.Labels},
			Spec:       corev1.PodSpec{NodeName: n.name},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: fmt.Sprintf("10.244.%d.10", i),
				Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
		}
		if err := c.cs.Tracker().Add(p); err != nil {
			c.t.Error(err)
		}
		c.mu.Lock()
		c.echo[name] = n.name
		c.mu.Unlock()
	}
	return false, nil, nil
}

// allocate gives a Service its ClusterIP and NodePort and, as the
// EndpointSlice controller, the endpoints its selector matches.
func (c *cluster) allocate(a k8stesting.Action) (bool, runtime.Object, error) {
	s := a.(k8stesting.CreateAction).GetObject().(*corev1.Service)
	ip := "10.96.0.100"
	if s.Spec.Type == corev1.ServiceTypeNodePort {
		ip = "10.96.0.101"
		s.Spec.Ports[0].NodePort = 30080
	} else {
		c.mu.Lock()
		c.clusterIP = ip
		c.mu.Unlock()
	}
	s.Spec.ClusterIP, s.Spec.ClusterIPs = ip, []string{ip}
	// The fake's lock is held while a reactor runs: use the tracker.
	obj, err := c.cs.Tracker().List(schema.GroupVersionResource{Version: "v1", Resource: "pods"}, schema.GroupVersionKind{Version: "v1", Kind: "Pod"}, s.Namespace)
	if err != nil {
		return true, nil, err
	}
	pods := obj.(*corev1.PodList)
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: s.Name + "-abc", Namespace: s.Namespace, Labels: map[string]string{discoveryv1.LabelServiceName: s.Name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](EchoPort), Protocol: ptr.To(corev1.ProtocolTCP)}},
	}
	for _, p := range pods.Items {
		match := len(s.Spec.Selector) > 0
		for k, v := range s.Spec.Selector {
			match = match && p.Labels[k] == v
		}
		if match {
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{p.Status.PodIP},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)}, NodeName: ptr.To(p.Spec.NodeName)})
		}
	}
	if err := c.cs.Tracker().Add(es); err != nil {
		c.t.Error(err)
	}
	return false, nil, nil
}

// backends are the pods behind a Service, from its EndpointSlices.
func (c *cluster) backends(ns, svc string) []string {
	list, _ := c.cs.DiscoveryV1().EndpointSlices(ns).List(context.Background(), metav1.ListOptions{})
	var out []string
	for _, es := range list.Items {
		if es.Labels[discoveryv1.LabelServiceName] != svc {
			continue
		}
		for _, e := range es.Endpoints {
			c.mu.Lock()
			for name := range c.echo {
				if pods, _ := c.cs.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{}); pods != nil && pods.Status.PodIP == e.Addresses[0] {
					out = append(out, name)
				}
			}
			c.mu.Unlock()
		}
	}
	return out
}

// answer is what a request to a Service gets: the i-th backend, or a
// refusal when it has none (the agent refuses connections to a frontend
// without backends).
func (c *cluster) answer(ns, svc, target string, i int) (string, error) {
	bs := c.backends(ns, svc)
	if len(bs) == 0 {
		return "", fmt.Errorf("dial tcp %s: connect: connection refused", target)
	}
	return bs[i%len(bs)], nil
}

// pods is the fake PodAccess: /dial from an echo pod, the agent's
// `services -o json` from the model.
type pods struct{ c *cluster }

// fakeAgentOptions are the model options every fake agent runs with: a
// NodePort address and loopback, so agent-maps must take them from
// /options to match.
func fakeAgentOptions(node string) agent.Options {
	return agent.Options{NodeName: node, NodeAddrs: []netip.Addr{netip.MustParseAddr("192.0.2.1")}, LoopbackNodePort: true}
}

func (p pods) ProxyGet(_ context.Context, ns, pod string, port int, path string, params map[string]string) ([]byte, error) {
	if path == "/options" {
		return json.Marshal(fakeAgentOptions(strings.TrimPrefix(pod, "kpfree-agent-")))
	}
	if path != "/dial" {
		return nil, fmt.Errorf("fake: no %s", path)
	}
	var d dialResult
	tries := 1
	fmt.Sscan(params["tries"], &tries)
	svc := EchoName
	if !strings.HasPrefix(params["host"], "10.") && !strings.HasPrefix(params["host"], EchoName+"."+ns+".") {
		return nil, fmt.Errorf("the server rejected our request: lookup %s: no such host", params["host"])
	}
	for i := range tries {
		h, err := p.c.answer(ns, svc, params["host"]+":"+params["port"], i)
		if err != nil {
			d.Errors = append(d.Errors, err.Error())
			continue
		}
		d.Responses = append(d.Responses, h)
	}
	return json.Marshal(d)
}

func (p pods) Exec(ctx context.Context, ns, pod, container string, cmd []string) ([]byte, []byte, error) {
	if strings.Join(cmd, " ") != strings.Join(AgentServicesCommand, " ") {
		return nil, nil, fmt.Errorf("fake: unexpected exec %v", cmd)
	}
	node := strings.TrimPrefix(pod, "kpfree-agent-")
	svcs, _ := p.c.cs.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	eps, _ := p.c.cs.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
	var sp []*corev1.Service
	for i := range svcs.Items {
		sp = append(sp, &svcs.Items[i])
	}
	var ep []*discoveryv1.EndpointSlice
	for i := range eps.Items {
		ep = append(ep, &eps.Items[i])
	}
	var out []agentService
	for f, bs := range desired(sp, ep, node, fakeAgentOptions(node).Model()) {
		out = append(out, agentService{Frontend: f, Backends: bs})
	}
	b, err := json.Marshal(out)
	return b, nil, err
}

// node is a fake node over SSH: it answers RulesScript and the probe
// scripts.
type node struct {
	name string
	c    *cluster
}

func (n *node) Name() string { return n.name }
func (n *node) Close() error { return nil }
func (n *node) Upload(context.Context, []byte, string, fs.FileMode) error {
	return fmt.Errorf("fake: no upload")
}

const cleanRules = `# Generated by iptables-nft-save v1.8.9 (nf_tables) on Tue Nov 25 10:00:00 2025
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment "block incoming localnet connections" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
COMMIT
`

var urlRE = regexp.MustCompile(`for u in ([^;]+); do i=0; while \[ \$i -lt (\d+) \]`)

func (n *node) Run(_ context.Context, cmd string) (ssh.Result, error) {
	if cmd == RulesScript {
		out := "@@kpfree:iptables-save\n" + cleanRules
		if n.c.kubeRule == n.name {
			out += "*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j RETURN\nCOMMIT\n"
		}
		out += "@@kpfree:ip6tables-save\n@@kpfree:nft\ntable ip filter\ntable ip6 filter\n"
		return ssh.Result{Stdout: []byte(out)}, nil
	}
	m := urlRE.FindStringSubmatch(cmd)
	if m == nil {
		return ssh.Result{ExitCode: 127, Stderr: []byte("fake: unexpected command")}, nil
	}
	var tries int
	fmt.Sscan(m[2], &tries)
	var b strings.Builder
	for _, u := range strings.Fields(m[1]) {
		pu, _ := url.Parse(u)
		svc, ns := EchoName, ""
		if strings.HasSuffix(pu.Host, ":30080") {
			svc = EchoNodePortName
		}
		nsList, _ := n.c.cs.CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{})
		for _, x := range nsList.Items {
			if strings.HasPrefix(x.Name, NamespacePrefix) {
				ns = x.Name
			}
		}
		for i := range tries {
			if h, err := n.c.answer(ns, svc, pu.Host, i); err != nil {
				fmt.Fprintf(&b, "err %s curl: (7) Failed to connect: Connection refused\n", u)
			} else {
				fmt.Fprintf(&b, "ok %s %s\n", u, h)
			}
		}
	}
	return ssh.Result{Stdout: []byte(b.String())}, nil
}

func (c *cluster) options() Options {
	o := Options{Client: c.cs, Pods: pods{c}, WaitTimeout: 2 * time.Second, Poll: 5 * time.Millisecond, Tries: 4}
	for _, n := range nodes {
		o.Hosts = append(o.Hosts, Host{Name: n.name, Address: n.ip, Exec: &node{name: n.name, c: c}})
	}
	return o
}

func TestRun(t *testing.T) {
	noEndpoints := func(w *Workload) { w.ClusterIP.Spec.Selector = map[string]string{"app": "nothing"} }
	tests := []struct {
		name      string
		mutate    func(*cluster)
		customize func(*Workload)
		// fails: the check that must fail and what its evidence must say;
		// every other check must pass.
		fails    map[string][]string
		mayFail  []string // checks that fail as a consequence
		skipped  []string
		evidence map[string]string
	}{
		{name: "healthy"},
		{
			name:   "kube-proxy present",
			mutate: func(c *cluster) { c.kubeProxy = true },
			fails:  map[string][]string{CheckKubeProxyAbsent: {"DaemonSet kube-system/kube-proxy", "ConfigMap kube-system/kube-proxy"}},
		},
		{
			name:   "a KUBE rule left on a node",
			mutate: func(c *cluster) { c.kubeRule = "w1" },
			fails:  map[string][]string{CheckNoKubeRules: {"w1", "-A KUBE-SERVICES -j RETURN"}},
		},
		{
			name:   "the agent stopped on a node",
			mutate: func(c *cluster) { c.noAgentOn = "w1" },
			fails:  map[string][]string{CheckAgentReady: {"not ready on w1 (no agent pod)"}},
		},
		{
			name:      "a Service without endpoints",
			customize: noEndpoints,
			fails: map[string][]string{
				CheckClusterIPFromPod:  {"10.96.0.100:80 failed", "connection refused", "0 ready endpoints"},
				CheckClusterIPFromNode: {"10.96.0.100:80 failed", "0 ready endpoints"},
			},
			mayFail: []string{CheckDNS},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCluster(t, tt.mutate)
			o := c.options()
			o.Customize = tt.customize
			rep := Run(context.Background(), o)
			if rep.OK != (len(tt.fails) == 0) {
				t.Errorf("OK = %v", rep.OK)
			}
			for _, ch := range rep.Checks {
				want, mustFail := tt.fails[ch.Name]
				switch {
				case mustFail:
					if ch.Status != Fail {
						t.Errorf("%s: %s (%s), want fail", ch.Name, ch.Status, ch.Evidence)
						continue
					}
					for _, w := range want {
						if !strings.Contains(ch.Evidence, w) {
							t.Errorf("%s: evidence %q lacks %q", ch.Name, ch.Evidence, w)
						}
					}
				case contains(tt.mayFail, ch.Name):
				case ch.Status != Pass:
					t.Errorf("%s: %s (%s), want pass; details:\n  %s", ch.Name, ch.Status, ch.Evidence, strings.Join(ch.Details, "\n  "))
				}
			}
			if rep.Namespace == "" || !strings.HasPrefix(rep.Namespace, NamespacePrefix) {
				t.Errorf("namespace %q", rep.Namespace)
			}
			if _, err := c.cs.CoreV1().Namespaces().Get(context.Background(), rep.Namespace, metav1.GetOptions{}); err == nil {
				t.Errorf("namespace %s left behind", rep.Namespace)
			}
		})
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// TestRunCleansUpWhenCancelled: the namespace goes even when the caller's
// context ends during the run.
func TestRunCleansUpWhenCancelled(t *testing.T) {
	c := newCluster(t, func(c *cluster) {})
	o := c.options()
	ctx, cancel := context.WithCancel(context.Background())
	var ns string
	c.cs.PrependReactor("create", "namespaces", func(a k8stesting.Action) (bool, runtime.Object, error) {
		ns = a.(k8stesting.CreateAction).GetObject().(*corev1.Namespace).Name
		cancel()
		return false, nil, nil
	})
	rep := Run(ctx, o)
	if rep.OK {
		t.Error("a cancelled run passed")
	}
	if ns == "" {
		t.Fatal("no namespace created")
	}
	if _, err := c.cs.CoreV1().Namespaces().Get(context.Background(), ns, metav1.GetOptions{}); err == nil {
		t.Errorf("namespace %s left behind", ns)
	}
}

func TestParseRules(t *testing.T) {
	out := "@@kpfree:iptables-save\n" + cleanRules +
		"*nat\n:POSTROUTING ACCEPT [0:0]\n:KUBE-POSTROUTING - [0:0]\n-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\nCOMMIT\n" +
		"@@kpfree:ip6tables-save\n# Warning: iptables-legacy tables present, use iptables-legacy-save to see them\n" +
		"@@kpfree:nft\ntable ip filter\ntable ip kube-proxy\ntable inet kube-proxy\ntable ip6 nat\n"
	found, tools := ParseRules(out)
	var got []string
	for _, f := range found {
		got = append(got, f.String())
	}
	want := []string{
		":KUBE-POSTROUTING - [0:0] (iptables-save -t nat)",
		`-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING (iptables-save -t nat)`,
		"table ip kube-proxy (nft)",
		"table inet kube-proxy (nft)",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("found:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if strings.Join(tools, ",") != "iptables-save,ip6tables-save,nft" {
		t.Errorf("tools = %v", tools)
	}
	if f, _ := ParseRules("@@kpfree:iptables-save\n" + cleanRules); len(f) != 0 {
		t.Errorf("the kubelet's own chains were reported: %v", f)
	}
}

func TestCompareMaps(t *testing.T) {
	want := expected{"10.96.0.1:443/TCP": {"10.0.0.11:6443"}, "10.96.0.10:53/UDP": {"10.244.0.2:53", "10.244.1.2:53"}}
	got := []agentService{
		{Frontend: "10.96.0.1:443/TCP", Backends: []string{"10.0.0.11:6443"}},
		{Frontend: "10.96.0.10:53/UDP", Backends: []string{"10.244.0.2:53"}},
		{Frontend: "10.96.9.9:80/TCP", Backends: []string{}},
	}
	diff := compareMaps(want, got)
	wantDiff := []string{"10.96.0.10:53/UDP has backends [10.244.0.2:53], want [10.244.0.2:53 10.244.1.2:53]", "stale 10.96.9.9:80/TCP"}
	if strings.Join(diff, "\n") != strings.Join(wantDiff, "\n") {
		t.Errorf("diff:\n%s", strings.Join(diff, "\n"))
	}
	if n, ok := metricsServices([]byte("# HELP kpfree_services x\n# TYPE kpfree_services gauge\nkpfree_services 7\n")); !ok || n != 7 {
		t.Errorf("metricsServices = %d %v", n, ok)
	}
}

func TestProbeScript(t *testing.T) {
	s := probeScript([]string{"http://10.96.0.1:80/hostname"}, 3)
	if !strings.Contains(s, `for u in http://10.96.0.1:80/hostname; do i=0; while [ $i -lt 3 ]`) {
		t.Errorf("script:\n%s", s)
	}
	res := parseProbe("ok http://a/hostname echo-0\nerr http://a/hostname curl: (7) refused \nnoise\nok http://b/hostname echo-1\n")
	if a := res["http://a/hostname"]; a.ok != 1 || a.failed != 1 || a.by["echo-0"] != 1 {
		t.Errorf("a = %+v", a)
	}
	if b := res["http://b/hostname"]; b.ok != 1 {
		t.Errorf("b = %+v", b)
	}
}
