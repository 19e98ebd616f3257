// Package watch follows the API server: Services and EndpointSlices through
// client-go reflectors into the watcher's own store of slim objects
// (agent/slim: only what the agent reads, converted as each object arrives,
// so no full API object outlives its event), and this node's Node object
// through a shared informer. Every change raises one coalesced signal and
// marks the Service it concerns dirty (Services by their key, EndpointSlices
// by their kubernetes.io/service-name label); an update that changes nothing
// the agent reads marks nothing. The reconciler takes the dirty set and reads
// those Services' current state when it gets to it (TakeDirty, Service), or
// everything (Snapshot).
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
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/apimachinery/pkg/types"
	apiwatch "k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/slim"
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

// Snapshot is the current state as the watcher holds it. The objects are
// shared: read them, never modify them.
type Snapshot struct {
	Services       []*slim.Service
	EndpointSlices []*slim.EndpointSlice
	Node           *corev1.Node // nil when unknown
}

// Watcher runs the reflectors and signals changes.
type Watcher struct {
	opts       Options
	reflectors []*cache.Reflector
	nodes      informers.SharedInformerFactory // nil without NodeName
	node       corelisters.NodeLister
	nodeSynced cache.InformerSynced
	changes    chan struct{}
	wg         sync.WaitGroup
	pageSize   int64

	svcSynced, sliceSynced atomic.Bool

	mu sync.Mutex
	// svcs holds each Service and its slices (by their
	// kubernetes.io/service-name label), either may be missing.
	svcs   map[types.NamespacedName]*entry
	slices map[types.NamespacedName]*slim.EndpointSlice // by the slice's own namespace/name
	nSvcs  int                                          // entries with a Service
	dirty  map[types.NamespacedName]struct{}
}

// entry is one Service key's state.
type entry struct {
	svc    *slim.Service
	slices []*slim.EndpointSlice
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

// New sets up the reflectors and the Node informer (nothing runs before
// Start).
func New(cs kubernetes.Interface, o Options) (*Watcher, error) {
	w := &Watcher{opts: o, changes: make(chan struct{}, 1), pageSize: pageSize,
		svcs: map[types.NamespacedName]*entry{}, slices: map[types.NamespacedName]*slim.EndpointSlice{},
		dirty: map[types.NamespacedName]struct{}{}}
	sel := LabelSelector(o.ProxyName).String()
	tweak := func(lo metav1.ListOptions) metav1.ListOptions { lo.LabelSelector = sel; return lo }
	// No resync: the reconciler resyncs the maps on its own schedule, and a
	// relist brings nothing new.
	svcLW := w.listWatch(func(ctx context.Context, lo metav1.ListOptions) (*slimList, error) {
		l, err := cs.CoreV1().Services("").List(ctx, w.pageOptions(tweak(lo)))
		if err != nil {
			return nil, err
		}
		return slimPage(l.ListMeta, l.Items), nil
	}, func(ctx context.Context, lo metav1.ListOptions) (apiwatch.Interface, error) {
		return cs.CoreV1().Services("").Watch(ctx, tweak(lo))
	})
	sliceLW := w.listWatch(func(ctx context.Context, lo metav1.ListOptions) (*slimList, error) {
		l, err := cs.DiscoveryV1().EndpointSlices("").List(ctx, w.pageOptions(tweak(lo)))
		if err != nil {
			return nil, err
		}
		return slimPage(l.ListMeta, l.Items), nil
	}, func(ctx context.Context, lo metav1.ListOptions) (apiwatch.Interface, error) {
		return cs.DiscoveryV1().EndpointSlices("").Watch(ctx, tweak(lo))
	})
	w.reflectors = []*cache.Reflector{
		cache.NewReflectorWithOptions(svcLW, &corev1.Service{}, w.serviceStore(), cache.ReflectorOptions{Name: "kpfree services"}),
		cache.NewReflectorWithOptions(sliceLW, &discoveryv1.EndpointSlice{}, w.sliceStore(), cache.ReflectorOptions{Name: "kpfree endpointslices"}),
	}
	if o.NodeName != "" {
		w.nodes = informers.NewSharedInformerFactoryWithOptions(cs, 0,
			informers.WithTweakListOptions(func(lo *metav1.ListOptions) {
				lo.FieldSelector = fields.OneTermEqualSelector("metadata.name", o.NodeName).String()
			}),
			informers.WithTransform(trimNode))
		nodes := w.nodes.Core().V1().Nodes()
		w.node = nodes.Lister()
		addrsChanged := func() {
			if o.OnNodeAddresses != nil {
				o.OnNodeAddresses()
			}
		}
		reg, err := nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: func(any) { w.signal(); addrsChanged() },
			UpdateFunc: func(oldObj, newObj any) {
				o1, ok1 := oldObj.(*corev1.Node)
				n1, ok2 := newObj.(*corev1.Node)
				if ok1 && ok2 && o1.ResourceVersion == n1.ResourceVersion {
					return // a relist, not a change
				}
				w.signal()
				if !(ok1 && ok2 && slices.Equal(o1.Status.Addresses, n1.Status.Addresses)) {
					addrsChanged()
				}
			},
			DeleteFunc: func(any) { w.signal() },
		})
		if err != nil {
			return nil, fmt.Errorf("watch: %w", err)
		}
		w.nodeSynced = reg.HasSynced
	}
	return w, nil
}

