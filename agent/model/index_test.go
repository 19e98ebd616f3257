package model_test

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/slim"
)

// cluster is a random cluster state that changes a few Services at a time.
// Addresses, ports and names come from small pools so that frontends
// conflict often.
type cluster struct {
	rnd    *rand.Rand
	svcs   map[types.NamespacedName]*corev1.Service
	slices map[types.NamespacedName][]*discoveryv1.EndpointSlice
	gen    int64
}

func (c *cluster) pick(xs ...string) string { return xs[c.rnd.IntN(len(xs))] }

func (c *cluster) randomService(k types.NamespacedName) *corev1.Service {
	c.gen++
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: k.Namespace, Name: k.Name, UID: types.UID("uid-" + k.Name), Generation: c.gen % 3},
		Spec: corev1.ServiceSpec{
			ClusterIP: c.pick("10.96.0.1", "10.96.0.2", "10.96.0.3", "10.96.0.4", "fd00::1", "bogus"),
		},
	}
	if c.rnd.IntN(4) == 0 {
		svc.Spec.ClusterIPs = []string{svc.Spec.ClusterIP, c.pick("fd00::1", "fd00::2")}
	}
	svc.Spec.Type = corev1.ServiceType(c.pick("ClusterIP", "ClusterIP", "NodePort", "LoadBalancer"))
	if c.rnd.IntN(8) == 0 {
		svc.Labels = map[string]string{model.LabelServiceProxyName: "other"}
	}
	for i := range 1 + c.rnd.IntN(3) {
		sp := corev1.ServicePort{
			Name:       c.pick("", "a", "b"),
			Port:       int32(80 + c.rnd.IntN(2)),
			Protocol:   corev1.Protocol(c.pick("TCP", "TCP", "UDP", "SCTP")),
			TargetPort: intstr.FromInt32(8080),
		}
		if svc.Spec.Type != corev1.ServiceTypeClusterIP {
			sp.NodePort = int32(30000 + c.rnd.IntN(3) + i)
		}
		svc.Spec.Ports = append(svc.Spec.Ports, sp)
	}
	if c.rnd.IntN(3) == 0 {
		svc.Spec.ExternalIPs = []string{c.pick("192.0.2.1", "192.0.2.2", "nope")}
	}
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: c.pick("198.51.100.1", "198.51.100.2", "192.0.2.1")}}
		if c.rnd.IntN(2) == 0 {
			svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
			svc.Spec.HealthCheckNodePort = int32(32000 + c.rnd.IntN(3))
		}
		if c.rnd.IntN(3) == 0 {
			svc.Spec.LoadBalancerSourceRanges = []string{c.pick("10.0.0.0/8", "bad", "fd00::/8")}
		}
	}
	if c.rnd.IntN(5) == 0 {
		local := corev1.ServiceInternalTrafficPolicyLocal
		svc.Spec.InternalTrafficPolicy = &local
	}
	if c.rnd.IntN(5) == 0 {
		svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	}
	return svc
}

func (c *cluster) randomSlices(k types.NamespacedName) []*discoveryv1.EndpointSlice {
	var out []*discoveryv1.EndpointSlice
	for i := range c.rnd.IntN(3) {
		es := &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Namespace: k.Namespace, Name: fmt.Sprintf("%s-%d", k.Name, i), Labels: map[string]string{discoveryv1.LabelServiceName: k.Name}},
			AddressType: discoveryv1.AddressTypeIPv4,
		}
		if c.rnd.IntN(4) == 0 {
			es.AddressType = discoveryv1.AddressTypeIPv6
		}
		name, port, proto := c.pick("", "a", "b"), int32(8080+c.rnd.IntN(2)), corev1.Protocol(c.pick("TCP", "UDP"))
		es.Ports = []discoveryv1.EndpointPort{{Name: &name, Port: &port, Protocol: &proto}}
		for range c.rnd.IntN(4) {
			var addr string
			if es.AddressType == discoveryv1.AddressTypeIPv4 {
				addr = c.pick("10.244.0.1", "10.244.0.2", "10.244.1.3", "fd00::9")
			} else {
				addr = c.pick("fd00:244::1", "fd00:244::2", "10.0.0.1")
			}
			ready, serving, term := c.rnd.IntN(3) > 0, c.rnd.IntN(2) > 0, c.rnd.IntN(3) == 0
			node := c.pick("here", "there")
			es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{addr}, NodeName: &node,
				Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &term}})
		}
		out = append(out, es)
	}
	return out
}

// lists returns the cluster as the watcher hands it to the model.
func (c *cluster) lists() ([]*slim.Service, []*slim.EndpointSlice) {
	var svcs []*corev1.Service
	var sl []*discoveryv1.EndpointSlice
	for _, s := range c.svcs {
		svcs = append(svcs, s)
	}
	for _, l := range c.slices {
		sl = append(sl, l...)
	}
	return slim.Services(svcs), slim.EndpointSlices(sl)
}

func (c *cluster) input(k types.NamespacedName) model.ServiceInput {
	in := model.ServiceInput{Key: k, Slices: slim.EndpointSlices(c.slices[k])}
	if s := c.svcs[k]; s != nil {
		in.Service = slim.FromService(s)
	}
	return in
}

func warningKeys(ws []model.Warning) map[string]bool {
	m := map[string]bool{}
	for _, w := range ws {
		m[w.Key()] = true
	}
	return m
}

