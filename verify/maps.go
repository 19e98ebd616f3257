package verify

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kpfree/kpfree/agent"
	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/slim"
	"github.com/kpfree/kpfree/internal/install"
)

// AgentServicesCommand prints an agent's maps (kpfree-agent's own CLI, run
// in the agent's container).
var AgentServicesCommand = []string{"kpfree-agent", "services", "-o", "json"}

// agentContainer is the agent's container in the chart.
const agentContainer = "agent"

// mapsSettle is how long the agents get to catch up with the API (the
// workload's Services were just created).
const mapsSettle = 30 * time.Second

// agentService is one frontend as `kpfree-agent services -o json` prints it.
type agentService struct {
	Frontend string   `json:"frontend"`
	Backends []string `json:"backends"`
}

// expected is the desired frontends of one node: frontend -> sorted
// backends.
type expected map[string][]string

// desired runs the agent's own model over the API's Services and
// EndpointSlices, for one node, with the options that node's agent runs
// with (its NodePort addresses in particular).
func desired(svcs []*corev1.Service, eps []*discoveryv1.EndpointSlice, node string, o model.Options) expected {
	res := model.Build(slim.Services(svcs), slim.EndpointSlices(eps), node, o)
	out := expected{}
	for _, s := range res.Services() {
		var bs []string
		for _, b := range s.Backends {
			bs = append(bs, b.String())
		}
		slices.Sort(bs)
		out[s.Frontend.String()] = bs
	}
	return out
}

// compareMaps lists the differences between what a node's agent holds and
// what it should hold.
func compareMaps(want expected, got []agentService) []string {
	var diff []string
	have := map[string][]string{}
	for _, s := range got {
		bs := slices.Clone(s.Backends)
		slices.Sort(bs)
		have[s.Frontend] = bs
	}
	for _, f := range sortedKeys(want) {
		h, ok := have[f]
		switch {
		case !ok:
			diff = append(diff, "missing "+f)
		case !slices.Equal(h, want[f]):
			diff = append(diff, fmt.Sprintf("%s has backends [%s], want [%s]", f, strings.Join(h, " "), strings.Join(want[f], " ")))
		}
	}
	for _, f := range sortedKeys(have) {
		if _, ok := want[f]; !ok {
			diff = append(diff, "stale "+f)
		}
	}
	return diff
}

// metricsServices reads the kpfree_services gauge.
func metricsServices(body []byte) (int, bool) {
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && f[0] == "kpfree_services" {
			v, err := strconv.ParseFloat(f[1], 64)
			return int(v), err == nil
		}
	}
	return 0, false
}

// agentSettings reads --proxy-name and the health port from the agent
// DaemonSet.
func agentSettings(ds *appsv1.DaemonSet) (proxyName string, healthPort int) {
	healthPort = 9876
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name != agentContainer {
			continue
		}
		for _, a := range append(slices.Clone(c.Command), c.Args...) {
			if v, ok := strings.CutPrefix(a, "--proxy-name="); ok {
				proxyName = v
			}
		}
		for _, p := range c.Ports {
			if p.Name == "health" {
				healthPort = int(p.ContainerPort)
			}
		}
	}
	return proxyName, healthPort
}

// agentOptions reads the model options an agent runs with (GET /options on
// its health port).
func (r *run) agentOptions(ctx context.Context, pod string, healthPort int) (model.Options, error) {
	body, err := r.o.Pods.ProxyGet(ctx, r.o.AgentNamespace, pod, healthPort, "/options", nil)
	if err != nil {
		return model.Options{}, err
	}
	var ao agent.Options
	if err := json.Unmarshal(body, &ao); err != nil {
		return model.Options{}, fmt.Errorf("unreadable /options: %w", err)
	}
	return ao.Model(), nil
}

