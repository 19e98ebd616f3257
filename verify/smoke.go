package verify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kpfree/kpfree/internal/ssh"
)

// tally counts the answers and failures of a group of requests.
type tally struct {
	ok, failed int
	by         map[string]int // responder -> answers
	errs       []string
}

func (t *tally) answer(who string) {
	if t.by == nil {
		t.by = map[string]int{}
	}
	t.ok++
	t.by[who]++
}

func (t *tally) fail(err string) {
	t.failed++
	if len(t.errs) < 3 && !slices.Contains(t.errs, err) {
		t.errs = append(t.errs, err)
	}
}

func (t *tally) String() string {
	s := fmt.Sprintf("%d/%d answered", t.ok, t.ok+t.failed)
	if len(t.by) > 0 {
		s += " by " + strings.Join(sortedKeys(t.by), ", ")
	}
	if len(t.errs) > 0 {
		s += "; errors: " + strings.Join(t.errs, "; ")
	}
	return s
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// responders collects every echo pod that answered, over all probes.
type responders struct {
	mu  sync.Mutex
	got map[string]bool
}

func (r *responders) add(t *tally) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.got == nil {
		r.got = map[string]bool{}
	}
	for k := range t.by {
		r.got[k] = true
	}
}

// smoke runs the checks that need the test workload.
func (r *run) smoke(ctx context.Context, w *workload) {
	var ready Check
	r.do(CheckEchoReady, func() Check { ready = w.waitReady(ctx); return ready })
	if !r.wanted(CheckEchoReady) {
		ready = w.waitReady(ctx)
	}
	r.do(CheckAgentMaps, func() Check { return r.agentMaps(ctx) })
	if ready.Status != Pass {
		for _, n := range []string{CheckClusterIPFromPod, CheckClusterIPFromNode, CheckNodePort, CheckDNS, CheckAllBackends} {
			r.do(n, func() Check { return skip("needs " + CheckEchoReady + ", which failed: " + ready.Evidence) })
		}
		return
	}
	var seen responders
	r.do(CheckClusterIPFromPod, func() Check {
		return r.fromPods(ctx, w, &seen, w.clusterIP, "ClusterIP "+net.JoinHostPort(w.clusterIP, strconv.Itoa(ServicePort)), w.spec.ClusterIP.Name)
	})
	r.do(CheckClusterIPFromNode, func() Check { return r.clusterIPFromNodes(ctx, w, &seen) })
	r.do(CheckNodePort, func() Check { return r.nodePort(ctx, w, &seen) })
	r.do(CheckDNS, func() Check {
		name := fmt.Sprintf("%s.%s.svc.cluster.local", w.spec.ClusterIP.Name, w.ns)
		// CoreDNS starts serving once it has reached the API server through
		// the kubernetes ClusterIP, i.e. after the agent: on a new cluster
		// it may still be starting.
		if n := r.waitDNS(ctx); n == 0 {
			c := r.fromPods(ctx, w, &seen, name, "name "+name, w.spec.ClusterIP.Name)
			if c.Status == Fail {
				c.Evidence += fmt.Sprintf("; Service %s/%s (CoreDNS) has no ready endpoints", dnsNamespace, dnsService)
			}
			return c
		}
		var c Check
		for deadline := time.Now().Add(min(dnsSettle, r.o.WaitTimeout)); ; {
			c = r.fromPods(ctx, w, &seen, name, "name "+name, w.spec.ClusterIP.Name)
			if c.Status == Pass || time.Now().After(deadline) || ctx.Err() != nil {
				return c
			}
			time.Sleep(2 * time.Second)
		}
	})
	r.do(CheckAllBackends, func() Check {
		var missing, details []string
		for _, p := range w.pods {
			if seen.got[p.Name] {
				details = append(details, fmt.Sprintf("%s on %s answered", p.Name, p.Spec.NodeName))
				continue
			}
			missing = append(missing, fmt.Sprintf("%s on %s", p.Name, p.Spec.NodeName))
		}
		if len(missing) > 0 {
			return fail("never answered through a Service: "+strings.Join(missing, ", "), details...)
		}
		nodes := map[string]bool{}
		for _, p := range w.pods {
			nodes[p.Spec.NodeName] = true
		}
		return pass(fmt.Sprintf("all %d echo pods answered, on %s", len(w.pods), strings.Join(sortedKeys(nodes), ", ")), details...)
	})
}