// listsInPages tells the reflectors not to stream their initial lists
// (WatchList, kube-apiserver 1.34's default) but to LIST in pages: measured
// at 50,000 Services (test/bench/agent, one run each), the streamed lists
// took 2.0 s against 0.8-1.3 s in pages of 5,000 (peak RSS 251 against
// 216-230 MiB). A streamed list would also gather full API objects in the
// reflector's own temporary store.
type listsInPages struct{}

func (listsInPages) IsWatchListSemanticsUnSupported() bool { return true }

// pageSize is how many objects one list request asks for: a few MiB of
// decoded objects at most, and few requests (at 50,000 Services, pages of
// 500 took 8.2 s against the benchmark's API server, pages of 5,000
// 0.8-1.3 s).
const pageSize = 5000

// pageOptions makes the initial list paginated, in pages of pageSize. The
// reflector lists first with resourceVersion "0" (any version), which the
// API server answers from its watch cache in one response whatever the
// limit: 50,000 Services and their slices decoded at once (peak RSS 346-428
// MiB measured, against ~130 MiB after). A consistent read
// ("") honours the limit, and the reflector's pager follows the continue
// tokens; each page is converted to slim objects before the next is
// requested (see the list functions in New), so a list holds at most one
// page of API objects. The consistent read is stricter than "0", never
// staler. Relists at a known resourceVersion are left as the reflector
// makes them.
func (w *Watcher) pageOptions(lo metav1.ListOptions) metav1.ListOptions {
	if lo.ResourceVersion == "0" && lo.Continue == "" {
		lo.ResourceVersion, lo.ResourceVersionMatch = "", ""
		lo.Limit = w.pageSize
	}
	if lo.Limit != 0 {
		lo.Limit = w.pageSize // the pager's own size is 500
	}
	return lo
}

// slimList is one page of a list in slim form, the shape the reflector's
// pager collects (a list object with Items); slimItem is one of its objects,
// with the namespace and name the reflector's stores key by.
type slimList struct {
	metav1.TypeMeta
	metav1.ListMeta
	Items []slimItem
}

type slimItem struct {
	metav1.TypeMeta
	metav1.ObjectMeta // namespace and name only
	svc               *slim.Service
	es                *slim.EndpointSlice
}

func (l *slimList) DeepCopyObject() runtime.Object {
	c := *l
	c.Items = slices.Clone(l.Items)
	return &c
}

func (i *slimItem) DeepCopyObject() runtime.Object {
	c := *i
	return &c
}

// listWatch is what a reflector lists and watches through: lists in slim
// pages, never streamed (listsInPages).
func (w *Watcher) listWatch(list func(context.Context, metav1.ListOptions) (*slimList, error),
	watch func(context.Context, metav1.ListOptions) (apiwatch.Interface, error)) cache.ListerWatcher {
	return cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, lo metav1.ListOptions) (runtime.Object, error) {
			l, err := list(ctx, lo)
			if err != nil {
				return nil, err // not a nil *slimList in an interface
			}
			return l, nil
		},
		WatchFuncWithContext: watch,
	}, listsInPages{})
}

// slimPage converts one page of a list (Services or EndpointSlices); the
// page's API objects are garbage once it returns.
func slimPage[T any](meta metav1.ListMeta, items []T) *slimList {
	out := &slimList{ListMeta: meta, Items: make([]slimItem, len(items))}
	for i := range items {
		out.Items[i] = slimItemOf(&items[i])
	}
	return out
}

