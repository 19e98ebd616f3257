package reconcile_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/reconcile"
	"github.com/kpfree/kpfree/agent/slim"
	"github.com/kpfree/kpfree/agent/watch"
)

// fakeSource is an informer cache under the test's control.
type fakeSource struct {
	mu     sync.Mutex
	synced bool
	fail   error // Snapshot fails with it
	calls  int
	svcs   map[string]*corev1.Service
	slices map[string]*discoveryv1.EndpointSlice
	// their slim forms, as watch.Watcher holds them
	slimSvcs   map[string]*slim.Service
	slimSlices map[string]*slim.EndpointSlice
	ch         chan struct{}
	// inc: source() returns an IncrementalSource over it; dirty holds the
	// names changed since TakeDirty.
	inc   bool
	dirty map[string]bool
}

// incSource is a fakeSource that tells which Services changed, as
// watch.Watcher does.
type incSource struct{ *fakeSource }

func (f incSource) TakeDirty() []types.NamespacedName {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []types.NamespacedName
	for n := range f.dirty {
		out = append(out, types.NamespacedName{Namespace: "default", Name: n})
	}
	clear(f.dirty)
	return out
}

func (f incSource) Service(k types.NamespacedName) (*slim.Service, []*slim.EndpointSlice, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail != nil {
		return nil, nil, f.fail
	}
	var sl []*slim.EndpointSlice
	if es := f.slimSlices[k.Name]; es != nil {
		sl = append(sl, es)
	}
	return f.slimSvcs[k.Name], sl, nil
}

// source is the Source to give the Reconciler: incremental or not.
func (f *fakeSource) source() reconcile.Source {
	if f.inc {
		return incSource{f}
	}
	return f
}

// bothModes runs a test over a plain Source (every pass rebuilds the
// model) and over an IncrementalSource.
func bothModes(t *testing.T, test func(t *testing.T, inc bool)) {
	t.Run("snapshot", func(t *testing.T) { test(t, false) })
	t.Run("incremental", func(t *testing.T) { test(t, true) })
}

func newSource() *fakeSource {
	return &fakeSource{svcs: map[string]*corev1.Service{}, slices: map[string]*discoveryv1.EndpointSlice{}, ch: make(chan struct{}, 1),
		slimSvcs: map[string]*slim.Service{}, slimSlices: map[string]*slim.EndpointSlice{}, dirty: map[string]bool{}}
}

func (f *fakeSource) Synced() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.synced
}

func (f *fakeSource) Snapshot() (watch.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	var s watch.Snapshot
	if f.fail != nil {
		return s, f.fail
	}
	for _, v := range f.slimSvcs {
		s.Services = append(s.Services, v)
	}
	for _, v := range f.slimSlices {
		s.EndpointSlices = append(s.EndpointSlices, v)
	}
	return s, nil
}

func (f *fakeSource) signal() {
	select {
	case f.ch <- struct{}{}:
	default:
	}
}

func (f *fakeSource) setSynced() {
	f.mu.Lock()
	f.synced = true
	f.mu.Unlock()
	f.signal()
}

// put adds or replaces a Service with one TCP port and its slice with the
// given ready endpoint addresses.
func (f *fakeSource) put(name, vip string, port int32, target int32, eps ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.svcs[name] = &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name), Generation: 1},
		Spec: corev1.ServiceSpec{
			ClusterIP: vip, ClusterIPs: []string{vip},
			Ports: []corev1.ServicePort{{Port: port, Protocol: corev1.ProtocolTCP}},
		},
	}
	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Namespace: "default", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Port: &target}},
	}
	for _, e := range eps {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{e}})
	}
	f.slices[name] = es
	f.slimSvcs[name], f.slimSlices[name] = slim.FromService(f.svcs[name]), slim.FromEndpointSlice(es)
	f.dirty[name] = true
	f.signalLocked()
}

func (f *fakeSource) signalLocked() {
	select {
	case f.ch <- struct{}{}:
	default:
	}
}

func (f *fakeSource) remove(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.svcs, name)
	delete(f.slices, name)
	delete(f.slimSvcs, name)
	delete(f.slimSlices, name)
	f.dirty[name] = true
	f.signalLocked()
}

