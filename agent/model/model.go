// Package model turns Kubernetes Services and EndpointSlices into the load
// balancer's desired state: one lbmap.Service per frontend (address, port,
// protocol, scope) with its backends in a stable order, plus the health
// checks of externalTrafficPolicy Local load balancers.
//
// It is pure: no clients, no clock, no I/O. Identical input gives identical
// output, so the reconciler can diff it against the maps and the golden
// tests can pin it down. [Build] computes the whole state; an [Index] keeps
// the same result up to date one changed Service at a time (a test checks
// that both agree over random sequences of changes).
//
// Frontends have a [Kind]: ClusterIP, NodePort (on each node address, and
// 127.0.0.1 for the socket load balancer only), ExternalIP and LoadBalancer
// ingress IP, all produced from the same Service port, each choosing its
// endpoints with its own traffic policy as kube-proxy does (see frontendsOf,
// entriesOf and pick): internalTrafficPolicy for ClusterIPs,
// externalTrafficPolicy for the others. An externalTrafficPolicy Local
// frontend has two entries: the internal scope (this node's pods and
// processes, all endpoints) and the external scope (traffic entering the
// node, local endpoints only, no SNAT).
package model

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/slim"
)

// Labels that decide which objects the agent handles (the same ones
// kube-proxy uses).
const (
	// LabelServiceProxyName on a Service hands it to another proxy, unless the
	// value is our own --proxy-name.
	LabelServiceProxyName = slim.LabelServiceProxyName
	// LabelHeadless marks the EndpointSlices of a headless Service.
	LabelHeadless = slim.LabelHeadless
)

// Options tune the model.
type Options struct {
	// NodeName is this node: endpoints whose nodeName matches are local
	// (lbmap.Backend.Local; the only ones for internalTrafficPolicy Local
	// ClusterIPs and the external scope of externalTrafficPolicy Local).
	NodeName string
	// ProxyName is the value of service.kubernetes.io/service-proxy-name that
	// this agent answers to, besides unlabelled Services. Empty: only
	// unlabelled Services, as kube-proxy.
	ProxyName string
	// NodeAddrs are this node's addresses that NodePorts are served on
	// (each for the Services of its family).
	NodeAddrs []netip.Addr
	// LoopbackNodePort also serves NodePorts on 127.0.0.1, for this node's
	// pods and processes only (the socket load balancer).
	LoopbackNodePort bool
	// LBAlgorithm is how tc picks a backend for external frontends:
	// [LBRandom] (also when empty) or [LBMaglev].
	LBAlgorithm string
}

// Load-balancing algorithms for Options.LBAlgorithm.
const (
	LBRandom = "random"
	LBMaglev = "maglev"
)

// Kind is the kind of frontend address a Service port is reached on.
type Kind string

