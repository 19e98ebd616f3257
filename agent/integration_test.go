//go:build linux

package agent_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/kpfree/kpfree/agent"
	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/bpf"
)

const ns = "default"

func service(name, vip string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec:       corev1.ServiceSpec{ClusterIP: vip, ClusterIPs: []string{vip}, Ports: ports},
	}
}

func tcpPort(name string, port, target int32) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, TargetPort: intstr.FromInt32(target), Protocol: corev1.ProtocolTCP}
}

// endpoints are "ADDR" (ready) or "ADDR!" (not ready).
func slice(name, svc, portName string, port int32, endpoints ...string) *discoveryv1.EndpointSlice {
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &portName, Port: &port}},
		Endpoints:   []discoveryv1.Endpoint{},
	}
	for _, e := range endpoints {
		ready := !strings.HasSuffix(e, "!")
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{strings.TrimSuffix(e, "!")},
			Conditions: discoveryv1.EndpointConditions{Ready: &ready},
		})
	}
	return es
}

// harness runs an agent against the real API server.
type harness struct {
	t      *testing.T
	cs     kubernetes.Interface
	maps   lbmap.Maps
	agent  *agent.Agent
	cancel context.CancelFunc
	done   chan error
	lat    []string // "step: latency" lines for the log
	worst  time.Duration
	health string
}