// agentMaps compares every agent's maps with the API, for up to mapsSettle
// (the agents follow the API asynchronously). Each agent is asked with
// `kpfree-agent services -o json` in its pod; when that cannot run, its
// kpfree_services gauge is compared with the number of frontends instead.
func (r *run) agentMaps(ctx context.Context) Check {
	o := r.o
	cs := o.Client
	ds, err := cs.AppsV1().DaemonSets(o.AgentNamespace).Get(ctx, o.AgentDaemonSet, metav1.GetOptions{})
	if err != nil {
		return fail(fmt.Sprintf("DaemonSet %s/%s: %v", o.AgentNamespace, o.AgentDaemonSet, err))
	}
	proxyName, healthPort := agentSettings(ds)
	deadline := time.Now().Add(mapsSettle)
	for {
		c, settled := r.agentMapsOnce(ctx, proxyName, healthPort)
		if settled || time.Now().After(deadline) || ctx.Err() != nil {
			return c
		}
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}

// agentMapsOnce compares once; settled is false when a retry may help.
func (r *run) agentMapsOnce(ctx context.Context, proxyName string, healthPort int) (Check, bool) {
	o := r.o
	cs := o.Client
	agents, err := install.GetAgents(ctx, cs, o.AgentNamespace, o.AgentDaemonSet)
	if err != nil {
		return fail("cannot read the agents: " + err.Error()), false
	}
	svcList, err := cs.CoreV1().Services("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fail("list Services: " + err.Error()), false
	}
	epList, err := cs.DiscoveryV1().EndpointSlices("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return fail("list EndpointSlices: " + err.Error()), false
	}
	svcs := make([]*corev1.Service, len(svcList.Items))
	for i := range svcList.Items {
		svcs[i] = &svcList.Items[i]
	}
	eps := make([]*discoveryv1.EndpointSlice, len(epList.Items))
	for i := range epList.Items {
		eps[i] = &epList.Items[i]
	}

	var details, bad []string
	checked, byMetrics := 0, 0
	for _, n := range agents.Nodes {
		if n.Pod == "" || !n.Ready {
			details = append(details, fmt.Sprintf("%s: not checked, no ready agent (%s)", n.Node, n.Reason))
			continue
		}
		opts, oerr := r.agentOptions(ctx, n.Pod, healthPort)
		if oerr != nil {
			bad = append(bad, n.Node)
			details = append(details, fmt.Sprintf("%s: cannot read the agent's options (/options on port %d): %s", n.Node, healthPort, oneLine(oerr.Error())))
			continue
		}
		opts.ProxyName = proxyName
		want := desired(svcs, eps, n.Node, opts)
		out, stderr, err := o.Pods.Exec(ctx, o.AgentNamespace, n.Pod, agentContainer, AgentServicesCommand)
		if err == nil {
			var got []agentService
			if jerr := json.Unmarshal(out, &got); jerr != nil {
				bad = append(bad, n.Node)
				details = append(details, fmt.Sprintf("%s: unreadable `%s`: %v", n.Node, strings.Join(AgentServicesCommand, " "), jerr))
				continue
			}
			checked++
			diff := compareMaps(want, got)
			if len(diff) == 0 {
				details = append(details, fmt.Sprintf("%s: %d frontends, as the API says", n.Node, len(want)))
				continue
			}
			bad = append(bad, n.Node)
			if len(diff) > 5 {
				diff = append(diff[:5], fmt.Sprintf("... %d more", len(diff)-5))
			}
			details = append(details, fmt.Sprintf("%s: %s", n.Node, strings.Join(diff, "; ")))
			continue
		}
		// No exec (no REST config, or no such command in this agent):
		// compare the count the agent reports.
		why := oneLine(err.Error() + " " + string(stderr))
		if errors.Is(err, ErrNoExec) {
			why = "no exec"
		}
		body, merr := o.Pods.ProxyGet(ctx, o.AgentNamespace, n.Pod, healthPort, "/metrics", nil)
		if merr != nil {
			bad = append(bad, n.Node)
			details = append(details, fmt.Sprintf("%s: cannot read the maps (%s) nor the metrics (%s)", n.Node, why, oneLine(merr.Error())))
			continue
		}
		count, ok := metricsServices(body)
		if !ok {
			bad = append(bad, n.Node)
			details = append(details, fmt.Sprintf("%s: cannot read the maps (%s); no kpfree_services in /metrics", n.Node, why))
			continue
		}
		checked++
		byMetrics++
		if count != len(want) {
			bad = append(bad, n.Node)
			details = append(details, fmt.Sprintf("%s: kpfree_services %d, the API has %d frontends (maps not read: %s)", n.Node, count, len(want), why))
			continue
		}
		details = append(details, fmt.Sprintf("%s: kpfree_services %d, as many frontends as the API has (maps not read: %s)", n.Node, count, why))
	}
	switch {
	case len(bad) > 0:
		return fail("agent maps differ from the API on "+strings.Join(bad, ", "), details...), false
	case checked == 0:
		return fail("no agent could be checked", details...), false
	}
	how := "maps read with `" + strings.Join(AgentServicesCommand, " ") + "`"
	if byMetrics > 0 {
		how = fmt.Sprintf("%d of %d compared by the kpfree_services gauge only", byMetrics, checked)
	}
	return pass(fmt.Sprintf("agents on %s hold what the API says (%s)", plural(checked, "node"), how), details...), true
}