// The cluster DNS Service (kubeadm's CoreDNS add-on).
const (
	dnsNamespace = "kube-system"
	dnsService   = "kube-dns"
	// dnsSettle is how long a failing DNS check is retried once CoreDNS has
	// ready endpoints (its caches and the agent's maps catch up).
	dnsSettle = 30 * time.Second
)

// waitDNS waits (WaitTimeout at most) for the cluster DNS Service to have
// ready endpoints and returns how many it has.
func (r *run) waitDNS(ctx context.Context) int {
	deadline := time.Now().Add(r.o.WaitTimeout)
	for {
		n := 0
		list, err := r.o.Client.DiscoveryV1().EndpointSlices(dnsNamespace).List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=" + dnsService})
		if err == nil {
			for _, s := range list.Items {
				for _, e := range s.Endpoints {
					if e.Conditions.Ready == nil || *e.Conditions.Ready {
						n += len(e.Addresses)
					}
				}
			}
		}
		if n > 0 || time.Now().After(deadline) || ctx.Err() != nil {
			return n
		}
		select {
		case <-ctx.Done():
		case <-time.After(r.o.Poll):
		}
	}
}

// errorText is an error's message with what the server answered: the API
// server's pod proxy turns a non-2xx answer into an error whose message
// hides the body.
func errorText(err error) string {
	msg := err.Error()
	var se *apierrors.StatusError
	if errors.As(err, &se) && se.ErrStatus.Details != nil {
		for _, c := range se.ErrStatus.Details.Causes {
			if c.Message != "" && !strings.Contains(msg, c.Message) {
				msg += ": " + c.Message
			}
		}
	}
	return oneLine(msg)
}

// dialResult is netexec's /dial answer.
type dialResult struct {
	Responses []string `json:"responses"`
	Errors    []string `json:"errors"`
}

// fromPods makes every echo pod (one per node) connect to target:80 Tries
// times through netexec's /dial, one new connection per request.
func (r *run) fromPods(ctx context.Context, w *workload, seen *responders, target, what, svc string) Check {
	var mu sync.Mutex
	var details, bad []string
	var all tally
	var wg sync.WaitGroup
	for _, p := range w.pods {
		wg.Go(func() {
			var t tally
			pctx, cancel := context.WithTimeout(ctx, time.Duration(r.o.Tries)*6*time.Second+30*time.Second)
			defer cancel()
			body, err := r.o.Pods.ProxyGet(pctx, w.ns, p.Name, EchoPort, "/dial", map[string]string{
				"request": "hostname", "protocol": "http", "host": target, "port": strconv.Itoa(ServicePort), "tries": strconv.Itoa(r.o.Tries),
			})
			var d dialResult
			switch {
			case err != nil:
				t.fail(errorText(err))
				t.failed += r.o.Tries - 1
			case json.Unmarshal(body, &d) != nil:
				t.fail("unreadable answer: " + oneLine(string(body)))
			default:
				for _, h := range d.Responses {
					t.answer(h)
				}
				for _, e := range d.Errors {
					t.fail(oneLine(e))
				}
			}
			seen.add(&t)
			mu.Lock()
			defer mu.Unlock()
			details = append(details, fmt.Sprintf("from pod %s on %s: %s", p.Name, p.Spec.NodeName, t.String()))
			if t.failed > 0 || t.ok == 0 {
				bad = append(bad, fmt.Sprintf("pod %s on %s (%s)", p.Name, p.Spec.NodeName, t.String()))
			}
			all.ok += t.ok
			all.failed += t.failed
			for k, n := range t.by {
				if all.by == nil {
					all.by = map[string]int{}
				}
				all.by[k] += n
			}
		})
	}
	wg.Wait()
	slices.Sort(details)
	slices.Sort(bad)
	if len(bad) > 0 {
		return fail(fmt.Sprintf("%s failed from %s%s", what, strings.Join(bad, ", "), r.endpointsNote(ctx, w, svc)), details...)
	}
	return pass(fmt.Sprintf("%s answered from pods on %s: %s", what, strings.Join(podNodes(w), ", "), all.String()), details...)
}

