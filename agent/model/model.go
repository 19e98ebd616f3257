// Package model turns Kubernetes Services and EndpointSlices into the load
// balancer's desired state: one lbmap.Service per frontend (ClusterIP, port,
// protocol) with its backends in a stable order.
//
// It is pure: no clients, no clock, no I/O. Identical input gives identical
// output, so the reconciler can diff it against the maps and the golden
// tests can pin it down.
//
// Frontends have a [Kind]. Only [KindClusterIP] exists so far; NodePort,
// ExternalIPs and LoadBalancer ingress IPs are further kinds produced from
// the same Service port, each choosing its endpoints with its own traffic
// policy (see frontendsOf and pick).
package model

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kpfree/kpfree/agent/lbmap"
)

// Labels that decide which objects the agent handles (the same ones
// kube-proxy uses).
const (
	// LabelServiceProxyName on a Service hands it to another proxy, unless the
	// value is our own --proxy-name.
	LabelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	// LabelHeadless marks the EndpointSlices of a headless Service.
	LabelHeadless = corev1.IsHeadlessService
)

// Options tune the model.
type Options struct {
	// NodeName is this node: endpoints whose nodeName matches are local
	// (internalTrafficPolicy: Local).
	NodeName string
	// ProxyName is the value of service.kubernetes.io/service-proxy-name that
	// this agent answers to, besides unlabelled Services. Empty: only
	// unlabelled Services, as kube-proxy.
	ProxyName string
}

// Kind is the kind of frontend address a Service port is reached on.
type Kind string

// Frontend kinds. Later issues add NodePort, ExternalIP and LoadBalancer.
const (
	KindClusterIP Kind = "ClusterIP"
)

// Entry is one desired frontend and where it comes from.
type Entry struct {
	Kind     Kind
	Service  types.NamespacedName
	PortName string // the Service port's name ("" for a single unnamed port)
	LB       lbmap.Service
}

// Warning reasons.
const (
	ReasonUnsupportedProtocol = "UnsupportedProtocol"
	ReasonInvalidClusterIP    = "InvalidClusterIP"
	ReasonFrontendConflict    = "FrontendConflict"
	ReasonTooManyBackends     = "TooManyBackends"
	ReasonInvalidEndpoint     = "InvalidEndpoint"
)

// Warning is something about a Service the agent cannot do as asked. The
// agent reports each one once (an Event on the Service and a log line) for as
// long as it persists; Key identifies it across model runs.
type Warning struct {
	Service corev1.ObjectReference // Kind, APIVersion, Namespace, Name, UID
	// Generation of the Service when the warning was made: a changed spec
	// makes a new warning.
	Generation int64
	Reason     string
	Message    string
}

// Key identifies a warning across model runs.
func (w Warning) Key() string {
	return fmt.Sprintf("%s/%s/%s/%d/%s/%s", w.Service.Namespace, w.Service.Name, w.Service.UID, w.Generation, w.Reason, w.Message)
}

func (w Warning) String() string {
	return fmt.Sprintf("%s/%s %s: %s", w.Service.Namespace, w.Service.Name, w.Reason, w.Message)
}

// Result is the desired state.
type Result struct {
	Entries  []Entry   // sorted by frontend, one per frontend
	Warnings []Warning // sorted by Service, then reason and message
}

// Services returns the desired lbmap Services, sorted by frontend.
func (r Result) Services() []lbmap.Service {
	out := make([]lbmap.Service, len(r.Entries))
	for i, e := range r.Entries {
		out[i] = e.LB
	}
	return out
}

// Managed reports whether the agent handles the Service at all, and if not,
// why. Unmanaged Services produce nothing, not even warnings.
func Managed(svc *corev1.Service, o Options) (bool, string) {
	if v, ok := svc.Labels[LabelServiceProxyName]; ok && (o.ProxyName == "" || v != o.ProxyName) {
		return false, fmt.Sprintf("label %s=%q names another proxy", LabelServiceProxyName, v)
	}
	if svc.Spec.Type == corev1.ServiceTypeExternalName {
		return false, "type ExternalName"
	}
	if svc.Spec.ClusterIP == corev1.ClusterIPNone {
		return false, "headless"
	}
	return true, ""
}

