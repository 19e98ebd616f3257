// Package verify proves that a cluster runs without kube-proxy and that
// kpfree-agent serves its Services (`kpfree verify`, and the last step of
// init and migrate). Run returns one Check per property, each with the
// evidence it rests on:
//
//	kube-proxy-absent    no kube-proxy DaemonSet or ConfigMap in kube-system
//	no-kube-rules        no kube-proxy KUBE-* iptables/ip6tables rules and no
//	                     kube-proxy nft table on any node (over SSH)
//	agent-ready          the kpfree-agent DaemonSet has a ready pod on every node
//	echo-ready           the test workload runs, spread over the nodes
//	agent-maps           every agent's maps hold what the API says (the agent's
//	                     own model over the Services and EndpointSlices)
//	clusterip-from-pod   the echo ClusterIP answers from a pod on every node
//	clusterip-from-node  ... and from every node (over SSH)
//	nodeport             the echo NodePort answers on every node's address,
//	                     from every node
//	dns                  the Service's name resolves in a pod (CoreDNS)
//	all-backends         every echo pod answered through a Service
//
// The workload lives in a temporary namespace kpfree-verify-<random>,
// removed at the end whatever happens.
package verify

import (
	"context"
	"crypto/rand"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/kpfree/kpfree/internal/ssh"
)

// Check names, in report order.
const (
	CheckKubeProxyAbsent   = "kube-proxy-absent"
	CheckNoKubeRules       = "no-kube-rules"
	CheckAgentReady        = "agent-ready"
	CheckEchoReady         = "echo-ready"
	CheckAgentMaps         = "agent-maps"
	CheckClusterIPFromPod  = "clusterip-from-pod"
	CheckClusterIPFromNode = "clusterip-from-node"
	CheckNodePort          = "nodeport"
	CheckDNS               = "dns"
	CheckAllBackends       = "all-backends"
)

// CheckNames lists every check in report order.
func CheckNames() []string {
	return []string{CheckKubeProxyAbsent, CheckNoKubeRules, CheckAgentReady, CheckEchoReady, CheckAgentMaps,
		CheckClusterIPFromPod, CheckClusterIPFromNode, CheckNodePort, CheckDNS, CheckAllBackends}
}

// Status of a check.
type Status string

const (
	Pass Status = "pass"
	Fail Status = "fail"
	// Skip: not run, because it was not asked for, needs SSH access that was
	// not given, or needs a check that failed.
	Skip Status = "skip"
)

// Check is one verified property.
type Check struct {
	Name   string `json:"name"`
	Status Status `json:"status"`
	// Evidence says in one line what was seen.
	Evidence string `json:"evidence"`
	// Details are the lines behind it (per node, per probe).
	Details []string `json:"details,omitempty"`
	Seconds float64  `json:"seconds"`
}

// Report is the outcome of Run; with -o json it is the document on stdout.
type Report struct {
	OK bool `json:"ok"`
	// Namespace is the temporary namespace of the test workload.
	Namespace string  `json:"namespace,omitempty"`
	Seconds   float64 `json:"seconds"`
	Checks    []Check `json:"checks"`
}

// Failed returns the failed checks.
func (r Report) Failed() []Check {
	var out []Check
	for _, c := range r.Checks {
		if c.Status == Fail {
			out = append(out, c)
		}
	}
	return out
}

// FailedNames lists the failed checks' names, comma-separated.
func (r Report) FailedNames() string {
	var n []string
	for _, c := range r.Failed() {
		n = append(n, c.Name)
	}
	return strings.Join(n, ", ")
}

// Get returns the check called name.
func (r Report) Get(name string) (Check, bool) {
	for _, c := range r.Checks {
		if c.Name == name {
			return c, true
		}
	}
	return Check{}, false
}

// Host is a node reached over SSH; Name is its Node name.
type Host struct {
	Name    string
	Address string
	Exec    ssh.Executor
}

// Defaults of Options.
const (
	DefaultImage          = "registry.k8s.io/e2e-test-images/agnhost:2.53"
	DefaultAgentNamespace = "kube-system"
	DefaultAgentDaemonSet = "kpfree-agent"
	DefaultTries          = 10
	DefaultWaitTimeout    = 3 * time.Minute
	// NamespacePrefix starts the name of the temporary namespace.
	NamespacePrefix = "kpfree-verify-"
	// ManagedByLabel marks everything verify creates.
	ManagedByLabel = "app.kubernetes.io/managed-by"
	ManagedBy      = "kpfree-verify"
)

