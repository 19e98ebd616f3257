package devices

import (
	"context"
	"net/netip"
	"sync"
	"time"
)

// Watcher follows the selection: it re-runs Select when a device, an
// address or (in auto mode) a route changes in its network namespace,
// when Trigger is called, and every Resync, and calls OnChange when the
// result differs from the last one reported.
//
// Wiring in the agent:
//
//	w := &devices.Watcher{Spec: cfg.Devices, NodeIPs: nodeIPs, OnChange: func(d []devices.Device) {
//		// attach tc programs to d, program devices.NodeAddrs(d) as NodePort addresses
//	}, OnError: func(err error) { log.Warn("device selection", "err", err) }}
//	go w.Run(ctx)          // in the host network namespace
//	... w.Trigger()        // from the Node informer when the node's addresses change
type Watcher struct {
	// Spec as for Select: empty = auto.
	Spec []string
	// NodeIPs returns the node's current InternalIP/ExternalIP addresses; it
	// is called at every selection. Nil means none.
	NodeIPs func() []netip.Addr
	// OnChange receives every new selection, the first one included. It is
	// called from Run's goroutine, one call at a time.
	OnChange func([]Device)
	// OnError, if set, receives the errors of selections after the first
	// (a named device was deleted, ...) and of the netlink subscriptions;
	// the last good selection stays in force. Nil drops them.
	OnError func(error)
	// Debounce is how long a burst of changes is collected before selecting
	// again; default 200ms.
	Debounce time.Duration
	// Resync is how often the selection runs without a change, a safety net
	// for lost netlink events; default 1m.
	Resync time.Duration

	once sync.Once
	kick chan struct{}
}

// Watch runs a Watcher with the defaults until ctx ends; see Watcher.Run.
func Watch(ctx context.Context, spec []string, nodeIPs func() []netip.Addr, onChange func([]Device)) error {
	return (&Watcher{Spec: spec, NodeIPs: nodeIPs, OnChange: onChange}).Run(ctx)
}

// Trigger asks for a new selection (e.g. the Node's addresses changed). It
// never blocks and may be called before Run.
func (w *Watcher) Trigger() {
	select {
	case w.kicks() <- struct{}{}:
	default:
	}
}

func (w *Watcher) kicks() chan struct{} {
	w.once.Do(func() { w.kick = make(chan struct{}, 1) })
	return w.kick
}

func (w *Watcher) nodeIPs() []netip.Addr {
	if w.NodeIPs == nil {
		return nil
	}
	return w.NodeIPs()
}

func (w *Watcher) fail(err error) {
	if w.OnError != nil && err != nil {
		w.OnError(err)
	}
}