// UsableSlice reports whether an EndpointSlice can feed a Service: it names
// its Service, holds IP addresses (not FQDNs) and is not a headless one.
func UsableSlice(es *discoveryv1.EndpointSlice) bool {
	if es.AddressType != discoveryv1.AddressTypeIPv4 && es.AddressType != discoveryv1.AddressTypeIPv6 {
		return false // FQDN (deprecated) and unknown types
	}
	if _, ok := es.Labels[LabelHeadless]; ok {
		return false
	}
	return es.Labels[discoveryv1.LabelServiceName] != ""
}

// Build computes the desired state from the Services and EndpointSlices of
// the cluster (as listed by the informers; they are not modified).
func Build(svcs []*corev1.Service, endpointSlices []*discoveryv1.EndpointSlice, nodeName string, o Options) Result {
	o.NodeName = nodeName
	bySvc := map[types.NamespacedName][]*discoveryv1.EndpointSlice{}
	for _, es := range endpointSlices {
		if es == nil || !UsableSlice(es) {
			continue
		}
		k := types.NamespacedName{Namespace: es.Namespace, Name: es.Labels[discoveryv1.LabelServiceName]}
		bySvc[k] = append(bySvc[k], es)
	}
	for _, l := range bySvc {
		// Slice order decides ties between duplicate endpoints: make it
		// independent of the informer's.
		slices.SortFunc(l, func(a, b *discoveryv1.EndpointSlice) int { return cmp.Compare(a.Name, b.Name) })
	}

	sorted := make([]*corev1.Service, 0, len(svcs))
	for _, s := range svcs {
		if s != nil {
			sorted = append(sorted, s)
		}
	}
	slices.SortFunc(sorted, func(a, b *corev1.Service) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})

	var res Result
	owner := map[lbmap.Frontend]types.NamespacedName{}
	for _, svc := range sorted {
		if ok, _ := Managed(svc, o); !ok {
			continue
		}
		b := builder{svc: svc, opts: o, slices: bySvc[types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}]}
		for _, e := range b.entries() {
			if prev, taken := owner[e.LB.Frontend]; taken {
				b.warn(ReasonFrontendConflict, "%s %s is already served for Service %s; ignored here", e.Kind, e.LB.Frontend, prev)
				continue
			}
			owner[e.LB.Frontend] = e.Service
			res.Entries = append(res.Entries, e)
		}
		res.Warnings = append(res.Warnings, b.warnings...)
	}
	slices.SortFunc(res.Entries, func(a, b Entry) int { return a.LB.Frontend.Compare(b.LB.Frontend) })
	slices.SortStableFunc(res.Warnings, func(a, b Warning) int {
		return cmp.Or(
			cmp.Compare(a.Service.Namespace, b.Service.Namespace),
			cmp.Compare(a.Service.Name, b.Service.Name),
			cmp.Compare(a.Reason, b.Reason),
			cmp.Compare(a.Message, b.Message))
	})
	res.Warnings = slices.CompactFunc(res.Warnings, func(a, b Warning) bool { return a.Key() == b.Key() })
	return res
}

// builder computes the entries of one Service.
type builder struct {
	svc      *corev1.Service
	opts     Options
	slices   []*discoveryv1.EndpointSlice
	warnings []Warning
}

func (b *builder) warn(reason, format string, a ...any) {
	b.warnings = append(b.warnings, Warning{
		Service: corev1.ObjectReference{
			Kind: "Service", APIVersion: "v1",
			Namespace: b.svc.Namespace, Name: b.svc.Name, UID: b.svc.UID,
		},
		Generation: b.svc.Generation,
		Reason:     reason,
		Message:    fmt.Sprintf(format, a...),
	})
}

