// Package watch follows the API server with client-go shared informers:
// Services, EndpointSlices and this node's Node object. Every change raises
// one coalesced signal and marks the Service it concerns dirty (Services by
// their key, EndpointSlices by their kubernetes.io/service-name label); the
// reconciler takes the dirty set and reads those Services' current state from
// the caches when it gets to it (TakeDirty, Service), or everything
// (Snapshot).
//
// Selection follows kube-proxy: Services labelled
// service.kubernetes.io/service-proxy-name (unless the value is our
// --proxy-name) and headless EndpointSlices are filtered by the API server
// where a label selector can express it; agent/model applies the same rules
// again, so the result never depends on the filter being there.
package watch

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/kpfree/kpfree/agent/model"
)

// Options for a Watcher.
type Options struct {
	// NodeName is this node; empty: no Node informer.
	NodeName string
	// ProxyName is our service.kubernetes.io/service-proxy-name value ("":
	// only unlabelled Services).
	ProxyName string
	// OnNodeAddresses, if set, is called (from an informer goroutine) when
	// this node's status addresses appear or change.
	OnNodeAddresses func()
}

// Snapshot is the current state as the informers see it. The objects belong
// to the informer caches: read them, never modify them.
type Snapshot struct {
	Services       []*corev1.Service
	EndpointSlices []*discoveryv1.EndpointSlice
	Node           *corev1.Node // nil when unknown
}

// Watcher runs the informers and signals changes.
type Watcher struct {
	opts      Options
	factory   informers.SharedInformerFactory
	nodes     informers.SharedInformerFactory // nil without NodeName
	svcLister corelisters.ServiceLister
	esLister  discoverylisters.EndpointSliceLister
	node      corelisters.NodeLister
	synced    []cache.InformerSynced
	changes   chan struct{}

	mu    sync.Mutex
	dirty map[types.NamespacedName]struct{}
	// sliceNames are the names of each Service's EndpointSlices (a
	// client-go Indexer does the same at three times the memory).
	sliceNames map[types.NamespacedName][]string
}

func sliceServiceKey(es *discoveryv1.EndpointSlice) (types.NamespacedName, bool) {
	name := es.Labels[discoveryv1.LabelServiceName]
	return types.NamespacedName{Namespace: es.Namespace, Name: name}, name != ""
}

// LabelSelector is what the API server filters Services and EndpointSlices
// by: not headless, and, without a proxy name, no service-proxy-name label.
// With a proxy name, "unlabelled or ours" is not expressible as one selector,
// so the model filters that.
func LabelSelector(proxyName string) labels.Selector {
	sel := labels.NewSelector()
	notHeadless, _ := labels.NewRequirement(model.LabelHeadless, selection.DoesNotExist, nil)
	sel = sel.Add(*notHeadless)
	if proxyName == "" {
		noProxy, _ := labels.NewRequirement(model.LabelServiceProxyName, selection.DoesNotExist, nil)
		sel = sel.Add(*noProxy)
	}
	return sel
}

