package slim

import (
	"fmt"
	"runtime"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func ptr[T any](v T) *T { return &v }

// The conversion keeps what the model reads, applies the API defaults the
// model relies on, and drops the rest.
func TestFromServiceAndSlice(t *testing.T) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web", UID: "u1", Generation: 3, ResourceVersion: "9",
			Labels:      map[string]string{LabelServiceProxyName: "kpfree", "app": "web"},
			Annotations: map[string]string{"a": "b"}},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10", "fd00::a"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: 30080},
				{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53}},
			ExternalIPs:     []string{"192.0.2.1"},
			SessionAffinity: corev1.ServiceAffinityClientIP, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			InternalTrafficPolicy: ptr(corev1.ServiceInternalTrafficPolicyLocal), HealthCheckNodePort: 32000,
			LoadBalancerSourceRanges: []string{"198.51.100.0/24"}, Selector: map[string]string{"app": "web"},
		},
		Status: corev1.ServiceStatus{LoadBalancer: corev1.LoadBalancerStatus{Ingress: []corev1.LoadBalancerIngress{
			{IP: "203.0.113.1"}, {Hostname: "lb.example"}, {IP: "203.0.113.2", IPMode: ptr(corev1.LoadBalancerIPModeProxy)}}}},
	}
	want := &Service{Namespace: "ns", Name: "web", UID: "u1", Generation: 3, ProxyName: "kpfree", HasProxyName: true,
		Type: corev1.ServiceTypeLoadBalancer, ClusterIPs: []string{"10.96.0.10", "fd00::a"},
		Ports:       []ServicePort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, NodePort: 30080}, {Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53}},
		ExternalIPs: []string{"192.0.2.1"}, AffinitySeconds: corev1.DefaultClientIPServiceAffinitySeconds,
		InternalLocal: true, ExternalLocal: true, HealthCheckNodePort: 32000, LoadBalancerSourceRanges: []string{"198.51.100.0/24"},
		Ingress: []Ingress{{IP: "203.0.113.1"}, {IP: "203.0.113.2", Proxy: true}}}
	got := FromService(svc)
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("FromService (-want +got):\n%s", d)
	}
	if !got.Equal(want) {
		t.Fatal("Equal is false for equal Services")
	}
	for name, mut := range map[string]func(*Service){
		"clusterIP": func(s *Service) { s.ClusterIPs = []string{"10.96.0.11"} },
		"port":      func(s *Service) { s.Ports = []ServicePort{{Port: 81}} },
		"affinity":  func(s *Service) { s.AffinitySeconds = 1 },
		"ingress":   func(s *Service) { s.Ingress = nil },
	} {
		c := *want
		mut(&c)
		if c.Equal(want) {
			t.Errorf("Equal ignores %s", name)
		}
	}
	// Defaults: no clusterIPs list, custom affinity timeout, headless.
	svc2 := &corev1.Service{Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.1", SessionAffinity: corev1.ServiceAffinityClientIP,
		SessionAffinityConfig: &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr(int32(60))}}}}
	if s := FromService(svc2); len(s.ClusterIPs) != 1 || s.ClusterIPs[0] != "10.96.0.1" || s.AffinitySeconds != 60 || s.Headless {
		t.Errorf("defaults: %+v", s)
	}
	if s := FromService(&corev1.Service{Spec: corev1.ServiceSpec{ClusterIP: corev1.ClusterIPNone}}); !s.Headless {
		t.Error("clusterIP None is not headless")
	}

	es := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: "web-1", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}, {Protocol: ptr(corev1.ProtocolUDP)}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.244.0.1", "10.244.0.9"}, NodeName: ptr("n1")},
			{Addresses: []string{"10.244.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: ptr(false), Serving: ptr(true), Terminating: ptr(true)}},
			{},
		},
	}
	wantES := &EndpointSlice{Namespace: "ns", Name: "web-1", Service: "web", AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []EndpointPort{{Name: "http", Protocol: corev1.ProtocolTCP, Port: 8080}, {Protocol: corev1.ProtocolUDP}},
		Endpoints: []Endpoint{{Address: "10.244.0.1", Ready: true, Serving: true, Node: "n1"},
			{Address: "10.244.0.2", Serving: true, Terminating: true}, {Ready: true, Serving: true}}}
	gotES := FromEndpointSlice(es)
	if d := cmp.Diff(wantES, gotES); d != "" {
		t.Fatalf("FromEndpointSlice (-want +got):\n%s", d)
	}
	if !gotES.Equal(wantES) || gotES.ServiceKey().String() != "ns/web" {
		t.Fatal("Equal or ServiceKey wrong")
	}
	c := *wantES
	c.Endpoints = []Endpoint{{Address: "10.244.0.1", Ready: false, Serving: true, Node: "n1"}}
	if c.Equal(wantES) {
		t.Error("Equal ignores endpoint conditions")
	}
	es.Labels[LabelHeadless] = ""
	if !FromEndpointSlice(es).Headless {
		t.Error("headless label lost")
	}
}

