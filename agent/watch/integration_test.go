package watch

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kpfree/kpfree/test/kubeenv"
)

// countingTransport counts the Service list requests that asked for a page,
// and the streamed initial lists (WatchList).
type countingTransport struct {
	next                 http.RoundTripper
	pages, conts, stream atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	q := r.URL.Query()
	if !strings.HasSuffix(r.URL.Path, "/services") {
		return c.next.RoundTrip(r)
	}
	if q.Get("watch") == "true" && q.Get("sendInitialEvents") == "true" {
		c.stream.Add(1)
	}
	if q.Get("watch") == "" && q.Get("limit") != "" {
		c.pages.Add(1)
		if q.Get("continue") != "" {
			c.conts.Add(1)
		}
	}
	return c.next.RoundTrip(r)
}

// testPageSize keeps the test's cluster small.
const testPageSize = 500

// TestIntegrationInitialList: against the real kube-apiserver, the initial
// list comes in pages (the pager follows the continue tokens; each page is
// converted before the next), never streamed, whether the server streams
// (WatchList, on by default in kube-apiserver 1.34) or not (the 1.33
// default); the store holds every object and follows a change after it.
func TestIntegrationInitialList(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test")
	}
	t.Run("server-watchlist-on", func(t *testing.T) { testInitialList(t, false) })
	t.Run("server-watchlist-off", func(t *testing.T) { testInitialList(t, true) })
}

func testInitialList(t *testing.T, noWatchList bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cp := kubeenv.StartForTest(t, kubeenv.Options{NoWatchList: noWatchList})
	cfg, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg.QPS, cfg.Burst = 1000, 1000
	admin, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	const n = 2*testPageSize + 100
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 16)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			name := fmt.Sprintf("s%04d", i)
			_, err := admin.CoreV1().Services("default").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 80}}}}, metav1.CreateOptions{})
			if err == nil {
				_, err = admin.DiscoveryV1().EndpointSlices("default").Create(ctx, &discoveryv1.EndpointSlice{
					ObjectMeta:  metav1.ObjectMeta{Name: name + "-1", Labels: map[string]string{discoveryv1.LabelServiceName: name}},
					AddressType: discoveryv1.AddressTypeIPv4,
					Endpoints:   []discoveryv1.Endpoint{{Addresses: []string{"10.244.0.1"}}},
				}, metav1.CreateOptions{})
			}
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	ct := &countingTransport{}
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper { ct.next = rt; return ct })
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	w, err := New(cs, Options{})
	if err != nil {
		t.Fatal(err)
	}
	w.pageSize = testPageSize
	wctx, stop := context.WithCancel(ctx)
	defer func() { stop(); w.Shutdown() }()
	w.Start(wctx)
	if !w.WaitForSync(wctx) {
		t.Fatal("not synced")
	}
	snap, _ := w.Snapshot()
	// n Services and slices, and the kubernetes Service with the slice
	// kube-apiserver keeps for it.
	if len(snap.Services) != n+1 || len(snap.EndpointSlices) != n+1 {
		t.Fatalf("store holds %d Services and %d slices, want %d of each", len(snap.Services), len(snap.EndpointSlices), n+1)
	}
	if p, c, st := ct.pages.Load(), ct.conts.Load(), ct.stream.Load(); p < 3 || c < 2 || st != 0 {
		t.Fatalf("the Service list came in %d page requests (%d with a continue token) and %d streams, want >= 3 pages of %d and no stream",
			p, c, st, testPageSize)
	}
	svc, sl, _ := w.Service(types.NamespacedName{Namespace: "default", Name: "s0777"})
	if svc == nil || len(sl) != 1 || sl[0].Endpoints[0].Address != "10.244.0.1" {
		t.Fatalf("Service s0777 = %+v, %v", svc, sl)
	}
	w.TakeDirty()
	if err := admin.DiscoveryV1().EndpointSlices("default").Delete(ctx, "s0777-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, sl, _ := w.Service(types.NamespacedName{Namespace: "default", Name: "s0777"}); len(sl) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the slice deletion after the list was not seen")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