// endpointsNote explains a failure by the Service's ready endpoints.
func (r *run) endpointsNote(ctx context.Context, w *workload, svc string) string {
	n := w.readyEndpoints(ctx, svc)
	if n < 0 {
		return ""
	}
	note := fmt.Sprintf("; Service %s/%s has %d ready endpoints", w.ns, svc, n)
	if n == 0 {
		if s, err := r.o.Client.CoreV1().Services(w.ns).Get(ctx, svc, metav1.GetOptions{}); err == nil {
			note += fmt.Sprintf(" (selector %s)", metav1.FormatLabelSelector(&metav1.LabelSelector{MatchLabels: s.Spec.Selector}))
		}
	}
	return note
}

func podNodes(w *workload) []string {
	var out []string
	for _, p := range w.pods {
		if !slices.Contains(out, p.Spec.NodeName) {
			out = append(out, p.Spec.NodeName)
		}
	}
	return out
}

// probeScript requests every URL tries times with curl (or wget), printing
// "ok URL ANSWER" or "err URL MESSAGE" per request. It changes nothing.
func probeScript(urls []string, tries int) string {
	var b strings.Builder
	b.WriteString(`get() { if command -v curl >/dev/null 2>&1; then curl -sS --max-time 3 "$1"; ` +
		`elif command -v wget >/dev/null 2>&1; then wget -q -T 3 -O - "$1"; ` +
		`else echo "neither curl nor wget on this node" >&2; return 127; fi; }` + "\n")
	fmt.Fprintf(&b, "for u in %s; do i=0; while [ $i -lt %d ]; do "+
		`if out=$(get "$u" 2>&1); then echo "ok $u $out"; else echo "err $u $(echo "$out" | tr '\n' ' ')"; fi; i=$((i+1)); done; done`+"\n",
		strings.Join(urls, " "), tries)
	return b.String()
}

// parseProbe reads probeScript's output into one tally per URL.
func parseProbe(out string) map[string]*tally {
	res := map[string]*tally{}
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.SplitN(strings.TrimSpace(line), " ", 3)
		if len(f) < 2 || (f[0] != "ok" && f[0] != "err") {
			continue
		}
		t := res[f[1]]
		if t == nil {
			t = &tally{}
			res[f[1]] = t
		}
		msg := ""
		if len(f) == 3 {
			msg = strings.TrimSpace(f[2])
		}
		if f[0] == "ok" {
			t.answer(msg)
		} else {
			t.fail(msg)
		}
	}
	return res
}

// fromNodes runs probeScript on every host in parallel; it returns each
// host's tallies by URL, and the hosts that could not be probed.
func (r *run) fromNodes(ctx context.Context, urls []string) (map[string]map[string]*tally, map[string]error) {
	var mu sync.Mutex
	res := map[string]map[string]*tally{}
	errs := map[string]error{}
	script := probeScript(urls, r.o.Tries)
	_ = ssh.ForEach(ctx, r.o.Hosts, r.o.Concurrency, func(h Host) string { return h.Name }, func(ctx context.Context, h Host) error {
		out, err := ssh.Output(ctx, h.Exec, script)
		mu.Lock()
		defer mu.Unlock()
		if err != nil {
			errs[h.Name] = err
			return err
		}
		res[h.Name] = parseProbe(string(out))
		return nil
	})
	return res, errs
}