func startAgent(t *testing.T, cs kubernetes.Interface, maps lbmap.Maps, reload func() (lbmap.Maps, error)) *harness {
	t.Helper()
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	a, err := agent.New(agent.Config{Client: cs, Maps: maps, Reload: reload, NodeName: "node-a", Log: log})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{t: t, cs: cs, maps: maps, agent: a, cancel: cancel, done: make(chan error, 1)}
	addr, _, err := agent.Serve(ctx, "127.0.0.1:0", a.Handler(true), nil)
	if err != nil {
		t.Fatal(err)
	}
	h.health = "http://" + addr.String()
	go func() { h.done <- a.Run(ctx) }()
	t.Cleanup(h.stop)
	t0 := time.Now()
	for !a.Ready() {
		if time.Since(t0) > 30*time.Second {
			t.Fatal("agent not ready after 30 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("agent ready (informers synced, first full sync) after %s", time.Since(t0).Round(time.Millisecond))
	return h
}

func (h *harness) stop() {
	if h.cancel == nil {
		return
	}
	h.cancel()
	h.cancel = nil
	if err := <-h.done; err != nil {
		h.t.Errorf("agent.Run: %v", err)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// state is the Format of the frontends on vip.
func (h *harness) state(vip string) string {
	d, err := h.maps.Dump()
	if err != nil {
		h.t.Fatal(err)
	}
	var out []lbmap.Service
	for _, s := range d {
		if s.Frontend.Addr.String() == vip {
			out = append(out, s)
		}
	}
	return lbmap.Format(out)
}

// expect waits until the maps show want for vip and records the latency
// from t0 (taken just before the API write); more than 1 s fails.
func (h *harness) expect(step string, t0 time.Time, vip, want string) {
	h.t.Helper()
	for {
		got := h.state(vip)
		if got == want {
			break
		}
		if time.Since(t0) > 10*time.Second {
			h.t.Fatalf("%s: maps after 10 s:\n%s\nwant:\n%s", step, got, want)
		}
		time.Sleep(500 * time.Microsecond)
	}
	lat := time.Since(t0)
	h.worst = max(h.worst, lat)
	h.lat = append(h.lat, fmt.Sprintf("%-44s %7.1f ms", step, float64(lat.Microseconds())/1000))
	if lat > time.Second {
		h.t.Errorf("%s: maps followed after %s, want < 1 s", step, lat)
	}
}

func (h *harness) report() {
	h.t.Logf("API write -> maps programmed (worst %s):\n%s", h.worst.Round(time.Microsecond), strings.Join(h.lat, "\n"))
}

func (h *harness) get(path string) (int, string) {
	resp, err := http.Get(h.health + path)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func must[T any](t *testing.T) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// The whole control plane against the real kube-apiserver, into lbmap.Fake:
// create, scale up and down, readiness, port changes, SCTP warning Event,
// delete; every change must be in the maps within 1 s of the API write.
func TestIntegrationAPIServerToMaps(t *testing.T) {
	requireIntegration(t)
	_, cs := startAPIServer(t)
	ctx := context.Background()
	svcs, slicesAPI := cs.CoreV1().Services(ns), cs.DiscoveryV1().EndpointSlices(ns)

	// Restored from pins: a Service the API server does not have. It stays
	// until the informers have synced, then goes.
	fake := lbmap.NewFake(lbmap.Capacity{})
	stale := lbmap.Service{Frontend: lbmap.Frontend{Addr: netip.MustParseAddr("10.96.99.99"), Port: 80, Proto: lbmap.TCP}}
	if err := fake.Upsert(stale); err != nil {
		t.Fatal(err)
	}
	h := startAgent(t, cs, fake, nil)
	if got := h.state("10.96.99.99"); got != "" {
		t.Fatalf("stale Service not pruned after sync:\n%s", got)
	}
	// The apiserver's own Service is there (its EndpointSlice names the
	// advertise address).
	waitUntil(t, 5*time.Second, func() bool { return strings.Contains(h.state("10.96.0.1"), "10.96.0.1:443/TCP ->") })
	if code, body := h.get("/readyz"); code != 200 {
		t.Fatalf("/readyz: %d %s", code, body)
	}
	if code, body := h.get("/healthz"); code != 200 {
		t.Fatalf("/healthz: %d %s", code, body)
	}

	const vip = "10.96.100.10"
	t0 := time.Now()
	must[*corev1.Service](t)(svcs.Create(ctx, service("web", vip, tcpPort("http", 80, 8080)), metav1.CreateOptions{}))
	h.expect("create Service (no endpoints: refused)", t0, vip, "SVC 10.96.100.10:80/TCP -> none (refused)\n")
	time.Sleep(150 * time.Millisecond)

	t0 = time.Now()
	es := must[*discoveryv1.EndpointSlice](t)(slicesAPI.Create(ctx, slice("web-1", "web", "http", 8080, "10.244.1.2", "10.244.1.1"), metav1.CreateOptions{}))
	h.expect("create EndpointSlice, 2 endpoints", t0, vip, "SVC 10.96.100.10:80/TCP -> 10.244.1.1:8080 10.244.1.2:8080\n")
	time.Sleep(150 * time.Millisecond)

	update := func(es *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
		return must[*discoveryv1.EndpointSlice](t)(slicesAPI.Update(ctx, es, metav1.UpdateOptions{}))
	}
	t0 = time.Now()
	up := slice("web-1", "web", "http", 8080, "10.244.1.1", "10.244.1.2", "10.244.2.1", "10.244.2.2")
	up.ResourceVersion = es.ResourceVersion
	es = update(up)
	h.expect("scale up to 4 endpoints", t0, vip, "SVC 10.96.100.10:80/TCP -> 10.244.1.1:8080 10.244.1.2:8080 10.244.2.1:8080 10.244.2.2:8080\n")
	time.Sleep(150 * time.Millisecond)

	t0 = time.Now()
	down := slice("web-1", "web", "http", 8080, "10.244.2.2", "10.244.1.1!")
	down.ResourceVersion = es.ResourceVersion
	es = update(down)
	h.expect("scale down to 1 ready (+1 not ready)", t0, vip, "SVC 10.96.100.10:80/TCP -> 10.244.2.2:8080\n")
	time.Sleep(150 * time.Millisecond)

	// A second slice for the same Service.
	t0 = time.Now()
	must[*discoveryv1.EndpointSlice](t)(slicesAPI.Create(ctx, slice("web-2", "web", "http", 8080, "10.244.3.1", "10.244.2.2"), metav1.CreateOptions{}))
	h.expect("second slice (one endpoint duplicated)", t0, vip, "SVC 10.96.100.10:80/TCP -> 10.244.2.2:8080 10.244.3.1:8080\n")
	time.Sleep(150 * time.Millisecond)

	// Port change: the Service port and the endpoints' port (two writes).
	t0 = time.Now()
	s := must[*corev1.Service](t)(svcs.Get(ctx, "web", metav1.GetOptions{}))
	s.Spec.Ports = []corev1.ServicePort{tcpPort("http", 8000, 9090)}
	must[*corev1.Service](t)(svcs.Update(ctx, s, metav1.UpdateOptions{}))
	h.expect("change Service port 80 -> 8000", t0, vip, "SVC 10.96.100.10:8000/TCP -> 10.244.2.2:8080 10.244.3.1:8080\n")
	t1 := time.Now()
	for _, name := range []string{"web-1", "web-2"} {
		cur := must[*discoveryv1.EndpointSlice](t)(slicesAPI.Get(ctx, name, metav1.GetOptions{}))
		p := int32(9090)
		cur.Ports[0].Port = &p
		update(cur)
	}
	h.expect("change target port 8080 -> 9090 (2 slices)", t1, vip, "SVC 10.96.100.10:8000/TCP -> 10.244.2.2:9090 10.244.3.1:9090\n")
	time.Sleep(150 * time.Millisecond)

	// Session affinity.
	t0 = time.Now()
	s = must[*corev1.Service](t)(svcs.Get(ctx, "web", metav1.GetOptions{}))
	s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	must[*corev1.Service](t)(svcs.Update(ctx, s, metav1.UpdateOptions{}))
	h.expect("sessionAffinity ClientIP (API default timeout)", t0, vip, "SVC 10.96.100.10:8000/TCP affinity=10800s -> 10.244.2.2:9090 10.244.3.1:9090\n")
	time.Sleep(150 * time.Millisecond)

	// SCTP: a warning Event on the Service, the TCP port keeps working.
	t0 = time.Now()
	s = must[*corev1.Service](t)(svcs.Get(ctx, "web", metav1.GetOptions{}))
	s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "sig", Port: 3868, TargetPort: intstr.FromInt32(3868), Protocol: corev1.ProtocolSCTP})
	must[*corev1.Service](t)(svcs.Update(ctx, s, metav1.UpdateOptions{}))
	var ev corev1.Event
	waitUntil(t, 10*time.Second, func() bool {
		l := must[*corev1.EventList](t)(cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=web,reason=UnsupportedProtocol"}))
		if len(l.Items) > 0 {
			ev = l.Items[0]
			return true
		}
		return false
	})
	t.Logf("Event after %s: %s %s %s/%s: %s (source %s)", time.Since(t0).Round(time.Millisecond), ev.Type, ev.Reason,
		ev.InvolvedObject.Kind, ev.InvolvedObject.Name, ev.Message, ev.Source.Component)
	if ev.Type != corev1.EventTypeWarning || ev.InvolvedObject.UID != s.UID || ev.Count != 1 {
		t.Fatalf("event: %+v", ev)
	}
	if got := h.state(vip); !strings.Contains(got, "8000/TCP") || strings.Contains(got, "3868") {
		t.Fatalf("maps with an SCTP port:\n%s", got)
	}
	time.Sleep(300 * time.Millisecond) // more passes: still one Event
	l := must[*corev1.EventList](t)(cs.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=web,reason=UnsupportedProtocol"}))
	if len(l.Items) != 1 || l.Items[0].Count != 1 {
		t.Fatalf("events: %d, count %d; want one", len(l.Items), l.Items[0].Count)
	}

	// Delete: the frontend goes.
	t0 = time.Now()
	if err := svcs.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.expect("delete Service", t0, vip, "")
	h.report()

	// Metrics.
	code, body := h.get("/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	for _, m := range []string{"kpfree_services ", "kpfree_backends ", "kpfree_sync_duration_seconds_bucket", "kpfree_sync_errors_total 0",
		"kpfree_map_full_total 0", "kpfree_sync_lag_seconds_count", "go_goroutines"} {
		if !strings.Contains(body, m) {
			t.Errorf("/metrics lacks %q", m)
		}
	}
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, "kpfree_sync_lag_seconds_sum") || strings.HasPrefix(line, "kpfree_sync_lag_seconds_count") ||
			strings.HasPrefix(line, "kpfree_sync_duration_seconds_sum") || strings.HasPrefix(line, "kpfree_sync_duration_seconds_count") {
			t.Log(line)
		}
	}
}

// Real datapath: the agent programs the pinned BPF maps, and a process in
// the child cgroup reaches two local TCP backends through the ClusterIP.
// Then scale down, no endpoints (refused), a port change, an agent restart
// (the datapath keeps serving while no agent runs, and the next one takes
// over the pins), and delete.
func TestIntegrationDatapath(t *testing.T) {
	requireIntegration(t)
	e := newDatapathEnv(t)
	_, cs := startAPIServer(t)
	ctx := context.Background()
	svcs, slicesAPI := cs.CoreV1().Services(ns), cs.DiscoveryV1().EndpointSlices(ns)

	podA, podB := netip.MustParseAddr("10.244.1.11"), netip.MustParseAddr("10.244.1.12")
	e.addAddr(podA)
	e.addAddr(podB)
	e.tcpServer("A", netip.AddrPortFrom(podA, 8080))
	e.tcpServer("B", netip.AddrPortFrom(podB, 8080))

	load := func() (*bpf.Datapath, *lbmap.Table) {
		dp, err := bpf.Load(bpf.Options{PinDir: e.pinDir, CgroupPath: e.cgroup})
		if err != nil {
			t.Fatalf("load: %v", err)
		}
		m, err := lbmap.New(dp.Maps)
		if err != nil {
			t.Fatal(err)
		}
		return dp, m
	}
	dp, maps := load()
	t.Cleanup(func() {
		if err := bpf.Uninstall(e.pinDir, e.cgroup); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	t.Logf("datapath: mode %s, %d programs on %s", dp.Mode, len(dp.Attached), e.cgroup)
	h := startAgent(t, cs, maps, func() (lbmap.Maps, error) { return lbmap.New(dp.Maps) })

	const vip = "10.96.100.20"
	t0 := time.Now()
	must[*corev1.Service](t)(svcs.Create(ctx, service("echo", vip, tcpPort("http", 80, 8080)), metav1.CreateOptions{}))
	es := must[*discoveryv1.EndpointSlice](t)(slicesAPI.Create(ctx, slice("echo-1", "echo", "http", 8080, podA.String(), podB.String()), metav1.CreateOptions{}))
	h.expect("create Service + slice (2 endpoints)", t0, vip, "SVC 10.96.100.20:80/TCP -> 10.244.1.11:8080 10.244.1.12:8080\n")
	got := replies(e.connect(vip+":80", 40))
	if got["A"] == 0 || got["B"] == 0 || got["A"]+got["B"] != 40 {
		t.Fatalf("client through %s:80: %v, want A and B", vip, got)
	}
	t.Logf("2 endpoints: %v", got)

	// Scale down to B.
	time.Sleep(150 * time.Millisecond) // an isolated change, not batched with the last one
	t0 = time.Now()
	down := slice("echo-1", "echo", "http", 8080, podB.String())
	down.ResourceVersion = es.ResourceVersion
	es = must[*discoveryv1.EndpointSlice](t)(slicesAPI.Update(ctx, down, metav1.UpdateOptions{}))
	h.expect("scale down to B", t0, vip, "SVC 10.96.100.20:80/TCP -> 10.244.1.12:8080\n")
	if got := replies(e.connect(vip+":80", 10)); got["B"] != 10 {
		t.Fatalf("after scale down: %v, want B only", got)
	}

	// No ready endpoint: refused at once.
	time.Sleep(150 * time.Millisecond)
	t0 = time.Now()
	none := slice("echo-1", "echo", "http", 8080, podB.String()+"!")
	none.ResourceVersion = es.ResourceVersion
	es = must[*discoveryv1.EndpointSlice](t)(slicesAPI.Update(ctx, none, metav1.UpdateOptions{}))
	h.expect("B not ready: no backends", t0, vip, "SVC 10.96.100.20:80/TCP -> none (refused)\n")
	for _, a := range e.connect(vip+":80", 5) {
		if a.Errno != "ECONNREFUSED" || a.Millis > 100 {
			t.Fatalf("no backends: %+v, want ECONNREFUSED at once", a)
		}
	}

	// Port change and scale back up.
	time.Sleep(150 * time.Millisecond)
	t0 = time.Now()
	s := must[*corev1.Service](t)(svcs.Get(ctx, "echo", metav1.GetOptions{}))
	s.Spec.Ports = []corev1.ServicePort{tcpPort("http", 81, 8080)}
	must[*corev1.Service](t)(svcs.Update(ctx, s, metav1.UpdateOptions{}))
	both := slice("echo-1", "echo", "http", 8080, podA.String(), podB.String())
	both.ResourceVersion = es.ResourceVersion
	must[*discoveryv1.EndpointSlice](t)(slicesAPI.Update(ctx, both, metav1.UpdateOptions{}))
	h.expect("port 80 -> 81, A and B ready", t0, vip, "SVC 10.96.100.20:81/TCP -> 10.244.1.11:8080 10.244.1.12:8080\n")
	if got := replies(e.connect(vip+":81", 20)); got["A"]+got["B"] != 20 || got["A"] == 0 || got["B"] == 0 {
		t.Fatalf("port 81: %v", got)
	}
	// The old port is no Service any more: not translated (fail open; the
	// netns has no route, so ENETUNREACH at once).
	if got := replies(e.connect(vip+":80", 3)); got["ENETUNREACH"] != 3 {
		t.Fatalf("old port 80: %v, want ENETUNREACH", got)
	}

	// Restart: stop the agent and close the datapath as the command does
	// on SIGTERM. Programs stay attached, maps pinned: still served.
	h.stop()
	dp.Close()
	if got := replies(e.connect(vip+":81", 10)); got["A"]+got["B"] != 10 {
		t.Fatalf("while no agent runs: %v", got)
	}
	dp2, maps2 := load()
	defer dp2.Close()
	if d := lbmap.Format(must[[]lbmap.Service](t)(maps2.Dump())); !strings.Contains(d, "10.96.100.20:81/TCP -> 10.244.1.11:8080 10.244.1.12:8080") {
		t.Fatalf("not restored from pins:\n%s", d)
	}
	h2 := startAgent(t, cs, maps2, func() (lbmap.Maps, error) { return lbmap.New(dp2.Maps) })
	h2.lat, h2.worst = h.lat, h.worst
	if got := replies(e.connect(vip+":81", 10)); got["A"]+got["B"] != 10 {
		t.Fatalf("after restart: %v", got)
	}

	// Delete.
	time.Sleep(150 * time.Millisecond)
	t0 = time.Now()
	if err := svcs.Delete(ctx, "echo", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h2.expect("delete Service", t0, vip, "")
	if got := replies(e.connect(vip+":81", 3)); got["ENETUNREACH"] != 3 {
		t.Fatalf("deleted: %v, want ENETUNREACH (not translated)", got)
	}
	h2.report()
	if err := maps2.Verify(); err != nil {
		t.Fatal(err)
	}
}

func waitUntil(t *testing.T, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", limit)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