func (f *fakeSource) mutate(name string, fn func(*corev1.Service)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.svcs[name].DeepCopy()
	fn(s)
	f.svcs[name] = s
	f.slimSvcs[name] = slim.FromService(s)
	f.dirty[name] = true
	f.signalLocked()
}

func dump(t *testing.T, m lbmap.Maps) string {
	t.Helper()
	d, err := m.Dump()
	if err != nil {
		t.Fatal(err)
	}
	return lbmap.Format(d)
}

func tcp(vip string, port uint16, backends ...string) lbmap.Service {
	s := lbmap.Service{Frontend: lbmap.Frontend{Addr: netip.MustParseAddr(vip), Port: port, Proto: lbmap.TCP}}
	for _, b := range backends {
		s.Backends = append(s.Backends, lbmap.Backend{Addr: netip.MustParseAddr(b), Port: 8080})
	}
	return s
}

func mustReconcile(t *testing.T, r *reconcile.Reconciler, full bool) reconcile.Stats {
	t.Helper()
	st, err := r.Reconcile(full)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// A restarted agent finds the pinned maps full of Services (lbmap.New
// restored them). Until the informers have synced it must write nothing: an
// empty or partial cache would otherwise delete live Services.
func TestNoPruneBeforeSync(t *testing.T) { bothModes(t, testNoPruneBeforeSync) }

func testNoPruneBeforeSync(t *testing.T, inc bool) {
	fake := lbmap.NewFake(lbmap.Capacity{})
	for _, s := range []lbmap.Service{tcp("10.96.0.1", 80, "10.244.0.1"), tcp("10.96.0.2", 80, "10.244.0.2")} {
		if err := fake.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
	before, writes := dump(t, fake), fake.Writes()

	src := newSource() // not synced, nothing listed yet
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source(), MinInterval: time.Millisecond})
	if _, err := r.Reconcile(true); !errors.Is(err, reconcile.ErrNotSynced) {
		t.Fatalf("Reconcile before sync: %v, want ErrNotSynced", err)
	}

	// The loop too: a while of unsynced informers and change signals.
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- r.Run(ctx, src.ch) }()
	src.put("web", "10.96.0.1", 80, 8080, "10.244.0.9") // partial cache: only one of two
	time.Sleep(200 * time.Millisecond)
	if got := fake.Writes() - writes; got != 0 || r.Ready() || dump(t, fake) != before {
		t.Fatalf("before sync: %d writes, ready=%v, maps:\n%s", got, r.Ready(), dump(t, fake))
	}

	// Synced: the first pass is a full Sync and prunes what the API lacks.
	src.setSynced()
	waitFor(t, time.Second, func() bool { return r.Ready() })
	want := "SVC 10.96.0.1:80/TCP -> 10.244.0.9:8080\n"
	if got := dump(t, fake); got != want {
		t.Fatalf("after sync:\n%s\nwant:\n%s", got, want)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
}

// A second pass over the same state writes nothing, full or incremental.
func TestIdempotent(t *testing.T) { bothModes(t, testIdempotent) }

func testIdempotent(t *testing.T, inc bool) {
	fake := lbmap.NewFake(lbmap.Capacity{})
	src := newSource()
	src.inc = inc
	src.synced = true
	src.put("a", "10.96.0.1", 80, 8080, "10.244.0.2", "10.244.0.1")
	src.put("b", "10.96.0.2", 53, 5353, "10.244.0.1")
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()})

	st := mustReconcile(t, r, false)
	if !st.Full || st.Services != 2 || st.Backends != 3 || st.Errors != 0 {
		t.Fatalf("first pass: %+v", st)
	}
	w := fake.Writes()
	if w == 0 {
		t.Fatal("first pass wrote nothing")
	}
	for i, full := range []bool{false, true, false, true} {
		st := mustReconcile(t, r, full)
		if n := fake.Writes() - w; n != 0 {
			t.Fatalf("pass %d (full=%v) wrote %d entries: %+v", i, full, n, st)
		}
		if st.Upserts != 0 && !full || st.Deletes != 0 || st.Drift {
			t.Fatalf("pass %d: %+v", i, st)
		}
	}

	// An incremental change touches only what changed.
	src.put("b", "10.96.0.2", 53, 5353, "10.244.0.1", "10.244.0.3")
	st = mustReconcile(t, r, false)
	if st.Upserts != 1 || st.Deletes != 0 {
		t.Fatalf("changed one Service: %+v", st)
	}
	src.remove("a")
	st = mustReconcile(t, r, false)
	if st.Upserts != 0 || st.Deletes != 1 {
		t.Fatalf("removed one Service: %+v", st)
	}
	want := "SVC 10.96.0.2:53/TCP -> 10.244.0.1:5353 10.244.0.3:5353\n"
	if got := dump(t, fake); got != want {
		t.Fatalf("maps:\n%s\nwant:\n%s", got, want)
	}
	if err := fake.Verify(); err != nil {
		t.Fatal(err)
	}
}

