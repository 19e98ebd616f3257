package podnet

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func node(name string, cidrs []string, ips ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}}
	if len(cidrs) > 0 {
		n.Spec.PodCIDR = cidrs[0]
	}
	for _, ip := range ips {
		n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip})
	}
	n.Status.Addresses = append(n.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeHostName, Address: name})
	return n
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }
func addr(s string) netip.Addr  { return netip.MustParseAddr(s) }

func TestDesired(t *testing.T) {
	three := []corev1.Node{
		*node("node1", []string{"10.244.0.0/24"}, "198.18.0.11"),
		*node("node2", []string{"10.244.1.0/24"}, "198.18.0.12"),
		*node("node3", []string{"10.244.2.0/24"}, "198.18.0.13"),
	}
	tests := []struct {
		name     string
		self     string
		nodes    []corev1.Node
		routes   []Route
		warnings []string
		err      error
	}{
		{
			name: "three nodes", self: "node2", nodes: three,
			routes: []Route{
				{Dst: pfx("10.244.0.0/24"), Via: addr("198.18.0.11"), Node: "node1"},
				{Dst: pfx("10.244.2.0/24"), Via: addr("198.18.0.13"), Node: "node3"},
			},
		},
		{
			name: "a node without a pod CIDR yet", self: "node1",
			nodes:    []corev1.Node{*node("node1", []string{"10.244.0.0/24"}, "198.18.0.11"), *node("node2", nil, "198.18.0.12")},
			warnings: []string{"node node2 has no pod CIDR yet: no route to its pods"},
		},
		{
			name: "self without a pod CIDR", self: "node2",
			nodes: []corev1.Node{*node("node1", []string{"10.244.0.0/24"}, "198.18.0.11"), *node("node2", nil, "198.18.0.12")},
			err:   ErrNoPodCIDR,
		},
		{
			name: "dual stack, a node with IPv4 only", self: "a",
			nodes: []corev1.Node{
				*node("a", []string{"10.244.0.0/24", "fd00:10:244::/64"}, "10.0.0.1", "fd00::1"),
				*node("b", []string{"10.244.1.0/24", "fd00:10:244:1::/64"}, "fd00::2", "10.0.0.2"),
				*node("c", []string{"10.244.2.0/24", "fd00:10:244:2::/64"}, "10.0.0.3"),
			},
			routes: []Route{
				{Dst: pfx("10.244.1.0/24"), Via: addr("10.0.0.2"), Node: "b"},
				{Dst: pfx("10.244.2.0/24"), Via: addr("10.0.0.3"), Node: "c"},
				{Dst: pfx("fd00:10:244:1::/64"), Via: addr("fd00::2"), Node: "b"},
			},
			warnings: []string{"node c has no InternalIP of the family of fd00:10:244:2::/64: no route to it"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Desired(tt.self, FromNodes(tt.nodes), Options{})
			if !errors.Is(err, tt.err) {
				t.Fatalf("err = %v, want %v", err, tt.err)
			}
			if err != nil {
				return
			}
			if diff := cmp.Diff(tt.routes, p.Routes, cmp.Comparer(func(a, b netip.Addr) bool { return a == b }), cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
				t.Errorf("routes (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.warnings, p.Warnings); diff != "" {
				t.Errorf("warnings (-want +got):\n%s", diff)
			}
			if p.ConfPath != "/etc/cni/net.d/05-kpfree.conflist" {
				t.Errorf("ConfPath = %s", p.ConfPath)
			}
		})
	}
}

func TestConfList(t *testing.T) {
	got, err := ConfList([]netip.Prefix{pfx("10.244.1.0/24"), pfx("fd00:10:244:1::/64")}, Options{MTU: 1450})
	if err != nil {
		t.Fatal(err)
	}
	want := `{
  "cniVersion": "1.0.0",
  "name": "kpfree",
  "plugins": [
    {
      "bridge": "kpfree0",
      "hairpinMode": true,
      "ipMasq": false,
      "ipam": {
        "ranges": [
          [
            {
              "subnet": "10.244.1.0/24"
            }
          ],
          [
            {
              "subnet": "fd00:10:244:1::/64"
            }
          ]
        ],
        "routes": [
          {
            "dst": "0.0.0.0/0"
          },
          {
            "dst": "::/0"
          }
        ],
        "type": "host-local"
      },
      "isGateway": true,
      "mtu": 1450,
      "type": "bridge"
    }
  ]
}
`
	if diff := cmp.Diff(want, string(got)); diff != "" {
		t.Errorf("conflist (-want +got):\n%s", diff)
	}
}

func TestScriptAndDrift(t *testing.T) {
	p, err := Desired("node1", FromNodes([]corev1.Node{
		*node("node1", []string{"10.244.0.0/24"}, "198.18.0.11"),
		*node("node2", []string{"10.244.1.0/24"}, "198.18.0.12"),
	}), Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := p.Script()
	for _, want := range []string{
		"ip -4 route replace 10.244.1.0/24 via 198.18.0.12 proto 201\n",
		`ip -4 route show proto 201 | while read -r dst _; do case "$dst" in 10.244.1.0/24) ;; *) ip -4 route del "$dst" proto 201 ;; esac; done`,
		`case "$dst" in __none__) ;; *) ip -6 route del`,
		`ip -o addr show dev kpfree0 scope global 2>/dev/null | while read -r _ _ _ addr _; do case "$addr" in 10.244.0.1/24) ;; *) ip addr del "$addr" dev kpfree0 ;; esac; done`,
	} {
		if !strings.Contains(s, want) {
			t.Errorf("script lacks %q:\n%s", want, s)
		}
	}

	ob := ParseObserved(string(p.ConfList) + routesMarker + "\n" +
		"10.244.1.0/24 via 198.18.0.12 dev eth0 proto 201 \n10.244.9.0/24 via 198.18.0.19 dev eth0 proto 201\nbroken line\n" + addrsMarker + "\n" +
		"5: kpfree0    inet 10.244.0.1/24 brd 10.244.0.255 scope global kpfree0\\       valid_lft forever preferred_lft forever\n" +
		"5: kpfree0    inet 10.244.7.1/24 brd 10.244.7.255 scope global kpfree0\\       valid_lft forever preferred_lft forever\n")
	got := p.Drift(ob)
	want := []string{"route 10.244.9.0/24 via 198.18.0.19 is stale", "bridge kpfree0 has a stale address 10.244.7.1/24"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("drift (-want +got):\n%s", diff)
	}
	if d := p.Drift(Observed{}); len(d) != 2 || !strings.Contains(d[0], "missing") || !strings.Contains(d[1], "10.244.1.0/24 via 198.18.0.12 is missing") {
		t.Errorf("drift of an empty node = %q", d)
	}
	if d := p.Drift(Observed{Conf: append([]byte("\n"), p.ConfList...), Routes: ParseRoutes("10.244.1.0/24 via 198.18.0.12 dev eth0 proto 201"),
		BridgeAddrs: []netip.Prefix{pfx("10.244.0.1/24")}}); len(d) != 0 {
		t.Errorf("in-line node drifts: %q", d)
	}
}

func TestRunFollowsNodes(t *testing.T) {
	cs := fake.NewClientset(node("node1", nil, "198.18.0.11"), node("node2", []string{"10.244.1.0/24"}, "198.18.0.12"))
	var mu sync.Mutex
	var plans []Plan
	applied := make(chan struct{}, 10)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, Config{Client: cs, NodeName: "node1", Resync: time.Hour, Apply: func(p Plan) ([]string, error) {
			mu.Lock()
			plans = append(plans, p)
			mu.Unlock()
			applied <- struct{}{}
			return []string{"x"}, nil
		}})
	}()
	// node1 has no pod CIDR yet: nothing is applied until it gets one.
	time.Sleep(200 * time.Millisecond)
	mu.Lock()
	n := len(plans)
	mu.Unlock()
	if n != 0 {
		t.Fatalf("applied %d plans before node1 had a pod CIDR", n)
	}
	n1 := node("node1", []string{"10.244.0.0/24"}, "198.18.0.11")
	if _, err := cs.CoreV1().Nodes().Update(ctx, n1, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-applied:
	case <-ctx.Done():
		t.Fatal("no plan applied after node1 got its pod CIDR")
	}
	n3 := node("node3", []string{"10.244.2.0/24"}, "198.18.0.13")
	if _, err := cs.CoreV1().Nodes().Create(ctx, n3, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case <-applied:
		case <-ctx.Done():
			t.Fatal("node3 never got a route")
		}
		mu.Lock()
		last := plans[len(plans)-1]
		mu.Unlock()
		if len(last.Routes) == 2 {
			break
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run = %v, want context.Canceled", err)
	}
}