// slimItemOf converts a Service or an EndpointSlice (anything else gives an
// empty item, which the stores refuse).
func slimItemOf(obj any) slimItem {
	switch o := obj.(type) {
	case *corev1.Service:
		return slimItem{ObjectMeta: metav1.ObjectMeta{Namespace: o.Namespace, Name: o.Name}, svc: slim.FromService(o)}
	case *discoveryv1.EndpointSlice:
		return slimItem{ObjectMeta: metav1.ObjectMeta{Namespace: o.Namespace, Name: o.Name}, es: slim.FromEndpointSlice(o)}
	}
	return slimItem{}
}

// store is what a reflector writes to (cache.ReflectorStore), for one kind
// of object: each is converted to its slim form on arrival (conv), unless a
// list already did (a slimItem), and set under the watcher's lock; keys are
// the ones stored, for a relist to find what went.
type store[T comparable] struct {
	w      *Watcher
	conv   func(any) (T, error)
	set    func(k types.NamespacedName, now T) bool // zero now: gone
	keys   func() []types.NamespacedName
	synced *atomic.Bool
}

func (w *Watcher) serviceStore() store[*slim.Service] {
	return store[*slim.Service]{w: w, conv: asService, set: w.setServiceLocked, synced: &w.svcSynced,
		keys: func() []types.NamespacedName {
			out := make([]types.NamespacedName, 0, w.nSvcs)
			for k, e := range w.svcs {
				if e.svc != nil {
					out = append(out, k)
				}
			}
			return out
		}}
}

func (w *Watcher) sliceStore() store[*slim.EndpointSlice] {
	return store[*slim.EndpointSlice]{w: w, conv: asSlice, set: w.setSliceLocked, synced: &w.sliceSynced,
		keys: func() []types.NamespacedName { return slices.Collect(maps.Keys(w.slices)) }}
}

func (s store[T]) Add(obj any) error    { return s.put(obj, false) }
func (s store[T]) Update(obj any) error { return s.put(obj, false) }
func (s store[T]) Delete(obj any) error { return s.put(obj, true) }
func (store[T]) Resync() error          { return nil }

func (s store[T]) put(obj any, gone bool) error {
	k, obj, err := objectKey(obj)
	if err != nil {
		return err
	}
	var now T
	if !gone {
		if now, err = s.conv(obj); err != nil {
			return err
		}
	}
	s.w.mu.Lock()
	changed := s.set(k, now)
	s.w.mu.Unlock()
	if changed {
		s.w.signal()
	}
	return nil
}

// Replace takes a whole list: what is not in it goes, the rest is set; only
// what differs is marked dirty.
func (s store[T]) Replace(list []any, _ string) error {
	next := make(map[types.NamespacedName]T, len(list))
	for _, obj := range list {
		k, obj, err := objectKey(obj)
		if err != nil {
			return err
		}
		if next[k], err = s.conv(obj); err != nil {
			return err
		}
	}
	s.w.mu.Lock()
	changed := false
	var gone T
	for _, k := range s.keys() {
		if _, ok := next[k]; !ok {
			changed = s.set(k, gone) || changed
		}
	}
	for k, v := range next {
		changed = s.set(k, v) || changed
	}
	s.w.mu.Unlock()
	s.synced.Store(true)
	if changed {
		s.w.signal()
	}
	return nil
}

// objectKey is the namespace/name of an object the reflector hands over
// (tombstones included).
func objectKey(obj any) (types.NamespacedName, any, error) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	m, ok := obj.(metav1.Object)
	if !ok {
		return types.NamespacedName{}, nil, fmt.Errorf("watch: unexpected object %T", obj)
	}
	return types.NamespacedName{Namespace: m.GetNamespace(), Name: m.GetName()}, obj, nil
}

// asService returns the slim form of a Service as the reflector hands it
// over: an API object (watch events) or already converted (lists).
func asService(obj any) (*slim.Service, error) {
	switch o := obj.(type) {
	case *corev1.Service:
		return slim.FromService(o), nil
	case *slimItem:
		if o.svc != nil {
			return o.svc, nil
		}
	}
	return nil, fmt.Errorf("watch: unexpected object %T in the Service store", obj)
}

// asSlice is asService for EndpointSlices.
func asSlice(obj any) (*slim.EndpointSlice, error) {
	switch o := obj.(type) {
	case *discoveryv1.EndpointSlice:
		return slim.FromEndpointSlice(o), nil
	case *slimItem:
		if o.es != nil {
			return o.es, nil
		}
	}
	return nil, fmt.Errorf("watch: unexpected object %T in the EndpointSlice store", obj)
}