// Frontend kinds.
const (
	KindClusterIP    Kind = "ClusterIP"
	KindNodePort     Kind = "NodePort"
	KindExternalIP   Kind = "ExternalIP"
	KindLoadBalancer Kind = "LoadBalancer"
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
	ReasonInvalidSourceRange  = "InvalidSourceRange"
	ReasonInvalidExternalIP   = "InvalidExternalIP"
	ReasonInvalidIngressIP    = "InvalidLoadBalancerIP"
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

// HealthCheck is the healthCheckNodePort of an externalTrafficPolicy Local
// LoadBalancer Service and what it reports: the number of this node's ready
// endpoints (distinct addresses over all ports; terminating ones do not
// count, so load balancers drain a node whose endpoints are going away).
type HealthCheck struct {
	Service        types.NamespacedName
	Port           uint16
	LocalEndpoints int
}

// Result is the desired state.
type Result struct {
	Entries      []Entry       // sorted by frontend, one per frontend
	Warnings     []Warning     // sorted by Service, then reason and message
	HealthChecks []HealthCheck // sorted by Service
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
func Managed(svc *slim.Service, o Options) (bool, string) {
	if v := svc.ProxyName; svc.HasProxyName && (o.ProxyName == "" || v != o.ProxyName) {
		return false, fmt.Sprintf("label %s=%q names another proxy", LabelServiceProxyName, v)
	}
	if svc.Type == corev1.ServiceTypeExternalName {
		return false, "type ExternalName"
	}
	if svc.Headless {
		return false, "headless"
	}
	return true, ""
}

// UsableSlice reports whether an EndpointSlice can feed a Service: it names
// its Service, holds IP addresses (not FQDNs) and is not a headless one.
func UsableSlice(es *slim.EndpointSlice) bool {
	if es.AddressType != discoveryv1.AddressTypeIPv4 && es.AddressType != discoveryv1.AddressTypeIPv6 {
		return false // FQDN (deprecated) and unknown types
	}
	if es.Headless {
		return false
	}
	return es.Service != ""
}

// Build computes the desired state from the Services and EndpointSlices of
// the cluster (as the watcher holds them; they are not modified).
//
// It is the reference: [Index] computes the same Result incrementally.
func Build(svcs []*slim.Service, endpointSlices []*slim.EndpointSlice, nodeName string, o Options) Result {
	o.NodeName = nodeName
	bySvc := slicesByService(endpointSlices)
	sorted := make([]*slim.Service, 0, len(svcs))
	for _, s := range svcs {
		if s != nil {
			sorted = append(sorted, s)
		}
	}
	slices.SortFunc(sorted, func(a, b *slim.Service) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})

	var res Result
	owner := map[lbmap.Frontend]types.NamespacedName{}
	for _, svc := range sorted {
		if ok, _ := Managed(svc, o); !ok {
			continue
		}
		sb := buildService(svc, o, bySvc[types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}])
		sb.resolve(owner)
		res.Entries = sb.appendAccepted(res.Entries)
		if sb.hc != nil {
			res.HealthChecks = append(res.HealthChecks, *sb.hc)
		}
		res.Warnings = append(res.Warnings, sb.warnings...)
		res.Warnings = append(res.Warnings, sb.conflicts...)
	}
	slices.SortFunc(res.Entries, func(a, b Entry) int { return a.LB.Frontend.Compare(b.LB.Frontend) })
	sortWarnings(res.Warnings)
	res.Warnings = slices.CompactFunc(res.Warnings, func(a, b Warning) bool { return a.Key() == b.Key() })
	sortHealthChecks(res.HealthChecks)
	return res
}

func sortWarnings(ws []Warning) {
	slices.SortStableFunc(ws, func(a, b Warning) int {
		return cmp.Or(
			cmp.Compare(a.Service.Namespace, b.Service.Namespace),
			cmp.Compare(a.Service.Name, b.Service.Name),
			cmp.Compare(a.Reason, b.Reason),
			cmp.Compare(a.Message, b.Message))
	})
}

func sortHealthChecks(hcs []HealthCheck) {
	slices.SortFunc(hcs, func(a, b HealthCheck) int {
		return cmp.Or(cmp.Compare(a.Service.Namespace, b.Service.Namespace), cmp.Compare(a.Service.Name, b.Service.Name))
	})
}

// slicesByService groups the usable slices by Service, each group sorted by
// slice name.
func slicesByService(endpointSlices []*slim.EndpointSlice) map[types.NamespacedName][]*slim.EndpointSlice {
	bySvc := make(map[types.NamespacedName][]*slim.EndpointSlice, len(endpointSlices))
	for _, es := range endpointSlices {
		if es == nil || !UsableSlice(es) {
			continue
		}
		k := es.ServiceKey()
		bySvc[k] = append(bySvc[k], es)
	}
	for _, l := range bySvc {
		if len(l) > 1 {
			sortSlices(l)
		}
	}
	return bySvc
}

// sortSlices orders a Service's slices by name: slice order decides ties
// between duplicate endpoints, so make it independent of the informer's.
func sortSlices(l []*slim.EndpointSlice) {
	slices.SortFunc(l, func(a, b *slim.EndpointSlice) int { return cmp.Compare(a.Name, b.Name) })
}

// serviceBuild is the model of one Service on its own: its frontend groups
// before conflicts with other Services are resolved, its own warnings and its
// health check; resolve then decides which groups it keeps. An Index keeps
// one per Service, so it is kept small.
type serviceBuild struct {
	name      types.NamespacedName
	uid       types.UID
	gen       int64
	groups    []group
	warnings  []Warning // its own, conflicts aside
	conflicts []Warning // ReasonFrontendConflict, set by resolve
	hc        *HealthCheck
}

// group is a frontend's entries (internal and external scope), programmed
// together or not at all.
type group struct {
	entries  []Entry
	accepted bool // set by resolve
}