// A full map is counted and logged, the other Services are programmed, the
// loop goes on, and the refused Service goes in once there is room.
func TestMapFull(t *testing.T) { bothModes(t, testMapFull) }

func testMapFull(t *testing.T, inc bool) {
	// Room for two one-backend Services (master + slot each).
	fake := lbmap.NewFake(lbmap.Capacity{Services: 4})
	src := newSource()
	src.inc = inc
	src.synced = true
	src.put("a", "10.96.0.1", 80, 8080, "10.244.0.1")
	src.put("b", "10.96.0.2", 80, 8080, "10.244.0.2")
	src.put("c", "10.96.0.3", 80, 8080, "10.244.0.3")
	reg := prometheus.NewRegistry()
	metrics := reconcile.NewMetrics(reg)
	var logs strings.Builder
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source(), Metrics: metrics, Log: testLogger(&logs)})

	st := mustReconcile(t, r, false)
	if st.MapFull != 1 || st.Errors != 1 || !errors.Is(st.Err, lbmap.ErrMapFull) || st.Services != 2 {
		t.Fatalf("first pass: %+v", st)
	}
	if got := testutil.ToFloat64(metrics.MapFull); got != 1 {
		t.Fatalf("kpfree_map_full_total = %v", got)
	}
	if got := testutil.ToFloat64(metrics.SyncErrors); got != 1 {
		t.Fatalf("kpfree_sync_errors_total = %v", got)
	}
	if !strings.Contains(logs.String(), "kpf_services full") {
		t.Fatalf("not logged:\n%s", logs.String())
	}
	// Still full: retried, counted again, no crash.
	st = mustReconcile(t, r, false)
	if st.MapFull != 1 || st.Upserts != 1 {
		t.Fatalf("retry: %+v", st)
	}
	// Room again: the refused Service goes in.
	src.remove("a")
	st = mustReconcile(t, r, false)
	if st.Errors != 0 || st.Services != 2 {
		t.Fatalf("after freeing room: %+v", st)
	}
	want := "SVC 10.96.0.2:80/TCP -> 10.244.0.2:8080\nSVC 10.96.0.3:80/TCP -> 10.244.0.3:8080\n"
	if got := dump(t, fake); got != want {
		t.Fatalf("maps:\n%s\nwant:\n%s", got, want)
	}
	if got := testutil.ToFloat64(metrics.Services); got != 2 {
		t.Fatalf("kpfree_services = %v", got)
	}
}

// A failed write (any kernel error) is retried on the next pass.
func TestWriteErrorRetried(t *testing.T) { bothModes(t, testWriteErrorRetried) }

func testWriteErrorRetried(t *testing.T, inc bool) {
	fake := lbmap.NewFake(lbmap.Capacity{})
	src := newSource()
	src.inc = inc
	src.synced = true
	src.put("a", "10.96.0.1", 80, 8080, "10.244.0.1")
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()})
	mustReconcile(t, r, false)

	src.put("a", "10.96.0.1", 80, 8080, "10.244.0.1", "10.244.0.2")
	fake.FailWrite(0, syscall.ENOMEM)
	st := mustReconcile(t, r, false)
	if st.Errors != 1 || !errors.Is(st.Err, syscall.ENOMEM) {
		t.Fatalf("failing pass: %+v", st)
	}
	st = mustReconcile(t, r, false)
	if st.Errors != 0 || st.Upserts != 1 {
		t.Fatalf("retry: %+v", st)
	}
	if got, want := dump(t, fake), "SVC 10.96.0.1:80/TCP -> 10.244.0.1:8080 10.244.0.2:8080\n"; got != want {
		t.Fatalf("maps:\n%s", got)
	}
	if err := fake.Verify(); err != nil {
		t.Fatal(err)
	}
}

