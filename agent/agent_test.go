//go:build linux

package agent_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/kpfree/kpfree/agent"
	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/watch"
)

// The wiring (informers -> model -> reconciler -> maps, health endpoints)
// over client-go's fake clientset: no API server, runs under -short.
func TestAgentWithFakeClientset(t *testing.T) {
	proxyLabel := map[string]string{"service.kubernetes.io/service-proxy-name": "someone-else"}
	cs := fake.NewClientset(
		service("web", "10.96.0.10", tcpPort("http", 80, 8080)),
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "theirs", Namespace: ns, Labels: proxyLabel},
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.11", Ports: []corev1.ServicePort{tcpPort("", 80, 8080)}}},
		slice("web-1", "web", "http", 8080, "10.244.0.2", "10.244.0.1"),
	)
	maps := lbmap.NewFake(lbmap.Capacity{})
	a, err := agent.New(agent.Config{Client: cs, Maps: maps, NodeName: "n1", NoEvents: true, MinSyncInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Handler(true))
	defer srv.Close()
	if code := get(t, srv.URL+"/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz before sync: %d", code)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- a.Run(ctx) }()
	waitUntil(t, 5*time.Second, a.Ready)
	if code := get(t, srv.URL+"/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz after sync: %d", code)
	}
	if code := get(t, srv.URL+"/healthz"); code != http.StatusOK {
		t.Fatalf("/healthz: %d", code)
	}
	dump := func() string { d, _ := maps.Dump(); return lbmap.Format(d) }
	if got, want := dump(), "SVC 10.96.0.10:80/TCP -> 10.244.0.1:8080 10.244.0.2:8080\n"; got != want {
		t.Fatalf("maps:\n%s\nwant:\n%s", got, want)
	}

	// Node addresses arrive later (device selection): NodePorts follow, and
	// /options says what the model runs with (kpfree verify reads it).
	a.SetNodeAddrs([]netip.Addr{netip.MustParseAddr("198.18.0.2")})
	resp, err := http.Get(srv.URL + "/options")
	if err != nil {
		t.Fatal(err)
	}
	var opts agent.Options
	err = json.NewDecoder(resp.Body).Decode(&opts)
	resp.Body.Close()
	if err != nil || opts.NodeName != "n1" || len(opts.NodeAddrs) != 1 || opts.NodeAddrs[0].String() != "198.18.0.2" {
		t.Fatalf("/options = %+v, %v; want node n1 with address 198.18.0.2", opts, err)
	}

	es, err := cs.DiscoveryV1().EndpointSlices(ns).Get(ctx, "web-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	es.Endpoints = es.Endpoints[:1]
	es.ResourceVersion = "2"
	if _, err := cs.DiscoveryV1().EndpointSlices(ns).Update(ctx, es, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 2*time.Second, func() bool { return dump() == "SVC 10.96.0.10:80/TCP -> 10.244.0.2:8080\n" })

	if err := cs.CoreV1().Services(ns).Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 2*time.Second, func() bool { return dump() == "" })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func get(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestLabelSelector(t *testing.T) {
	for _, tc := range []struct {
		proxyName string
		labels    map[string]string
		want      bool
	}{
		{"", nil, true},
		{"", map[string]string{"service.kubernetes.io/service-proxy-name": "x"}, false},
		{"", map[string]string{"service.kubernetes.io/headless": ""}, false},
		// With a proxy name the API server cannot express "unlabelled or
		// ours": everything but headless passes, the model decides.
		{"kpfree", map[string]string{"service.kubernetes.io/service-proxy-name": "x"}, true},
		{"kpfree", map[string]string{"service.kubernetes.io/headless": ""}, false},
	} {
		sel := watch.LabelSelector(tc.proxyName)
		if got := sel.Matches(labels.Set(tc.labels)); got != tc.want {
			t.Errorf("proxyName %q, labels %v: %v, want %v (selector %s)", tc.proxyName, tc.labels, got, tc.want, sel)
		}
	}
	if s := watch.LabelSelector("").String(); !strings.Contains(s, "!service.kubernetes.io/service-proxy-name") {
		t.Fatalf("selector %s", s)
	}
}