func buildService(svc *slim.Service, o Options, sl []*slim.EndpointSlice) *serviceBuild {
	b := newBuilder(svc, o, sl)
	sb := &serviceBuild{name: b.name, uid: svc.UID, gen: svc.Generation}
	gs := b.entries()
	sb.groups = make([]group, len(gs))
	for i, g := range gs {
		sb.groups[i].entries = g
	}
	if hc, ok := b.healthCheck(); ok {
		sb.hc = &hc
	}
	sb.warnings = b.warnings
	return sb
}

// resolve decides the Service's groups against the frontends already taken
// (by Services before it in name order, and by its own earlier groups): a
// group goes in only if none of its frontends is taken. It records the
// frontends it takes in owner.
func (sb *serviceBuild) resolve(owner map[lbmap.Frontend]types.NamespacedName) {
	sb.conflicts = nil
group:
	for gi := range sb.groups {
		g := &sb.groups[gi]
		g.accepted = false
		for _, e := range g.entries {
			if prev, taken := owner[e.LB.Frontend]; taken {
				sb.conflicts = append(sb.conflicts, Warning{
					Service: corev1.ObjectReference{Kind: "Service", APIVersion: "v1",
						Namespace: sb.name.Namespace, Name: sb.name.Name, UID: sb.uid},
					Generation: sb.gen, Reason: ReasonFrontendConflict,
					Message: fmt.Sprintf("%s %s is already served for Service %s; ignored here", e.Kind, e.LB.Frontend, prev)})
				continue group
			}
		}
		for _, e := range g.entries {
			owner[e.LB.Frontend] = e.Service
		}
		g.accepted = true
	}
}

func (sb *serviceBuild) appendAccepted(out []Entry) []Entry {
	for _, g := range sb.groups {
		if g.accepted {
			out = append(out, g.entries...)
		}
	}
	return out
}

// builder computes the entries of one Service.
type builder struct {
	svc      *slim.Service
	opts     Options
	slices   []*slim.EndpointSlice
	warnings []Warning

	families familySet               // address families of the ClusterIPs
	cands    []candList              // candidates, computed once per port and family (few: a list)
	ranges   map[bool][]netip.Prefix // valid loadBalancerSourceRanges by family
	affinity time.Duration           // ClientIP affinity timeout, 0: none
	name     types.NamespacedName
}

// familySet is a set of address families.
type familySet struct{ v4, v6 bool }

func (f *familySet) add(is4 bool) {
	if is4 {
		f.v4 = true
	} else {
		f.v6 = true
	}
}

func (f familySet) has(is4 bool) bool {
	if is4 {
		return f.v4
	}
	return f.v6
}

type candList struct {
	key   candKey
	cands []candidate
}

type candKey struct {
	port  string
	proto corev1.Protocol
	is4   bool
}

