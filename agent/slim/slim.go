// Package slim holds what kpfree-agent reads of Services and EndpointSlices,
// and nothing else: the watcher converts every object as it arrives and
// keeps only these, and agent/model computes the load balancer from them.
//
// A decoded corev1.Service with its two-endpoint EndpointSlice takes ~2.1
// KiB of heap, even without managed fields or annotations; their slim forms
// take ~0.7 KiB, with the strings that repeat across objects (namespaces,
// node names, port names, protocols) interned. At 50,000 Services that is
// ~100 MiB against ~34 MiB of live heap (BenchmarkHeap50k).
//
// Conversion applies the API's defaults the model relies on (a missing
// protocol is TCP, missing ready/serving conditions are true, missing
// terminating is false), so the model never sees a nil pointer. Slim objects
// are values shared by the watcher and the model: never modify one.
package slim

import (
	"slices"
	"unique"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Labels the agent reads (the same ones kube-proxy uses).
const (
	// LabelServiceProxyName on a Service hands it to another proxy.
	LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	// LabelHeadless marks the EndpointSlices of a headless Service.
	LabelHeadless = corev1.IsHeadlessService
)

// Service is what the agent reads of a corev1.Service.
type Service struct {
	Namespace, Name string
	UID             types.UID
	Generation      int64
	// ProxyName is the service.kubernetes.io/service-proxy-name label,
	// HasProxyName whether it is there at all.
	ProxyName    string
	HasProxyName bool
	Type         corev1.ServiceType
	// Headless: spec.clusterIP is "None".
	Headless bool
	// ClusterIPs is spec.clusterIPs, or spec.clusterIP alone when the list
	// is empty; as written (the model validates them).
	ClusterIPs  []string
	Ports       []ServicePort
	ExternalIPs []string
	// AffinitySeconds is the ClientIP session affinity timeout (the API
	// default when unset); 0: no affinity.
	AffinitySeconds int32
	// InternalLocal: internalTrafficPolicy Local; ExternalLocal:
	// externalTrafficPolicy Local (whatever the type: the model checks it).
	InternalLocal, ExternalLocal bool
	HealthCheckNodePort          int32
	LoadBalancerSourceRanges     []string
	// Ingress are status.loadBalancer.ingress entries with an IP.
	Ingress []Ingress
}

// ServicePort is one spec.ports entry.
type ServicePort struct {
	Name     string
	Protocol corev1.Protocol // "" in the API is TCP here
	Port     int32
	NodePort int32
}

// Ingress is one load balancer ingress IP.
type Ingress struct {
	IP string
	// Proxy: ipMode Proxy (the load balancer proxies; traffic arrives for the
	// node's addresses, not this IP).
	Proxy bool
}

// Key is the Service's namespace/name.
func (s *Service) Key() types.NamespacedName {
	return types.NamespacedName{Namespace: s.Namespace, Name: s.Name}
}

// Equal reports whether two Services are the same to the agent.
func (s *Service) Equal(o *Service) bool {
	if s == nil || o == nil {
		return s == o
	}
	return s.Namespace == o.Namespace && s.Name == o.Name && s.UID == o.UID && s.Generation == o.Generation &&
		s.ProxyName == o.ProxyName && s.HasProxyName == o.HasProxyName && s.Type == o.Type && s.Headless == o.Headless &&
		slices.Equal(s.ClusterIPs, o.ClusterIPs) && slices.Equal(s.Ports, o.Ports) && slices.Equal(s.ExternalIPs, o.ExternalIPs) &&
		s.AffinitySeconds == o.AffinitySeconds && s.InternalLocal == o.InternalLocal && s.ExternalLocal == o.ExternalLocal &&
		s.HealthCheckNodePort == o.HealthCheckNodePort && slices.Equal(s.LoadBalancerSourceRanges, o.LoadBalancerSourceRanges) &&
		slices.Equal(s.Ingress, o.Ingress)
}

// EndpointSlice is what the agent reads of a discoveryv1.EndpointSlice.
type EndpointSlice struct {
	Namespace, Name string
	// Service is the kubernetes.io/service-name label ("": none).
	Service string
	// Headless: the service.kubernetes.io/headless label is there.
	Headless    bool
	AddressType discoveryv1.AddressType
	Ports       []EndpointPort
	Endpoints   []Endpoint
}

// EndpointPort is one ports entry.
type EndpointPort struct {
	Name     string
	Protocol corev1.Protocol // nil in the API is TCP here
	Port     int32           // 0: none given
}

// Endpoint is one endpoint: its first address (the others are alternatives
// of the same endpoint, as kube-proxy reads them) and its conditions with the
// API's defaults applied.
type Endpoint struct {
	Address                     string // "": no address
	Ready, Serving, Terminating bool
	Node                        string
}

// ServiceKey is the namespace/name of the Service the slice belongs to.
func (e *EndpointSlice) ServiceKey() types.NamespacedName {
	return types.NamespacedName{Namespace: e.Namespace, Name: e.Service}
}

// Equal reports whether two EndpointSlices are the same to the agent.
func (e *EndpointSlice) Equal(o *EndpointSlice) bool {
	if e == nil || o == nil {
		return e == o
	}
	return e.Namespace == o.Namespace && e.Name == o.Name && e.Service == o.Service && e.Headless == o.Headless &&
		e.AddressType == o.AddressType && slices.Equal(e.Ports, o.Ports) && slices.Equal(e.Endpoints, o.Endpoints)
}

// intern returns the canonical copy of a string that repeats across objects.
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

func internT[T ~string](s T) T { return T(intern(string(s))) }

// strs copies a string list into one exactly sized allocation (nil when
// empty); the strings themselves are shared with the source.
func strs(l []string) []string {
	if len(l) == 0 {
		return nil
	}
	return slices.Clip(slices.Clone(l))
}

// FromService converts a Service.
func FromService(s *corev1.Service) *Service {
	out := &Service{
		Namespace:           intern(s.Namespace),
		Name:                s.Name,
		UID:                 s.UID,
		Generation:          s.Generation,
		Type:                internT(s.Spec.Type),
		Headless:            s.Spec.ClusterIP == corev1.ClusterIPNone,
		ExternalIPs:         strs(s.Spec.ExternalIPs),
		ExternalLocal:       s.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal,
		InternalLocal:       s.Spec.InternalTrafficPolicy != nil && *s.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal,
		HealthCheckNodePort: s.Spec.HealthCheckNodePort,
	}
	out.ProxyName, out.HasProxyName = s.Labels[LabelServiceProxyName]
	out.ProxyName = intern(out.ProxyName)
	if len(s.Spec.ClusterIPs) > 0 {
		out.ClusterIPs = strs(s.Spec.ClusterIPs)
	} else if s.Spec.ClusterIP != "" {
		out.ClusterIPs = []string{s.Spec.ClusterIP}
	}
	if len(s.Spec.Ports) > 0 {
		out.Ports = make([]ServicePort, len(s.Spec.Ports))
		for i, p := range s.Spec.Ports {
			proto := p.Protocol
			if proto == "" {
				proto = corev1.ProtocolTCP
			}
			out.Ports[i] = ServicePort{Name: intern(p.Name), Protocol: internT(proto), Port: p.Port, NodePort: p.NodePort}
		}
	}
	if s.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		out.AffinitySeconds = corev1.DefaultClientIPServiceAffinitySeconds
		if c := s.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil && *c.ClientIP.TimeoutSeconds > 0 {
			out.AffinitySeconds = *c.ClientIP.TimeoutSeconds
		}
	}
	if s.Spec.Type == corev1.ServiceTypeLoadBalancer {
		out.LoadBalancerSourceRanges = strs(s.Spec.LoadBalancerSourceRanges)
		for _, ing := range s.Status.LoadBalancer.Ingress {
			if ing.IP == "" {
				continue // hostname only
			}
			out.Ingress = append(out.Ingress, Ingress{IP: ing.IP,
				Proxy: ing.IPMode != nil && *ing.IPMode == corev1.LoadBalancerIPModeProxy})
		}
		out.Ingress = slices.Clip(out.Ingress)
	}
	return out
}