// TestIndexEqualsBuild applies random sequences of changes to an Index and
// checks after each that its Result equals Build over the same objects, that
// the Deltas applied in order give Build's Services, and that NewWarnings are
// exactly the warnings Build has now and did not have before.
func TestIndexEqualsBuild(t *testing.T) {
	names := []types.NamespacedName{}
	for _, ns := range []string{"a", "b"} {
		for i := range 7 {
			names = append(names, types.NamespacedName{Namespace: ns, Name: fmt.Sprintf("s%d", i)})
		}
	}
	conflicts := 0
	for seed := range 60 {
		c := &cluster{rnd: rand.New(rand.NewPCG(uint64(seed), 7)),
			svcs: map[types.NamespacedName]*corev1.Service{}, slices: map[types.NamespacedName][]*discoveryv1.EndpointSlice{}}
		opts := model.Options{NodeAddrs: []netip.Addr{netip.MustParseAddr("192.168.1.1"), netip.MustParseAddr("fd00:1::1")},
			LoopbackNodePort: seed%2 == 0}
		if seed%3 == 0 {
			opts.LBAlgorithm = model.LBMaglev
		}
		for _, k := range names[:c.rnd.IntN(len(names))] {
			c.svcs[k] = c.randomService(k)
			c.slices[k] = c.randomSlices(k)
		}
		x := model.NewIndex()
		svcs, sl := c.lists()
		x.Reset(svcs, sl, "here", opts)
		applied := map[lbmap.Frontend]lbmap.Service{}
		for _, s := range x.Services() {
			applied[s.Frontend] = s
		}
		prevWarn := warningKeys(model.Build(svcs, sl, "here", opts).Warnings)
		for step := range 30 {
			var changes []model.ServiceInput
			for _, k := range names {
				if c.rnd.IntN(6) != 0 {
					continue
				}
				switch c.rnd.IntN(4) {
				case 0:
					delete(c.svcs, k)
				case 1:
					c.slices[k] = c.randomSlices(k)
				default:
					c.svcs[k] = c.randomService(k)
				}
				changes = append(changes, c.input(k))
			}
			var d model.Delta
			if step%10 == 9 {
				// A full rebuild now and then: Updates continue from it.
				svcs, sl := c.lists()
				d = x.Reset(svcs, sl, "here", opts)
				clear(applied)
				for _, s := range x.Services() {
					applied[s.Frontend] = s
				}
			} else {
				d = x.Update(changes)
				for _, fe := range d.Removed {
					delete(applied, fe)
				}
				for _, s := range d.Set {
					applied[s.Frontend] = s
				}
			}

			svcs, sl := c.lists()
			want := model.Build(svcs, sl, "here", opts)
			got := x.Result()
			if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
				cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
				t.Fatalf("seed %d step %d: Index.Result differs from Build (-Build +Index):\n%s", seed, step, diff)
			}
			if got, want := lbmap.Format(sortedValues(applied)), lbmap.Format(want.Services()); got != want {
				t.Fatalf("seed %d step %d: Deltas applied give\n%s\nBuild gives\n%s", seed, step, got, want)
			}
			for _, s := range want.Services() {
				if l, ok := x.Lookup(s.Frontend); !ok || !lbmap.SameService(l, s) {
					t.Fatalf("seed %d step %d: Lookup(%s) = %v, %v; want %v", seed, step, s.Frontend, l, ok, s)
				}
			}
			if x.WarningCount() != len(want.Warnings) {
				t.Fatalf("seed %d step %d: WarningCount %d, Build has %d", seed, step, x.WarningCount(), len(want.Warnings))
			}
			now := warningKeys(want.Warnings)
			var wantNew []string
			for k := range now {
				if !prevWarn[k] {
					wantNew = append(wantNew, k)
				}
			}
			var gotNew []string
			for k := range warningKeys(d.NewWarnings) {
				gotNew = append(gotNew, k)
			}
			slices.Sort(wantNew)
			slices.Sort(gotNew)
			if diff := cmp.Diff(wantNew, gotNew); diff != "" {
				t.Fatalf("seed %d step %d: NewWarnings (-want +got):\n%s", seed, step, diff)
			}
			prevWarn = now
			for _, w := range want.Warnings {
				if w.Reason == model.ReasonFrontendConflict {
					conflicts++
				}
			}
		}
	}
	if conflicts < 100 {
		t.Fatalf("only %d frontend conflicts over all steps: the generator does not exercise the conflict index", conflicts)
	}
}

func sortedValues(m map[lbmap.Frontend]lbmap.Service) []lbmap.Service {
	out := make([]lbmap.Service, 0, len(m))
	for _, s := range m {
		out = append(out, s)
	}
	lbmap.SortServices(out)
	return out
}

// TestIndexResetReportsOnlyNewWarnings: a Reset over the same objects
// reports nothing new; one that changes options reports only what changed.
func TestIndexResetReportsOnlyNewWarnings(t *testing.T) {
	c := &cluster{rnd: rand.New(rand.NewPCG(1, 2)),
		svcs: map[types.NamespacedName]*corev1.Service{}, slices: map[types.NamespacedName][]*discoveryv1.EndpointSlice{}}
	for i := range 10 {
		k := types.NamespacedName{Namespace: "a", Name: fmt.Sprint(i)}
		c.svcs[k], c.slices[k] = c.randomService(k), c.randomSlices(k)
	}
	svcs, sl := c.lists()
	x := model.NewIndex()
	d := x.Reset(svcs, sl, "here", model.Options{})
	if len(d.NewWarnings) == 0 || len(d.NewWarnings) != x.WarningCount() {
		t.Fatalf("first Reset: %d new warnings, %d current; want all current, and some", len(d.NewWarnings), x.WarningCount())
	}
	if d := x.Reset(svcs, sl, "here", model.Options{}); len(d.NewWarnings) != 0 {
		t.Fatalf("second Reset over the same objects reported %d warnings again: %v", len(d.NewWarnings), d.NewWarnings)
	}
}
