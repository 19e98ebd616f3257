package kubeproxy

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// Namespace is where CreateService puts its objects.
const Namespace = "default"

// ManagedBy is the endpointslice.kubernetes.io/managed-by value of the
// EndpointSlices CreateService writes: no EndpointSlice controller runs in a
// test control plane, and this tells a real one to leave them alone.
const ManagedBy = "kpfree-test"

// NewClient returns a clientset for a kubeconfig (e.g. ControlPlane.Kubeconfig).
func NewClient(kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	cfg.QPS, cfg.Burst = 500, 1000 // benchmarks create thousands of objects
	cfg.Timeout = 30 * time.Second
	return kubernetes.NewForConfig(cfg)
}

// EnsureNode creates the Node object kube-proxy looks up by its hostname
// override, with addr as its InternalIP, unless it exists.
func EnsureNode(ctx context.Context, c kubernetes.Interface, name string, addr netip.Addr) error {
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			"kubernetes.io/hostname": name,
			"kubernetes.io/os":       "linux",
		}},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: addr.String()},
			{Type: corev1.NodeHostName, Address: name},
		}},
	}
	_, err := c.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create node %s: %w", name, err)
	}
	return nil
}

// CreateService creates a ClusterIP Service without selector (TCP, port ->
// the backends' ports) in Namespace, and EndpointSlices for it listing
// backends as ready endpoints (one slice per backend port), and returns the
// ClusterIP the API server allocated.
func CreateService(ctx context.Context, c kubernetes.Interface, name string, port int32, backends []netip.AddrPort) (netip.Addr, error) {
	if len(backends) == 0 {
		return netip.Addr{}, fmt.Errorf("service %s: no backends", name)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: Namespace},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeClusterIP,
			Ports: []corev1.ServicePort{{
				Name: "", Protocol: corev1.ProtocolTCP, Port: port,
				TargetPort: intstr.FromInt32(int32(backends[0].Port())),
			}},
		},
	}
	svc, err := c.CoreV1().Services(Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return netip.Addr{}, fmt.Errorf("create service %s: %w", name, err)
	}
	ip, err := netip.ParseAddr(svc.Spec.ClusterIP)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("service %s: ClusterIP %q: %w", name, svc.Spec.ClusterIP, err)
	}
	for _, slice := range endpointSlices(svc, backends) {
		if _, err := c.DiscoveryV1().EndpointSlices(Namespace).Create(ctx, slice, metav1.CreateOptions{}); err != nil {
			return ip, fmt.Errorf("create endpointslice %s: %w", slice.Name, err)
		}
	}
	return ip, nil
}

// endpointSlices groups backends by port: an EndpointSlice has one port
// list for all its endpoints.
func endpointSlices(svc *corev1.Service, backends []netip.AddrPort) []*discoveryv1.EndpointSlice {
	byPort := map[uint16][]netip.Addr{}
	for _, b := range backends {
		byPort[b.Port()] = append(byPort[b.Port()], b.Addr())
	}
	ports := make([]uint16, 0, len(byPort))
	for p := range byPort {
		ports = append(ports, p)
	}
	slices.Sort(ports)
	var out []*discoveryv1.EndpointSlice
	for i, p := range ports {
		addrs := byPort[p]
		slices.SortFunc(addrs, func(a, b netip.Addr) int { return cmp.Compare(a.String(), b.String()) })
		s := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{
				Name:      fmt.Sprintf("%s-%d", svc.Name, i),
				Namespace: svc.Namespace,
				Labels: map[string]string{
					discoveryv1.LabelServiceName: svc.Name,
					discoveryv1.LabelManagedBy:   ManagedBy,
				},
				OwnerReferences: []metav1.OwnerReference{{
					APIVersion: "v1", Kind: "Service", Name: svc.Name, UID: svc.UID,
				}},
			},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports: []discoveryv1.EndpointPort{{
				Name: ptr(""), Protocol: ptr(corev1.ProtocolTCP), Port: ptr(int32(p)),
			}},
		}
		for _, a := range addrs {
			s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
				Addresses:  []string{a.String()},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr(true), Serving: ptr(true), Terminating: ptr(false)},
			})
		}
		out = append(out, s)
	}
	return out
}

// DeleteService deletes a Service CreateService made and its
// EndpointSlices (no garbage collector runs in a test control plane).
func DeleteService(ctx context.Context, c kubernetes.Interface, name string) error {
	if err := c.CoreV1().Services(Namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete service %s: %w", name, err)
	}
	err := c.DiscoveryV1().EndpointSlices(Namespace).DeleteCollection(ctx, metav1.DeleteOptions{},
		metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + name + "," + discoveryv1.LabelManagedBy + "=" + ManagedBy})
	if err != nil {
		return fmt.Errorf("delete endpointslices of %s: %w", name, err)
	}
	return nil
}

func ptr[T any](v T) *T { return &v }