// frontendAddr is one address a Service port is reached on.
type frontendAddr struct {
	kind Kind
	addr netip.Addr
	port uint16
	// local: choose only this node's endpoints (the traffic policy that
	// applies to this kind says Local).
	local bool
}

// frontendsOf lists the addresses of one Service port. NodePort,
// ExternalIPs and LoadBalancer ingress add their kinds here, with
// externalTrafficPolicy deciding local.
func (b *builder) frontendsOf(sp corev1.ServicePort) []frontendAddr {
	ips := b.svc.Spec.ClusterIPs
	if len(ips) == 0 && b.svc.Spec.ClusterIP != "" {
		ips = []string{b.svc.Spec.ClusterIP}
	}
	local := b.svc.Spec.InternalTrafficPolicy != nil && *b.svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	var out []frontendAddr
	for _, ip := range ips {
		if ip == "" || ip == corev1.ClusterIPNone {
			continue
		}
		a, err := netip.ParseAddr(ip)
		if err != nil || a.Zone() != "" {
			b.warn(ReasonInvalidClusterIP, "clusterIP %q is not an IP address", ip)
			continue
		}
		out = append(out, frontendAddr{kind: KindClusterIP, addr: a.Unmap(), port: uint16(sp.Port), local: local})
	}
	return out
}

func (b *builder) entries() []Entry {
	var affinity time.Duration
	if b.svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		secs := corev1.DefaultClientIPServiceAffinitySeconds
		if c := b.svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil && *c.ClientIP.TimeoutSeconds > 0 {
			secs = *c.ClientIP.TimeoutSeconds
		}
		affinity = time.Duration(secs) * time.Second
	}
	name := types.NamespacedName{Namespace: b.svc.Namespace, Name: b.svc.Name}
	var out []Entry
	for _, sp := range b.svc.Spec.Ports {
		proto := sp.Protocol
		if proto == "" {
			proto = corev1.ProtocolTCP
		}
		var lp lbmap.Proto
		switch proto {
		case corev1.ProtocolTCP:
			lp = lbmap.TCP
		case corev1.ProtocolUDP:
			lp = lbmap.UDP
		default:
			b.warn(ReasonUnsupportedProtocol, "port %s: protocol %s is not supported by kpfree's socket load balancer; it is not load-balanced",
				portLabel(sp, proto), proto)
			continue
		}
		if sp.Port < 1 || sp.Port > 65535 {
			continue // the API server does not allow it
		}
		cands := map[bool][]candidate{} // by family: true = IPv4
		for _, fa := range b.frontendsOf(sp) {
			is4 := fa.addr.Is4()
			if _, ok := cands[is4]; !ok {
				cands[is4] = b.candidates(sp.Name, proto, is4)
			}
			backends := pick(cands[is4], fa.local, b.opts.NodeName)
			if len(backends) > lbmap.MaxBackends {
				b.warn(ReasonTooManyBackends, "%s %s: %d endpoints, only the first %d are used",
					fa.kind, netip.AddrPortFrom(fa.addr, fa.port), len(backends), lbmap.MaxBackends)
				backends = backends[:lbmap.MaxBackends]
			}
			out = append(out, Entry{
				Kind: fa.kind, Service: name, PortName: sp.Name,
				LB: lbmap.Service{
					Frontend: lbmap.Frontend{Addr: fa.addr, Port: fa.port, Proto: lp},
					Backends: backends,
					Affinity: affinity,
				},
			})
		}
	}
	return out
}

func portLabel(sp corev1.ServicePort, proto corev1.Protocol) string {
	if sp.Name != "" {
		return fmt.Sprintf("%q (%d/%s)", sp.Name, sp.Port, proto)
	}
	return fmt.Sprintf("%d/%s", sp.Port, proto)
}
