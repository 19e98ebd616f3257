package nodeport

import (
	"context"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Namespace holds the harness's Services.
const Namespace = "default"

// ManagedBy marks the EndpointSlices the harness writes (no EndpointSlice
// controller runs in a test control plane).
const ManagedBy = "kpfree-test"

// Port names of every harness Service: port 80 -> EchoPort, TCP and UDP.
const (
	PortTCP = "tcp"
	PortUDP = "udp"
)

// ServiceSpec is the part of a Service the tests vary.
type ServiceSpec struct {
	Name string
	// Type is ClusterIP, NodePort or LoadBalancer.
	Type corev1.ServiceType
	// Local is externalTrafficPolicy: Local.
	Local bool
	// Affinity is sessionAffinity: ClientIP.
	Affinity     bool
	ExternalIPs  []netip.Addr
	SourceRanges []netip.Prefix
	// LoadBalancerIP, when valid, is written into status.loadBalancer.
	LoadBalancerIP netip.Addr
	Backends       []*Pod
}

// Service is a created Service: its ClusterIP and (for NodePort and
// LoadBalancer) its node ports and health check node port.
type Service struct {
	Name          string
	ClusterIP     netip.Addr
	NodePortTCP   uint16
	NodePortUDP   uint16
	HealthCheckNP uint16
	Object        *corev1.Service
}

// CreateService creates the Service (ports 80/TCP and 80/UDP -> EchoPort)
// and one EndpointSlice listing spec.Backends as ready endpoints with their
// nodeName, and sets the load balancer status when asked.
func (c *Cluster) CreateService(ctx context.Context, spec ServiceSpec) (*Service, error) {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: spec.Name, Namespace: Namespace},
		Spec: corev1.ServiceSpec{
			Type: spec.Type,
			Ports: []corev1.ServicePort{
				{Name: PortTCP, Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromInt32(EchoPort)},
				{Name: PortUDP, Protocol: corev1.ProtocolUDP, Port: 80, TargetPort: intstr.FromInt32(EchoPort)},
			},
		},
	}
	if spec.Type == "" {
		svc.Spec.Type = corev1.ServiceTypeClusterIP
	}
	if spec.Local {
		svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	if spec.Affinity {
		svc.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	}
	for _, ip := range spec.ExternalIPs {
		svc.Spec.ExternalIPs = append(svc.Spec.ExternalIPs, ip.String())
	}
	for _, r := range spec.SourceRanges {
		svc.Spec.LoadBalancerSourceRanges = append(svc.Spec.LoadBalancerSourceRanges, r.String())
	}
	created, err := c.Client.CoreV1().Services(Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create service %s: %w", spec.Name, err)
	}
	if spec.LoadBalancerIP.IsValid() {
		created.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: spec.LoadBalancerIP.String()}}
		if created, err = c.Client.CoreV1().Services(Namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			return nil, fmt.Errorf("service %s: set load balancer status: %w", spec.Name, err)
		}
	}
	out := &Service{Name: spec.Name, Object: created, HealthCheckNP: uint16(created.Spec.HealthCheckNodePort)}
	if out.ClusterIP, err = netip.ParseAddr(created.Spec.ClusterIP); err != nil {
		return nil, fmt.Errorf("service %s: ClusterIP %q: %w", spec.Name, created.Spec.ClusterIP, err)
	}
	for _, p := range created.Spec.Ports {
		switch p.Name {
		case PortTCP:
			out.NodePortTCP = uint16(p.NodePort)
		case PortUDP:
			out.NodePortUDP = uint16(p.NodePort)
		}
	}
	if _, err := c.Client.DiscoveryV1().EndpointSlices(Namespace).Create(ctx, EndpointSlice(created, spec.Backends), metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create endpointslice of %s: %w", spec.Name, err)
	}
	return out, nil
}

// EndpointSlice lists pods as ready endpoints of svc on both ports, with
// their node names (the agents' notion of "local").
func EndpointSlice(svc *corev1.Service, pods []*Pod) *discoveryv1.EndpointSlice {
	t := true
	f := false
	port := int32(EchoPort)
	tcpName, udpName := PortTCP, PortUDP
	tcp, udp := corev1.ProtocolTCP, corev1.ProtocolUDP
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Name: svc.Name + "-1", Namespace: svc.Namespace,
			Labels: map[string]string{discoveryv1.LabelServiceName: svc.Name, discoveryv1.LabelManagedBy: ManagedBy},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []discoveryv1.EndpointPort{
			{Name: &tcpName, Protocol: &tcp, Port: &port},
			{Name: &udpName, Protocol: &udp, Port: &port},
		},
	}
	for _, p := range pods {
		node := p.Node
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{p.Addr.String()},
			NodeName:   &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &t, Serving: &t, Terminating: &f},
		})
	}
	return s
}

// DeleteService deletes a Service CreateService made and its EndpointSlice.
func (c *Cluster) DeleteService(ctx context.Context, name string) error {
	if err := c.Client.CoreV1().Services(Namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete service %s: %w", name, err)
	}
	if err := c.Client.DiscoveryV1().EndpointSlices(Namespace).Delete(ctx, name+"-1", metav1.DeleteOptions{}); err != nil {
		return fmt.Errorf("delete endpointslice %s-1: %w", name, err)
	}
	return nil
}