// Warnings are reported once per Service generation, and again when they
// come back after going away.
func TestWarningsOnce(t *testing.T) { bothModes(t, testWarningsOnce) }

func testWarningsOnce(t *testing.T, inc bool) {
	src := newSource()
	src.inc = inc
	src.synced = true
	src.put("sig", "10.96.0.1", 80, 8080, "10.244.0.1")
	addSCTP := func(s *corev1.Service) {
		s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "sctp", Port: 9999, Protocol: corev1.ProtocolSCTP})
		s.Spec.Ports[0].Name = "http"
	}
	src.mutate("sig", addSCTP)
	var got []model.Warning
	r := reconcile.New(reconcile.Config{Maps: lbmap.NewFake(lbmap.Capacity{}), Source: src.source(),
		Reporter: reconcile.ReporterFunc(func(w model.Warning) { got = append(got, w) })})
	for range 3 {
		mustReconcile(t, r, false)
	}
	if len(got) != 1 || got[0].Reason != model.ReasonUnsupportedProtocol || got[0].Service.UID != "uid-sig" {
		t.Fatalf("reported %+v, want one UnsupportedProtocol", got)
	}
	src.mutate("sig", func(s *corev1.Service) { s.Generation++ }) // spec changed, still SCTP
	mustReconcile(t, r, false)
	mustReconcile(t, r, false)
	if len(got) != 2 {
		t.Fatalf("after a spec change: %d reports, want 2", len(got))
	}
	src.mutate("sig", func(s *corev1.Service) { s.Spec.Ports = s.Spec.Ports[:1] })
	mustReconcile(t, r, false)
	src.mutate("sig", addSCTP)
	mustReconcile(t, r, false)
	if len(got) != 3 {
		t.Fatalf("a warning that came back: %d reports, want 3", len(got))
	}
}

// drifting lies in Dump once, as if someone had changed the maps.
type drifting struct {
	lbmap.Maps
	lie bool
}

func (d *drifting) Dump() ([]lbmap.Service, error) {
	if d.lie {
		d.lie = false
		return nil, nil
	}
	return d.Maps.Dump()
}

// A periodic full pass that finds the maps changed behind the agent's back
// reloads the bookkeeping from the maps and repairs them.
func TestDriftRepaired(t *testing.T) { bothModes(t, testDriftRepaired) }

func testDriftRepaired(t *testing.T, inc bool) {
	src := newSource()
	src.inc = inc
	src.synced = true
	src.put("a", "10.96.0.1", 80, 8080, "10.244.0.1")
	d := &drifting{Maps: lbmap.NewFake(lbmap.Capacity{})}
	reloaded := lbmap.NewFake(lbmap.Capacity{}) // "what the maps really hold": empty
	reg := prometheus.NewRegistry()
	metrics := reconcile.NewMetrics(reg)
	r := reconcile.New(reconcile.Config{Maps: d, Source: src.source(), Metrics: metrics,
		Reload: func() (lbmap.Maps, error) { return reloaded, nil }})
	mustReconcile(t, r, true)
	if st := mustReconcile(t, r, true); st.Drift {
		t.Fatalf("no drift expected: %+v", st)
	}
	d.lie = true
	st := mustReconcile(t, r, true)
	if !st.Drift || testutil.ToFloat64(metrics.Drift) != 1 {
		t.Fatalf("drift not noticed: %+v", st)
	}
	if got, want := dump(t, reloaded), "SVC 10.96.0.1:80/TCP -> 10.244.0.1:8080\n"; got != want {
		t.Fatalf("reloaded maps not repaired:\n%s", got)
	}
}