// Options of Run.
type Options struct {
	Client kubernetes.Interface
	// RESTConfig is needed to exec into the agent pods (agent-maps); without
	// it the maps are checked through the agents' metrics.
	RESTConfig *rest.Config
	// Pods reaches into pods; nil: through the API server (APIPods).
	Pods PodAccess
	// Hosts are the nodes reached over SSH; without them no-kube-rules,
	// clusterip-from-node and nodeport are skipped.
	Hosts []Host

	// Image of the echo server: agnhost (`netexec`); PullPolicy default
	// IfNotPresent.
	Image      string
	PullPolicy corev1.PullPolicy
	// Replicas of the echo Deployment; 0: one per schedulable Ready node,
	// at least 2, at most 16.
	Replicas int
	// Tries is how many requests each probe makes (DefaultTries).
	Tries int

	AgentNamespace string
	AgentDaemonSet string

	// Concurrency bounds the nodes probed at once over SSH (default 10).
	Concurrency int
	// WaitTimeout bounds the wait for the workload (DefaultWaitTimeout).
	WaitTimeout time.Duration
	// Only runs these checks (and reports the others as skipped); empty:
	// all.
	Only []string
	// KeepNamespace leaves the namespace in place (debugging).
	KeepNamespace bool
	// Customize may change the workload before it is created: a
	// nodeSelector, tolerations, an image pull secret... Tests use it to
	// break it (a Service without endpoints).
	Customize func(*Workload)
	// Logf receives progress lines.
	Logf func(format string, a ...any)
	// Poll is the interval of the waits (1s).
	Poll time.Duration
}

func (o *Options) setDefaults() {
	if o.Image == "" {
		o.Image = DefaultImage
	}
	if o.PullPolicy == "" {
		o.PullPolicy = corev1.PullIfNotPresent
	}
	if o.Tries <= 0 {
		o.Tries = DefaultTries
	}
	if o.AgentNamespace == "" {
		o.AgentNamespace = DefaultAgentNamespace
	}
	if o.AgentDaemonSet == "" {
		o.AgentDaemonSet = DefaultAgentDaemonSet
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 10
	}
	if o.WaitTimeout <= 0 {
		o.WaitTimeout = DefaultWaitTimeout
	}
	if o.Logf == nil {
		o.Logf = func(string, ...any) {}
	}
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	if o.Pods == nil && o.Client != nil {
		o.Pods = &APIPods{Client: o.Client, Config: o.RESTConfig}
	}
}

// run is one verification in progress.
type run struct {
	o      Options
	mu     sync.Mutex
	checks map[string]*Check
}

func (r *run) wanted(name string) bool { return len(r.o.Only) == 0 || slices.Contains(r.o.Only, name) }

// record stores a check's result.
func (r *run) record(c Check) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.checks[c.Name] = &c
}

// do runs fn as check name unless it is not wanted, timing it.
func (r *run) do(name string, fn func() Check) {
	if !r.wanted(name) {
		r.record(Check{Name: name, Status: Skip, Evidence: "not asked for"})
		return
	}
	start := time.Now()
	c := fn()
	c.Name = name
	c.Seconds = roundSeconds(time.Since(start))
	r.record(c)
}

func roundSeconds(d time.Duration) float64 {
	return float64(d.Round(10*time.Millisecond)) / float64(time.Second)
}

func pass(evidence string, details ...string) Check {
	return Check{Status: Pass, Evidence: evidence, Details: details}
}

func fail(evidence string, details ...string) Check {
	return Check{Status: Fail, Evidence: evidence, Details: details}
}

func skip(evidence string) Check { return Check{Status: Skip, Evidence: evidence} }

// Run verifies the cluster. It never returns early: every check gets a
// result, and the temporary namespace is removed even when ctx is cancelled.
func Run(ctx context.Context, o Options) Report {
	start := time.Now()
	o.setDefaults()
	r := &run{o: o, checks: map[string]*Check{}}
	rep := Report{}
	if o.Client == nil {
		for _, n := range CheckNames() {
			r.record(Check{Name: n, Status: Fail, Evidence: "no Kubernetes client"})
		}
		return r.report(rep, start)
	}

	smoke := false
	for _, n := range []string{CheckEchoReady, CheckAgentMaps, CheckClusterIPFromPod, CheckClusterIPFromNode, CheckNodePort, CheckDNS, CheckAllBackends} {
		smoke = smoke || r.wanted(n)
	}
	var w *workload
	if smoke {
		w = r.newWorkload(ctx)
		rep.Namespace = w.ns
		// The pods start while the other checks run.
		go func() { _ = w.create(ctx) }()
		defer func() {
			<-w.done
			if o.KeepNamespace {
				o.Logf("keeping namespace %s", w.ns)
				return
			}
			w.cleanup(ctx)
		}()
	}

	r.do(CheckKubeProxyAbsent, func() Check { return r.kubeProxyAbsent(ctx) })
	r.do(CheckNoKubeRules, func() Check { return r.noKubeRules(ctx) })
	r.do(CheckAgentReady, func() Check { return r.agentReady(ctx) })
	if smoke {
		r.smoke(ctx, w)
	}
	return r.report(rep, start)
}

func (r *run) report(rep Report, start time.Time) Report {
	rep.OK = true
	for _, n := range CheckNames() {
		c, ok := r.checks[n]
		if !ok {
			c = &Check{Name: n, Status: Skip, Evidence: "not run"}
		}
		if c.Status == Fail {
			rep.OK = false
		}
		rep.Checks = append(rep.Checks, *c)
	}
	rep.Seconds = roundSeconds(time.Since(start))
	return rep
}

func randomSuffix() string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = letters[int(b[i])%len(letters)]
	}
	return string(b)
}

// plural returns "1 node" or "3 nodes".
func plural(n int, word string) string {
	if n == 1 {
		return fmt.Sprintf("1 %s", word)
	}
	if strings.HasSuffix(word, "s") {
		return fmt.Sprintf("%d %ses", n, word)
	}
	return fmt.Sprintf("%d %ss", n, word)
}