// FromEndpointSlice converts an EndpointSlice.
func FromEndpointSlice(es *discoveryv1.EndpointSlice) *EndpointSlice {
	out := &EndpointSlice{
		Namespace:   intern(es.Namespace),
		Name:        es.Name,
		Service:     es.Labels[discoveryv1.LabelServiceName],
		AddressType: internT(es.AddressType),
	}
	_, out.Headless = es.Labels[LabelHeadless]
	if len(es.Ports) > 0 {
		out.Ports = make([]EndpointPort, len(es.Ports))
		for i, p := range es.Ports {
			ep := EndpointPort{Protocol: corev1.ProtocolTCP}
			if p.Name != nil {
				ep.Name = intern(*p.Name)
			}
			if p.Protocol != nil {
				ep.Protocol = internT(*p.Protocol)
			}
			if p.Port != nil {
				ep.Port = *p.Port
			}
			out.Ports[i] = ep
		}
	}
	if len(es.Endpoints) > 0 {
		out.Endpoints = make([]Endpoint, len(es.Endpoints))
		for i, e := range es.Endpoints {
			c := e.Conditions
			ep := Endpoint{
				Ready:       c.Ready == nil || *c.Ready,
				Serving:     c.Serving == nil || *c.Serving,
				Terminating: c.Terminating != nil && *c.Terminating,
			}
			if len(e.Addresses) > 0 {
				ep.Address = e.Addresses[0]
			}
			if e.NodeName != nil {
				ep.Node = intern(*e.NodeName)
			}
			out.Endpoints[i] = ep
		}
	}
	return out
}

// Services converts a list (nil entries are skipped).
func Services(l []*corev1.Service) []*Service {
	out := make([]*Service, 0, len(l))
	for _, s := range l {
		if s != nil {
			out = append(out, FromService(s))
		}
	}
	return out
}

// EndpointSlices converts a list (nil entries are skipped).
func EndpointSlices(l []*discoveryv1.EndpointSlice) []*EndpointSlice {
	out := make([]*EndpointSlice, 0, len(l))
	for _, es := range l {
		if es != nil {
			out = append(out, FromEndpointSlice(es))
		}
	}
	return out
}