func newBuilder(svc *slim.Service, o Options, sl []*slim.EndpointSlice) *builder {
	b := &builder{
		svc: svc, opts: o, slices: sl,
		name:     svc.Key(),
		affinity: time.Duration(svc.AffinitySeconds) * time.Second,
	}
	for _, a := range b.clusterIPs() {
		b.families.add(a.Is4())
	}
	b.ranges = b.sourceRanges()
	return b
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

func (b *builder) candidatesFor(portName string, proto corev1.Protocol, is4 bool) []candidate {
	k := candKey{portName, proto, is4}
	for _, l := range b.cands {
		if l.key == k {
			return l.cands
		}
	}
	c := b.candidates(portName, proto, is4)
	b.cands = append(b.cands, candList{k, c})
	return c
}

// clusterIPs are the Service's valid ClusterIPs (invalid ones warned about
// in frontendsOf).
func (b *builder) clusterIPs() []netip.Addr {
	var out []netip.Addr
	for _, ip := range b.svc.ClusterIPs {
		if a, err := netip.ParseAddr(ip); err == nil && a.Zone() == "" {
			out = append(out, a.Unmap())
		}
	}
	return out
}

func (b *builder) externalPolicyLocal() bool {
	t := b.svc.Type
	return (t == corev1.ServiceTypeNodePort || t == corev1.ServiceTypeLoadBalancer) && b.svc.ExternalLocal
}

// sourceRanges parses loadBalancerSourceRanges as kube-proxy does: invalid
// ones are ignored (with a warning), and an address family without valid
// ranges is not filtered.
func (b *builder) sourceRanges() map[bool][]netip.Prefix {
	if b.svc.Type != corev1.ServiceTypeLoadBalancer {
		return nil
	}
	out := map[bool][]netip.Prefix{}
	for _, r := range b.svc.LoadBalancerSourceRanges {
		p, err := netip.ParsePrefix(strings.TrimSpace(r))
		if err != nil || p.Addr().Zone() != "" {
			b.warn(ReasonInvalidSourceRange, "loadBalancerSourceRanges: %q is not a CIDR; ignored", r)
			continue
		}
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		is4 := p.Addr().Is4()
		if !b.families.has(is4) {
			b.warn(ReasonInvalidSourceRange, "loadBalancerSourceRanges: %s is of an address family the Service does not have; ignored", r)
			continue
		}
		out[is4] = append(out[is4], p.Masked())
	}
	if len(b.svc.LoadBalancerSourceRanges) > 0 && len(out) == 0 {
		b.warn(ReasonInvalidSourceRange, "loadBalancerSourceRanges: no usable range; the load balancer IPs accept every client")
	}
	return out
}

// frontendAddr is one address a Service port is reached on.
type frontendAddr struct {
	kind Kind
	addr netip.Addr
	port uint16
	// internalLocal: the internal entry uses only this node's endpoints
	// (internalTrafficPolicy Local, for ClusterIPs).
	internalLocal bool
	// external: reachable from outside the node, so tc serves it (NodePort on
	// a node address, ExternalIP, LoadBalancer).
	external bool
	// externalLocal: externalTrafficPolicy Local: an external-scope entry with
	// this node's endpoints only, beside the internal one.
	externalLocal bool
	ranges        []netip.Prefix // LoadBalancer: the allowed clients
}

// parseFrontendIP parses an externalIP or ingress IP and checks that the
// Service has a ClusterIP of its family (kube-proxy handles a Service per
// family, through that family's ClusterIP).
func (b *builder) parseFrontendIP(reason, what, ip string) (netip.Addr, bool) {
	a, err := netip.ParseAddr(ip)
	if err != nil || a.Zone() != "" {
		b.warn(reason, "%s %q is not an IP address; ignored", what, ip)
		return netip.Addr{}, false
	}
	a = a.Unmap()
	if !b.families.has(a.Is4()) {
		b.warn(reason, "%s %s is of an address family the Service has no ClusterIP of; ignored", what, a)
		return netip.Addr{}, false
	}
	return a, true
}

// frontendsOf lists the addresses of one Service port, each address once
// (the first kind wins, in the order ClusterIP, NodePort, ExternalIP,
// LoadBalancer).
func (b *builder) frontendsOf(sp slim.ServicePort) []frontendAddr {
	itpLocal := b.svc.InternalLocal
	etpLocal := b.externalPolicyLocal()
	var out []frontendAddr
	add := func(fa frontendAddr) {
		for _, o := range out {
			if o.addr == fa.addr && o.port == fa.port {
				return
			}
		}
		out = append(out, fa)
	}
	for _, ip := range b.svc.ClusterIPs {
		if ip == "" || ip == corev1.ClusterIPNone {
			continue
		}
		a, err := netip.ParseAddr(ip)
		if err != nil || a.Zone() != "" {
			b.warn(ReasonInvalidClusterIP, "clusterIP %q is not an IP address", ip)
			continue
		}
		add(frontendAddr{kind: KindClusterIP, addr: a.Unmap(), port: uint16(sp.Port), internalLocal: itpLocal})
	}

	t := b.svc.Type
	if (t == corev1.ServiceTypeNodePort || t == corev1.ServiceTypeLoadBalancer) && sp.NodePort > 0 && sp.NodePort <= 65535 {
		np := uint16(sp.NodePort)
		for _, a := range b.opts.NodeAddrs {
			a = a.Unmap()
			if !a.IsValid() || a.Zone() != "" || !b.families.has(a.Is4()) {
				continue
			}
			if a.IsLoopback() {
				continue // loopback: the LoopbackNodePort entry below
			}
			add(frontendAddr{kind: KindNodePort, addr: a, port: np, external: true, externalLocal: etpLocal})
		}
		if b.opts.LoopbackNodePort && b.families.has(true) {
			// Reached only through the socket load balancer, from this node:
			// kube-proxy sends local clients to all endpoints.
			add(frontendAddr{kind: KindNodePort, addr: netip.AddrFrom4([4]byte{127, 0, 0, 1}), port: np})
		}
	}

	for _, ip := range b.svc.ExternalIPs {
		if a, ok := b.parseFrontendIP(ReasonInvalidExternalIP, "externalIP", ip); ok {
			add(frontendAddr{kind: KindExternalIP, addr: a, port: uint16(sp.Port), external: true, externalLocal: etpLocal})
		}
	}

	if t == corev1.ServiceTypeLoadBalancer {
		for _, ing := range b.svc.Ingress {
			if ing.Proxy {
				continue // the load balancer proxies: traffic arrives for node addresses, not this IP
			}
			if a, ok := b.parseFrontendIP(ReasonInvalidIngressIP, "load balancer ingress IP", ing.IP); ok {
				add(frontendAddr{kind: KindLoadBalancer, addr: a, port: uint16(sp.Port), external: true,
					externalLocal: etpLocal, ranges: b.ranges[a.Is4()]})
			}
		}
	}
	return out
}

// entries returns the Service's entries, grouped by frontend address: the
// entries of one group are programmed together or not at all.
func (b *builder) entries() [][]Entry {
	maglev := b.opts.LBAlgorithm == LBMaglev
	var out [][]Entry
	for _, sp := range b.svc.Ports {
		proto := sp.Protocol
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
		for _, fa := range b.frontendsOf(sp) {
			cands := b.candidatesFor(sp.Name, proto, fa.addr.Is4())
			entry := func(scope lbmap.Scope, local bool) Entry {
				backends := pick(cands, local, b.opts.NodeName)
				fe := lbmap.Frontend{Addr: fa.addr, Port: fa.port, Proto: lp, Scope: scope}
				if len(backends) > lbmap.MaxBackends {
					b.warn(ReasonTooManyBackends, "%s %s: %d endpoints, only the first %d are used",
						fa.kind, fe, len(backends), lbmap.MaxBackends)
					backends = backends[:lbmap.MaxBackends]
				}
				return Entry{
					Kind: fa.kind, Service: b.name, PortName: sp.Name,
					LB: lbmap.Service{Frontend: fe, Backends: backends, Affinity: b.affinity},
				}
			}
			switch {
			case !fa.external:
				out = append(out, []Entry{entry(lbmap.ScopeInternal, fa.internalLocal)})
			case !fa.externalLocal:
				e := entry(lbmap.ScopeInternal, false)
				e.LB.External, e.LB.Maglev, e.LB.SourceRanges = true, maglev, fa.ranges
				out = append(out, []Entry{e})
			default:
				// Local clients (pods, host processes) reach all endpoints
				// through the internal entry; traffic entering the node only
				// this node's, unSNATed, through the external one. It is
				// written even without local endpoints, so tc refuses rather
				// than fall back to the internal entry.
				in := entry(lbmap.ScopeInternal, false)
				ext := entry(lbmap.ScopeExternal, true)
				ext.LB.External, ext.LB.LocalOnly, ext.LB.Maglev, ext.LB.SourceRanges = true, true, maglev, fa.ranges
				out = append(out, []Entry{in, ext})
			}
		}
	}
	return out
}

// healthCheck is the Service's health check, if it has one.
func (b *builder) healthCheck() (HealthCheck, bool) {
	port := b.svc.HealthCheckNodePort
	if b.svc.Type != corev1.ServiceTypeLoadBalancer || !b.externalPolicyLocal() || port < 1 || port > 65535 {
		return HealthCheck{}, false
	}
	ready := map[netip.Addr]bool{}
	for _, sp := range b.svc.Ports {
		proto := sp.Protocol
		if proto != corev1.ProtocolTCP && proto != corev1.ProtocolUDP {
			continue
		}
		for _, is4 := range []bool{true, false} {
			if !b.families.has(is4) {
				continue
			}
			for _, c := range b.candidatesFor(sp.Name, proto, is4) {
				if c.ready && b.isLocal(c) {
					ready[c.be.Addr] = true
				}
			}
		}
	}
	return HealthCheck{Service: b.name, Port: uint16(port), LocalEndpoints: len(ready)}, true
}

func portLabel(sp slim.ServicePort, proto corev1.Protocol) string {
	if sp.Name != "" {
		return fmt.Sprintf("%q (%d/%s)", sp.Name, sp.Port, proto)
	}
	return fmt.Sprintf("%d/%s", sp.Port, proto)
}
