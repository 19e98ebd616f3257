package watch

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
)

func TestTrimNodeDropsWhatTheAgentNeverReads(t *testing.T) {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "n1", Labels: map[string]string{"zone": "a"},
			Annotations:   map[string]string{"node.alpha.kubernetes.io/ttl": "0"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}},
		Status: corev1.NodeStatus{
			Images:    []corev1.ContainerImage{{Names: []string{"pause"}}},
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "198.18.0.2"}},
		},
	}
	if _, err := trimNode(node); err != nil {
		t.Fatal(err)
	}
	if node.ManagedFields != nil || node.Annotations != nil || node.Status.Images != nil {
		t.Errorf("managed fields, annotations or images kept: %+v", node)
	}
	if node.Name != "n1" || node.Labels["zone"] != "a" || len(node.Status.Addresses) != 1 {
		t.Errorf("name, labels or addresses lost: %+v", node)
	}
	tomb := cache.DeletedFinalStateUnknown{Key: "n1"}
	if out, err := trimNode(tomb); err != nil || out != tomb {
		t.Errorf("tombstone: %v %v", out, err)
	}
}

// Changes to Services and EndpointSlices mark their Service dirty (a slice
// moved to another Service marks both); Service reads the object and its
// slices from the caches.
func TestDirtyServicesAndLookup(t *testing.T) {
	cs := fake.NewClientset()
	w, err := New(cs, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); w.Shutdown() }()
	w.Start(ctx)
	if !w.WaitForSync(ctx) {
		t.Fatal("informers did not sync")
	}
	a := types.NamespacedName{Namespace: "ns", Name: "a"}
	b := types.NamespacedName{Namespace: "ns", Name: "b"}
	slice := func(svc string, addr string) *discoveryv1.EndpointSlice {
		return &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: "a-1", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{addr}}},
		}
	}
	// waitDirty collects dirty keys until it has want (informer handlers run
	// asynchronously).
	waitDirty := func(want ...types.NamespacedName) {
		t.Helper()
		got := map[types.NamespacedName]bool{}
		deadline := time.Now().Add(5 * time.Second)
		for len(got) < len(want) && time.Now().Before(deadline) {
			for _, k := range w.TakeDirty() {
				got[k] = true
			}
			time.Sleep(5 * time.Millisecond)
		}
		for _, k := range want {
			if !got[k] {
				t.Fatalf("dirty %v, want %v", got, want)
			}
		}
		if len(got) != len(want) {
			t.Fatalf("dirty %v, want only %v", got, want)
		}
	}

	svcs, slices := cs.CoreV1().Services("ns"), cs.DiscoveryV1().EndpointSlices("ns")
	if _, err := svcs.Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "a"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := slices.Create(ctx, slice("a", "10.0.0.1"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitDirty(a)
	svc, sl, err := w.Service(a)
	if err != nil || svc == nil || len(sl) != 1 || sl[0].Endpoints[0].Address != "10.0.0.1" {
		t.Fatalf("Service(a) = %v, %v, %v", svc, sl, err)
	}

	es := slice("b", "10.0.0.2")
	es.ResourceVersion = "2"
	if _, err := slices.Update(ctx, es, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitDirty(a, b)
	if _, sl, _ := w.Service(a); len(sl) != 0 {
		t.Fatalf("a still has the slice that moved to b: %v", sl)
	}
	if svc, sl, _ := w.Service(b); svc != nil || len(sl) != 1 {
		t.Fatalf("Service(b) = %v, %v; want no Service, one slice", svc, sl)
	}

	// An update the agent cannot see (an annotation) marks nothing.
	cur, err := svcs.Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Annotations = map[string]string{"note": "x"}
	cur.ResourceVersion = "3"
	if _, err := svcs.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if d := w.TakeDirty(); len(d) != 0 {
		t.Fatalf("an annotation change marked %v dirty", d)
	}

	if err := svcs.Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitDirty(a)
	if svc, _, err := w.Service(a); svc != nil || err != nil {
		t.Fatalf("deleted Service(a) = %v, %v", svc, err)
	}
}

// A relist (Replace) marks only what differs from the store: a Service gone
// from the list, a new one, a changed one; an identical one marks nothing.
func TestReplaceMarksOnlyDifferences(t *testing.T) {
	w, err := New(fake.NewClientset(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	svc := func(name, ip string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
			Spec: corev1.ServiceSpec{ClusterIP: ip, Ports: []corev1.ServicePort{{Port: 80}}}}
	}
	st := w.serviceStore()
	if err := st.Replace([]any{svc("same", "10.96.0.1"), svc("changed", "10.96.0.2"), svc("gone", "10.96.0.3")}, "1"); err != nil {
		t.Fatal(err)
	}
	if !w.svcSynced.Load() || len(w.TakeDirty()) != 3 {
		t.Fatal("first list: want synced and 3 dirty")
	}
	if err := st.Replace([]any{svc("same", "10.96.0.1"), svc("changed", "10.96.0.9"), svc("new", "10.96.0.4")}, "2"); err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, k := range w.TakeDirty() {
		got[k.Name] = true
	}
	if len(got) != 3 || !got["changed"] || !got["gone"] || !got["new"] {
		t.Fatalf("relist marked %v, want changed, gone, new", got)
	}
	if s, _, _ := w.Service(types.NamespacedName{Namespace: "ns", Name: "gone"}); s != nil {
		t.Fatal("a Service missing from the relist is still there")
	}
	if s, _, _ := w.Service(types.NamespacedName{Namespace: "ns", Name: "changed"}); s == nil || s.ClusterIPs[0] != "10.96.0.9" {
		t.Fatalf("changed Service = %+v", s)
	}
	// Unusable slices (no Service label, FQDN) are not kept at all.
	ss := w.sliceStore()
	if err := ss.Add(&discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "x"}, AddressType: discoveryv1.AddressTypeIPv4}); err != nil {
		t.Fatal(err)
	}
	if err := ss.Add(&discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "y",
		Labels: map[string]string{discoveryv1.LabelServiceName: "same"}}, AddressType: discoveryv1.AddressTypeFQDN}); err != nil {
		t.Fatal(err)
	}
	if snap, _ := w.Snapshot(); len(snap.EndpointSlices) != 0 || len(w.TakeDirty()) != 0 {
		t.Fatalf("unusable slices kept: %d", len(snap.EndpointSlices))
	}
}