// New sets up the informers (nothing runs before Start).
func New(cs kubernetes.Interface, o Options) (*Watcher, error) {
	w := &Watcher{opts: o, changes: make(chan struct{}, 1), dirty: map[types.NamespacedName]struct{}{},
		sliceNames: map[types.NamespacedName][]string{}}
	sel := LabelSelector(o.ProxyName).String()
	// No informer resync: the reconciler resyncs the maps on its own
	// schedule, and a relist brings nothing new.
	w.factory = informers.NewSharedInformerFactoryWithOptions(cs, 0,
		informers.WithTweakListOptions(func(lo *metav1.ListOptions) { lo.LabelSelector = sel }),
		informers.WithTransform(Trim))
	svcs := w.factory.Core().V1().Services()
	eps := w.factory.Discovery().V1().EndpointSlices()
	w.svcLister, w.esLister = svcs.Lister(), eps.Lister()
	for _, inf := range []cache.SharedIndexInformer{svcs.Informer(), eps.Informer()} {
		reg, err := inf.AddEventHandler(w.handler(true))
		if err != nil {
			return nil, fmt.Errorf("watch: %w", err)
		}
		w.synced = append(w.synced, reg.HasSynced)
	}
	if o.NodeName != "" {
		w.nodes = informers.NewSharedInformerFactoryWithOptions(cs, 0,
			informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
				lo.FieldSelector = fields.OneTermEqualSelector("metadata.name", o.NodeName).String()
			}),
			informers.WithTransform(Trim))
		nodes := w.nodes.Core().V1().Nodes()
		w.node = nodes.Lister()
		reg, err := nodes.Informer().AddEventHandler(w.handler(false))
		if err != nil {
			return nil, fmt.Errorf("watch: %w", err)
		}
		w.synced = append(w.synced, reg.HasSynced)
		if o.OnNodeAddresses != nil {
			_, err := nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
				AddFunc: func(any) { o.OnNodeAddresses() },
				UpdateFunc: func(oldObj, newObj any) {
					o1, ok1 := oldObj.(*corev1.Node)
					n1, ok2 := newObj.(*corev1.Node)
					if ok1 && ok2 && slices.Equal(o1.Status.Addresses, n1.Status.Addresses) {
						return
					}
					o.OnNodeAddresses()
				},
			})
			if err != nil {
				return nil, fmt.Errorf("watch: %w", err)
			}
		}
	}
	return w, nil
}

// handler signals every change; with markDirty it also marks the Services
// the objects concern dirty.
func (w *Watcher) handler(markDirty bool) cache.ResourceEventHandler {
	changed := func(gone, now any) {
		if markDirty {
			w.markDirty(gone, now)
		}
		w.signal()
	}
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { changed(nil, obj) },
		UpdateFunc: func(oldObj, newObj any) {
			o, ok1 := oldObj.(metav1.Object)
			n, ok2 := newObj.(metav1.Object)
			if ok1 && ok2 && o.GetResourceVersion() == n.GetResourceVersion() {
				return // a relist, not a change
			}
			changed(oldObj, newObj) // a slice may have moved to another Service
		},
		DeleteFunc: func(obj any) { changed(obj, nil) },
	}
}

// markDirty records the Services the objects concern (gone: the old state
// or a deleted object; now: the new state; either may be nil) and keeps
// sliceNames up to date. The caches already hold the new state when it runs.
func (w *Watcher) markDirty(gone, now any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, obj := range []any{gone, now} {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		switch o := obj.(type) {
		case *corev1.Service:
			w.dirty[types.NamespacedName{Namespace: o.Namespace, Name: o.Name}] = struct{}{}
		case *discoveryv1.EndpointSlice:
			k, ok := sliceServiceKey(o)
			if !ok {
				continue
			}
			w.dirty[k] = struct{}{}
			names := w.sliceNames[k]
			if i == 0 {
				names = slices.DeleteFunc(names, func(n string) bool { return n == o.Name })
			} else if !slices.Contains(names, o.Name) {
				names = append(names, o.Name)
			}
			if len(names) == 0 {
				delete(w.sliceNames, k)
			} else {
				w.sliceNames[k] = names
			}
		}
	}
}

// TakeDirty returns the Services whose Service object or EndpointSlices
// changed since the last call (in no particular order) and empties the set.
// Read their state after taking them (Service): a change that lands in
// between is marked again and seen by the next call.
func (w *Watcher) TakeDirty() []types.NamespacedName {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.dirty) == 0 {
		return nil
	}
	out := make([]types.NamespacedName, 0, len(w.dirty))
	for k := range w.dirty {
		out = append(out, k)
	}
	if len(w.dirty) > 1024 {
		w.dirty = map[types.NamespacedName]struct{}{} // let a big initial set go
	} else {
		clear(w.dirty)
	}
	return out
}