func (r *run) clusterIPFromNodes(ctx context.Context, w *workload, seen *responders) Check {
	if len(r.o.Hosts) == 0 {
		return skip("no SSH access to the nodes (pass --nodes)")
	}
	url := "http://" + net.JoinHostPort(w.clusterIP, strconv.Itoa(ServicePort)) + "/hostname"
	res, errs := r.fromNodes(ctx, []string{url})
	var details, bad []string
	var all tally
	for _, h := range r.o.Hosts {
		if err, ok := errs[h.Name]; ok {
			bad = append(bad, h.Name+" (cannot run the probe: "+oneLine(err.Error())+")")
			continue
		}
		t := res[h.Name][url]
		if t == nil {
			t = &tally{}
			t.fail("no answer from the probe")
		}
		seen.add(t)
		details = append(details, fmt.Sprintf("from %s: %s", h.Name, t.String()))
		if t.failed > 0 || t.ok == 0 {
			bad = append(bad, fmt.Sprintf("%s (%s)", h.Name, t.String()))
		}
		mergeTally(&all, t)
	}
	what := "ClusterIP " + net.JoinHostPort(w.clusterIP, strconv.Itoa(ServicePort))
	if len(bad) > 0 {
		return fail(fmt.Sprintf("%s failed from %s%s", what, strings.Join(bad, ", "), r.endpointsNote(ctx, w, w.spec.ClusterIP.Name)), details...)
	}
	return pass(fmt.Sprintf("%s answered from %s: %s", what, plural(len(r.o.Hosts), "node"), all.String()), details...)
}

// summarize joins the first n items and counts the others.
func summarize(items []string, n int) string {
	if len(items) <= n {
		return strings.Join(items, ", ")
	}
	return fmt.Sprintf("%s and %d more (see details)", strings.Join(items[:n], ", "), len(items)-n)
}

func mergeTally(all, t *tally) {
	all.ok += t.ok
	all.failed += t.failed
	for k, n := range t.by {
		if all.by == nil {
			all.by = map[string]int{}
		}
		all.by[k] += n
	}
}

// nodeAddresses returns every Node's InternalIPs, by node, sorted by node.
func (r *run) nodeAddresses(ctx context.Context) ([]string, map[string]string, error) {
	list, err := r.o.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, err
	}
	var addrs []string
	owner := map[string]string{}
	for _, n := range list.Items {
		for _, a := range n.Status.Addresses {
			if a.Type == "InternalIP" {
				addrs = append(addrs, a.Address)
				owner[a.Address] = n.Name
			}
		}
	}
	slices.SortFunc(addrs, func(a, b string) int { return strings.Compare(owner[a]+" "+a, owner[b]+" "+b) })
	return addrs, owner, nil
}

func (r *run) nodePort(ctx context.Context, w *workload, seen *responders) Check {
	if len(r.o.Hosts) == 0 {
		return skip("no SSH access to the nodes (pass --nodes)")
	}
	if w.nodePort == 0 {
		return fail("Service " + w.spec.NodePort.Name + " has no NodePort")
	}
	addrs, owner, err := r.nodeAddresses(ctx)
	if err != nil {
		return fail("list the Nodes: " + err.Error())
	}
	var urls []string
	for _, a := range addrs {
		urls = append(urls, "http://"+net.JoinHostPort(a, strconv.Itoa(int(w.nodePort)))+"/hostname")
	}
	res, errs := r.fromNodes(ctx, urls)
	var details, bad []string
	var all tally
	for _, h := range r.o.Hosts {
		if err, ok := errs[h.Name]; ok {
			bad = append(bad, h.Name+" (cannot run the probe: "+oneLine(err.Error())+")")
			continue
		}
		for i, u := range urls {
			t := res[h.Name][u]
			if t == nil {
				t = &tally{}
				t.fail("no answer from the probe")
			}
			seen.add(t)
			target := fmt.Sprintf("%s (%s):%d", addrs[i], owner[addrs[i]], w.nodePort)
			details = append(details, fmt.Sprintf("from %s to %s: %s", h.Name, target, t.String()))
			if t.failed > 0 || t.ok == 0 {
				bad = append(bad, fmt.Sprintf("from %s to %s (%s)", h.Name, target, t.String()))
			}
			mergeTally(&all, t)
		}
	}
	if len(bad) > 0 {
		return fail(fmt.Sprintf("NodePort %d failed %s%s", w.nodePort, summarize(bad, 2), r.endpointsNote(ctx, w, w.spec.NodePort.Name)), details...)
	}
	return pass(fmt.Sprintf("NodePort %d answered on %s from %s: %s", w.nodePort, plural(len(addrs), "node address"),
		plural(len(r.o.Hosts), "node"), all.String()), details...)
}