// setServiceLocked stores a Service (nil: deleted) and marks it dirty if
// the agent sees a difference.
func (w *Watcher) setServiceLocked(k types.NamespacedName, now *slim.Service) bool {
	e := w.svcs[k]
	switch {
	case e == nil && now == nil, e != nil && e.svc.Equal(now):
		return false
	case e == nil:
		e = &entry{}
		w.svcs[k] = e
	}
	switch {
	case e.svc == nil:
		w.nSvcs++
	case now == nil:
		w.nSvcs--
	}
	e.svc = now
	if e.svc == nil && len(e.slices) == 0 {
		delete(w.svcs, k)
	}
	w.dirty[k] = struct{}{}
	return true
}

// setSliceLocked stores a slice (nil: deleted; one the model can never use
// is kept as deleted), keeps its Service entry's list up to date and marks
// the Services it concerns dirty: both when it moved from one to another.
func (w *Watcher) setSliceLocked(k types.NamespacedName, now *slim.EndpointSlice) bool {
	if now != nil && !model.UsableSlice(now) {
		now = nil
	}
	old, had := w.slices[k]
	if !had && now == nil {
		return false
	}
	if had && old.Equal(now) {
		return false
	}
	if had {
		sk := old.ServiceKey()
		if e := w.svcs[sk]; e != nil {
			e.slices = slices.DeleteFunc(e.slices, func(es *slim.EndpointSlice) bool { return es == old })
			if len(e.slices) == 0 {
				e.slices = nil
				if e.svc == nil {
					delete(w.svcs, sk)
				}
			}
		}
		w.dirty[sk] = struct{}{}
		delete(w.slices, k)
	}
	if now != nil {
		sk := now.ServiceKey()
		w.slices[k] = now
		e := w.svcs[sk]
		if e == nil {
			e = &entry{}
			w.svcs[sk] = e
		}
		e.slices = append(e.slices, now)
		w.dirty[sk] = struct{}{}
	}
	return true
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

// Service returns a Service (nil when there is none) and its EndpointSlices.
// The objects are shared: read them, never modify them.
func (w *Watcher) Service(key types.NamespacedName) (*slim.Service, []*slim.EndpointSlice, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	e := w.svcs[key]
	if e == nil {
		return nil, nil, nil
	}
	return e.svc, slices.Clone(e.slices), nil
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

// Start runs the reflectors and the Node informer until ctx ends.
func (w *Watcher) Start(ctx context.Context) {
	for _, r := range w.reflectors {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			r.RunWithContext(ctx)
		}()
	}
	if w.nodes != nil {
		w.nodes.Start(ctx.Done())
	}
}

// Shutdown waits for the watcher's goroutines after ctx has ended.
func (w *Watcher) Shutdown() {
	w.wg.Wait()
	if w.nodes != nil {
		w.nodes.Shutdown()
	}
}

// Synced reports whether the Services, EndpointSlices (and the Node, with a
// NodeName) have been listed.
func (w *Watcher) Synced() bool {
	return w.svcSynced.Load() && w.sliceSynced.Load() && (w.nodeSynced == nil || w.nodeSynced())
}

// WaitForSync blocks until Synced or ctx ends, and reports which.
func (w *Watcher) WaitForSync(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), w.Synced)
}

// NodeName is the node the watcher was set up for.
func (w *Watcher) NodeName() string { return w.opts.NodeName }

// Snapshot returns the whole current state.
func (w *Watcher) Snapshot() (Snapshot, error) {
	var s Snapshot
	w.mu.Lock()
	s.Services = make([]*slim.Service, 0, w.nSvcs)
	for _, e := range w.svcs {
		if e.svc != nil {
			s.Services = append(s.Services, e.svc)
		}
	}
	s.EndpointSlices = make([]*slim.EndpointSlice, 0, len(w.slices))
	for _, es := range w.slices {
		s.EndpointSlices = append(s.EndpointSlices, es)
	}
	w.mu.Unlock()
	if w.node != nil {
		if n, err := w.node.Get(w.opts.NodeName); err == nil {
			s.Node = n
		}
	}
	return s, nil
}

// trimNode drops what the agent never reads of its Node before it enters
// the informer cache: managed fields, annotations and the image list (the
// largest part of a Node).
func trimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil // e.g. cache.DeletedFinalStateUnknown
	}
	n.ManagedFields, n.Annotations, n.Status.Images = nil, nil, nil
	return n, nil
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