// Service returns a Service (nil when it is not in the cache) and its
// EndpointSlices, from the caches: the objects belong to the caches, read
// them, never modify them.
func (w *Watcher) Service(key types.NamespacedName) (*corev1.Service, []*discoveryv1.EndpointSlice, error) {
	svc, err := w.svcLister.Services(key.Namespace).Get(key.Name)
	if apierrors.IsNotFound(err) {
		svc, err = nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("watch: get service %s: %w", key, err)
	}
	w.mu.Lock()
	names := slices.Clone(w.sliceNames[key])
	w.mu.Unlock()
	sl := make([]*discoveryv1.EndpointSlice, 0, len(names))
	for _, n := range names {
		es, err := w.esLister.EndpointSlices(key.Namespace).Get(n)
		if apierrors.IsNotFound(err) {
			continue // deleted since: its handler marks the Service again
		}
		if err != nil {
			return nil, nil, fmt.Errorf("watch: get endpointslice %s/%s: %w", key.Namespace, n, err)
		}
		if k, ok := sliceServiceKey(es); ok && k == key {
			sl = append(sl, es)
		}
	}
	return svc, sl, nil
}

// signal raises the change flag; a flag already up absorbs it.
func (w *Watcher) signal() {
	select {
	case w.changes <- struct{}{}:
	default:
	}
}

// Changes delivers at most one pending signal however many changes happened
// since it was last received.
func (w *Watcher) Changes() <-chan struct{} { return w.changes }

// Start runs the informers until ctx ends.
func (w *Watcher) Start(ctx context.Context) {
	w.factory.Start(ctx.Done())
	if w.nodes != nil {
		w.nodes.Start(ctx.Done())
	}
}

// Shutdown waits for the informers' goroutines after ctx has ended.
func (w *Watcher) Shutdown() {
	w.factory.Shutdown()
	if w.nodes != nil {
		w.nodes.Shutdown()
	}
}

// Synced reports whether every informer has delivered its initial list.
func (w *Watcher) Synced() bool {
	for _, s := range w.synced {
		if !s() {
			return false
		}
	}
	return true
}

// WaitForSync blocks until Synced or ctx ends, and reports which.
func (w *Watcher) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.synced...)
}

// NodeName is the node the watcher was set up for.
func (w *Watcher) NodeName() string { return w.opts.NodeName }

// Snapshot lists the current state from the informer caches.
func (w *Watcher) Snapshot() (Snapshot, error) {
	var s Snapshot
	var err error
	if s.Services, err = w.svcLister.List(labels.Everything()); err != nil {
		return s, fmt.Errorf("watch: list services: %w", err)
	}
	if s.EndpointSlices, err = w.esLister.List(labels.Everything()); err != nil {
		return s, fmt.Errorf("watch: list endpointslices: %w", err)
	}
	if w.node != nil {
		if n, err := w.node.Get(w.opts.NodeName); err == nil {
			s.Node = n
		}
	}
	return s, nil
}

// Trim drops what the agent never reads before an object enters the informer
// cache: managed fields, annotations (kubectl's last-applied copy of the
// whole object is the biggest), owner references and finalizers; on
// Services the selector and status conditions; on EndpointSlices each
// endpoint's target reference, hostname, zone, hints and deprecated topology
// map. At 50,000 Services this is most of the cache. Objects of other types
// pass unchanged but for the metadata.
func Trim(obj any) (any, error) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return obj, nil // e.g. cache.DeletedFinalStateUnknown
	}
	m.SetManagedFields(nil)
	m.SetAnnotations(nil)
	m.SetOwnerReferences(nil)
	m.SetFinalizers(nil)
	switch o := obj.(type) {
	case *corev1.Service:
		o.Spec.Selector = nil
		o.Status.Conditions = nil
	case *discoveryv1.EndpointSlice:
		for i := range o.Endpoints {
			ep := &o.Endpoints[i]
			ep.DeprecatedTopology, ep.TargetRef, ep.Hostname, ep.Zone, ep.Hints = nil, nil, nil, nil, nil
		}
	case *corev1.Node:
		o.Status.Images = nil // the largest part of a Node, never read
	}
	return obj, nil
}

// NodeIPs returns this node's InternalIP and ExternalIP addresses as the
// informer sees them (none before the Node is known).
func (w *Watcher) NodeIPs() []netip.Addr {
	if w.node == nil {
		return nil
	}
	n, err := w.node.Get(w.opts.NodeName)
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil {
			out = append(out, ip.Unmap())
		}
	}
	return out
}