// BenchmarkHeap50k reports the heap 50,000 Services with one two-endpoint
// EndpointSlice each take as decoded API objects (protobuf round trip, as the
// watcher receives them) and in slim form: the figures in the package doc.
// go test -run x -bench Heap50k -benchtime 1x ./agent/slim
func BenchmarkHeap50k(b *testing.B) {
	const n = 50000
	heap := func() float64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return float64(m.HeapAlloc)
	}
	for range b.N {
		h0 := heap()
		svcs, sls := make([]*corev1.Service, n), make([]*discoveryv1.EndpointSlice, n)
		for i := range n {
			svcs[i], sls[i] = apiPair(b, i)
		}
		h1 := heap()
		ss, se := Services(svcs), EndpointSlices(sls)
		svcs, sls = nil, nil
		h2 := heap()
		b.ReportMetric((h1-h0)/n, "api-B/pair")
		b.ReportMetric((h2-h0)/n, "slim-B/pair")
		runtime.KeepAlive(ss)
		runtime.KeepAlive(se)
	}
}

// apiPair is the i-th Service and slice as test/bench/agent creates them,
// with the fields the API server fills in, decoded from protobuf.
func apiPair(b *testing.B, i int) (*corev1.Service, *discoveryv1.EndpointSlice) {
	name, vip := fmt.Sprintf("svc-%06d", i), fmt.Sprintf("10.%d.%d.%d", 100+i>>16, byte(i>>8), byte(i))
	pol, itp := corev1.IPFamilyPolicySingleStack, corev1.ServiceInternalTrafficPolicyCluster
	meta := func(n string) metav1.ObjectMeta {
		return metav1.ObjectMeta{Name: n, Namespace: "default", UID: types.UID(fmt.Sprintf("%08d-1234-1234-1234-123456789012", i)),
			ResourceVersion: fmt.Sprint(100000 + i), CreationTimestamp: metav1.Now()}
	}
	svc := &corev1.Service{ObjectMeta: meta(name), Spec: corev1.ServiceSpec{ClusterIP: vip, ClusterIPs: []string{vip},
		Type: corev1.ServiceTypeClusterIP, SessionAffinity: corev1.ServiceAffinityNone, IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol},
		IPFamilyPolicy: &pol, InternalTrafficPolicy: &itp,
		Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080), Protocol: corev1.ProtocolTCP}}}}
	es := &discoveryv1.EndpointSlice{ObjectMeta: meta(name + "-1"), AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080)), Protocol: ptr(corev1.ProtocolTCP)}}}
	es.Labels = map[string]string{discoveryv1.LabelServiceName: name}
	for _, a := range []string{"10.244.0.1", "10.244.0.2"} {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{a},
			Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)}})
	}
	var s2 corev1.Service
	var e2 discoveryv1.EndpointSlice
	sb, err := svc.Marshal()
	if err == nil {
		err = s2.Unmarshal(sb)
	}
	if err == nil {
		var eb []byte
		if eb, err = es.Marshal(); err == nil {
			err = e2.Unmarshal(eb)
		}
	}
	if err != nil {
		b.Fatal(err)
	}
	return &s2, &e2
}