// The loop batches bursts of changes (at most one pass per MinInterval) and
// follows a change within MinInterval plus the pass.
func TestRunBatchesChanges(t *testing.T) { bothModes(t, testRunBatchesChanges) }

func testRunBatchesChanges(t *testing.T, inc bool) {
	fake := lbmap.NewFake(lbmap.Capacity{})
	src := newSource()
	src.inc = inc
	src.synced = true
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source(), MinInterval: 50 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = r.Run(ctx, src.ch) }()
	waitFor(t, time.Second, r.Ready)
	passes := r.Passes()

	t0 := time.Now()
	for i := range 200 {
		src.put("a", "10.96.0.1", 80, 8080, "10.244.0."+strconv.Itoa(1+i%250))
		time.Sleep(time.Millisecond)
	}
	src.put("a", "10.96.0.1", 80, 8080, "10.244.0.254")
	waitFor(t, time.Second, func() bool { return dump(t, fake) == "SVC 10.96.0.1:80/TCP -> 10.244.0.254:8080\n" })
	elapsed := time.Since(t0)
	n := r.Passes() - passes
	// One pass per 50 ms at most (plus the first, which runs at once).
	if limit := int64(elapsed/(50*time.Millisecond)) + 2; n > limit {
		t.Fatalf("%d passes for 201 changes in %s, want at most %d", n, elapsed, limit)
	}
	t.Logf("201 changes in %s: %d passes", elapsed.Round(time.Millisecond), n)

	// A single change after a quiet period is programmed at once.
	time.Sleep(100 * time.Millisecond)
	t1 := time.Now()
	src.put("b", "10.96.0.2", 80, 8080, "10.244.1.1")
	waitFor(t, time.Second, func() bool { return strings.Contains(dump(t, fake), "10.96.0.2:80/TCP") })
	if lat := time.Since(t1); lat > 40*time.Millisecond {
		t.Errorf("an isolated change took %s", lat)
	}
	if err := r.Healthy(); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, limit time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", limit)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func testLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// A pass that cannot read the state is retried with backoff, not in a busy
// loop, and the agent becomes ready once it can.
func TestRunBacksOffOnFailedPass(t *testing.T) { bothModes(t, testRunBacksOffOnFailedPass) }

func testRunBacksOffOnFailedPass(t *testing.T, inc bool) {
	src := newSource()
	src.inc = inc
	src.synced = true
	src.fail = errors.New("cache broken")
	r := reconcile.New(reconcile.Config{Maps: lbmap.NewFake(lbmap.Capacity{}), Source: src.source(), RetryInterval: 50 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = r.Run(ctx, src.ch) }()
	time.Sleep(300 * time.Millisecond)
	src.mu.Lock()
	calls := src.calls
	src.fail = nil
	src.mu.Unlock()
	// 50 + 100 + 200 ms: at most 4 attempts in 300 ms.
	if calls < 2 || calls > 4 {
		t.Fatalf("%d attempts in 300 ms, want 2-4 (backoff)", calls)
	}
	if r.Ready() {
		t.Fatal("ready without a pass")
	}
	waitFor(t, 2*time.Second, r.Ready)
}

// With an IncrementalSource, a pass after the first rebuilds only the
// Services marked dirty; an option change or a failed read makes the next
// pass rebuild everything, and the maps always end up as the model says.
func TestIncrementalPassesTouchOnlyDirty(t *testing.T) {
	fake := lbmap.NewFake(lbmap.Capacity{})
	src := newSource()
	src.synced, src.inc = true, true
	for i := range 50 {
		src.put("s"+strconv.Itoa(i), "10.96.1."+strconv.Itoa(i), 80, 8080, "10.244.0.1")
	}
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()})
	if st := mustReconcile(t, r, false); st.Mode != "full" || st.Services != 50 {
		t.Fatalf("first pass: %+v", st)
	}
	if st := mustReconcile(t, r, false); st.Mode != "incremental" || st.Dirty != 0 || st.Upserts+st.Deletes != 0 {
		t.Fatalf("pass without changes: %+v", st)
	}
	src.put("s7", "10.96.1.7", 80, 8080, "10.244.0.1", "10.244.0.2")
	src.remove("s8")
	src.put("new", "10.96.2.1", 80, 8080, "10.244.0.3")
	st := mustReconcile(t, r, false)
	if st.Mode != "incremental" || st.Dirty != 3 || st.Upserts != 2 || st.Deletes != 1 || st.Services != 50 || st.Backends != 3 {
		t.Fatalf("three changes: %+v", st)
	}

	// A frontend conflict resolved by a deletion: "s9" takes over the
	// ClusterIP that "s10" held, although only "s10" changed.
	src.put("s9", "10.96.1.10", 80, 8080, "10.244.0.9")
	st = mustReconcile(t, r, false)
	if st.Upserts != 0 || st.Deletes != 1 || st.NewWarnings != 1 { // s9's old ClusterIP goes
		t.Fatalf("conflicting change: %+v", st)
	}
	src.remove("s10")
	st = mustReconcile(t, r, false)
	if st.Dirty != 1 || st.Upserts != 1 || st.Deletes != 0 {
		t.Fatalf("conflict winner removed: %+v", st)
	}
	if d := dump(t, fake); !strings.Contains(d, "SVC 10.96.1.10:80/TCP -> 10.244.0.9:8080\n") {
		t.Fatalf("s9 does not serve 10.96.1.10 after s10 went:\n%s", d)
	}

	r.SetNodeAddrs([]netip.Addr{netip.MustParseAddr("192.168.0.1")})
	if st := mustReconcile(t, r, false); st.Mode != "rebuild" || st.Upserts+st.Deletes != 0 {
		t.Fatalf("after SetNodeAddrs: %+v", st)
	}

	src.put("s11", "10.96.1.11", 80, 8080)
	src.mu.Lock()
	src.fail = errors.New("cache gone")
	src.mu.Unlock()
	if _, err := r.Reconcile(false); err == nil {
		t.Fatal("a failed read did not fail the pass")
	}
	src.mu.Lock()
	src.fail = nil
	src.mu.Unlock()
	if st := mustReconcile(t, r, false); st.Mode != "rebuild" || st.Upserts != 1 {
		t.Fatalf("after a failed read (the dirty set is lost): %+v", st)
	}

	svcs, sl := func() ([]*slim.Service, []*slim.EndpointSlice) {
		s, _ := src.Snapshot()
		return s.Services, s.EndpointSlices
	}()
	want := lbmap.Format(model.Build(svcs, sl, "", model.Options{}).Services())
	if got := dump(t, fake); got != want {
		t.Fatalf("maps:\n%s\nmodel:\n%s", got, want)
	}
	if err := fake.Verify(); err != nil {
		t.Fatal(err)
	}
}

// A periodic full pass over an IncrementalSource updates the model with the
// dirty Services instead of rebuilding it from a Snapshot (which would hold
// two models at once), and still makes the maps exact.
func TestPeriodicFullPassUpdatesTheModel(t *testing.T) {
	fake := lbmap.NewFake(lbmap.Capacity{})
	src := newSource()
	src.synced, src.inc = true, true
	src.put("a", "10.96.0.1", 80, 8080, "10.244.0.1")
	src.put("b", "10.96.0.2", 80, 8080, "10.244.0.2")
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()})
	if st := mustReconcile(t, r, false); st.Mode != "full" || st.Services != 2 {
		t.Fatalf("first pass: %+v", st)
	}
	snaps := src.calls
	src.put("a", "10.96.0.1", 80, 8080, "10.244.0.1", "10.244.0.3")
	src.remove("b")
	st := mustReconcile(t, r, true)
	if st.Mode != "full" || st.Dirty != 2 || st.Services != 1 {
		t.Fatalf("periodic full pass: %+v", st)
	}
	if src.calls != snaps {
		t.Fatalf("the periodic full pass read %d Snapshots, want none", src.calls-snaps)
	}
	svcs, sl := func() ([]*slim.Service, []*slim.EndpointSlice) {
		s, _ := src.Snapshot()
		return s.Services, s.EndpointSlices
	}()
	if got, want := dump(t, fake), lbmap.Format(model.Build(svcs, sl, "", model.Options{}).Services()); got != want {
		t.Fatalf("maps:\n%s\nmodel:\n%s", got, want)
	}
}
