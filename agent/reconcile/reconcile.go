// Package reconcile keeps the load balancer maps equal to what the model
// derives from the watcher's objects.
//
// The model is kept in a model.Index. Passes are of three kinds:
//
//   - full: make the maps hold exactly the Index's Services (lbmap Sync,
//     prune included): the first pass after the lists are in, which builds
//     the Index from a Snapshot, and every ResyncInterval, which updates it
//     with the dirty Services as an incremental pass does and also checks
//     the maps for drift;
//   - rebuild: rebuild the Index from a Snapshot, then write only what
//     differs from what was written: after an option change (SetNodeAddrs),
//     after a failed read, and on every pass when the Source cannot say what
//     changed;
//   - incremental: take the Services the Source marked dirty
//     (IncrementalSource), rebuild only those in the Index and write its
//     Delta, plus the frontends whose writes failed before. Its cost follows
//     the change, not the cluster.
//
// Passes are idempotent: an unchanged desired state writes nothing. Before
// the initial lists are in nothing is written at all, so a restarted agent
// keeps serving from the pinned maps the last one left (lbmap.New restores
// its bookkeeping from them) and never prunes a Service only because its
// object has not been listed yet.
//
// Write errors (map full, kernel errors) are counted, logged and retried
// with backoff; they never stop the loop.
package reconcile

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/slim"
	"github.com/kpfree/kpfree/agent/watch"
)

// Defaults for Config.
const (
	DefaultMinInterval    = 100 * time.Millisecond
	DefaultResyncInterval = 5 * time.Minute
	DefaultRetryInterval  = time.Second
	DefaultStallTimeout   = time.Minute
)

// ErrNotSynced is returned by Reconcile before the informers have synced;
// nothing was written.
var ErrNotSynced = errors.New("reconcile: informers have not synced yet; nothing written")

// Source is where the current state comes from (watch.Watcher).
type Source interface {
	Synced() bool
	Snapshot() (watch.Snapshot, error)
}

// IncrementalSource is a Source that also tracks which Services changed
// (watch.Watcher): the reconciler then rebuilds only those.
type IncrementalSource interface {
	Source
	// TakeDirty returns the Services changed since the last call and
	// forgets them.
	TakeDirty() []types.NamespacedName
	// Service returns a Service's current object (nil: gone) and slices.
	Service(key types.NamespacedName) (*slim.Service, []*slim.EndpointSlice, error)
}

// Reporter receives each model warning once (per Service generation) for as
// long as it persists.
type Reporter interface {
	Warn(w model.Warning)
}

// ReporterFunc adapts a function to Reporter.
type ReporterFunc func(model.Warning)

// Warn implements Reporter.
func (f ReporterFunc) Warn(w model.Warning) { f(w) }

// Config for a Reconciler.
type Config struct {
	Maps   lbmap.Maps
	Source Source
	// Reload, if set, builds a fresh lbmap.Maps from what the maps hold
	// (lbmap.New). A periodic resync that finds drift uses it, so the next
	// Sync compares with the maps rather than with bookkeeping that no
	// longer matches them.
	Reload   func() (lbmap.Maps, error)
	NodeName string
	Model    model.Options
	Reporter Reporter // nil: warnings are only logged
	// Gate, if set, must also report true before the first pass (e.g. the
	// NodePort devices are selected, so the first full sync, which prunes,
	// does not drop the NodePorts a restarted agent's maps still serve).
	Gate func() bool
	// OnHealthChecks, if set, gets the health checks after every pass, once
	// the maps were written (cheap: the Index keeps the list between
	// changes). The slice is shared: do not modify it.
	OnHealthChecks func([]model.HealthCheck)
	// AfterFull, if set, is called by Run after every full and rebuild
	// pass, once it is done: the pass's scratch (a Dump of the maps, the
	// whole desired state, a rebuilt model's predecessor) is garbage then.
	AfterFull func()
	Metrics   *Metrics // nil: none
	Log       *slog.Logger

	// MinInterval is the shortest time between two passes: changes that
	// arrive meanwhile are batched (default 100 ms).
	MinInterval time.Duration
	// ResyncInterval is the period of full passes (default 5 min).
	ResyncInterval time.Duration
	// RetryInterval is the first retry after failed writes; it doubles up to
	// ResyncInterval (default 1 s).
	RetryInterval time.Duration
	// StallTimeout: Healthy fails when a change has waited this long
	// (default 1 min).
	StallTimeout time.Duration
}

// Stats describe one pass.
type Stats struct {
	Full               bool
	Services, Backends int // programmed after the pass
	Upserts, Deletes   int // Services written or deleted (a full pass counts every desired one)
	// Mode is "full", "rebuild" or "incremental" (see the package doc).
	Mode string
	// Dirty is the number of Services an incremental pass rebuilt.
	Dirty           int
	Errors, MapFull int
	Drift           bool
	NewWarnings     int
	Duration        time.Duration
	// Err joins the write errors of the pass (also counted in Errors).
	Err error
}

// Reconciler programs lbmap.Maps from a Source.
type Reconciler struct {
	cfg Config

	mu    sync.Mutex // one pass at a time
	maps  lbmap.Maps
	index *model.Index
	// applied is what was written: each frontend's lbmap.ServiceHash (8
	// bytes instead of a copy of the Service); nil until the first full pass.
	applied map[lbmap.Frontend]uint64
	// retry holds frontends whose last write failed (incremental passes
	// write them again).
	retry map[lbmap.Frontend]struct{}
	// rebuild: the next pass must rebuild the model from a Snapshot
	// (options changed, or a failed pass lost the dirty set).
	rebuild bool

	kick         chan struct{} // option changes: a pass is due
	ready        atomic.Bool
	pendingSince atomic.Int64 // unix ns of the oldest unprocessed change; 0: none
	passes       atomic.Int64
}

// New returns a Reconciler; nothing happens until Reconcile or Run.
func New(cfg Config) *Reconciler {
	if cfg.MinInterval <= 0 {
		cfg.MinInterval = DefaultMinInterval
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = DefaultResyncInterval
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = DefaultRetryInterval
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = DefaultStallTimeout
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	cfg.Model.NodeName = cfg.NodeName
	return &Reconciler{cfg: cfg, maps: cfg.Maps, index: model.NewIndex(),
		retry: map[lbmap.Frontend]struct{}{}, kick: make(chan struct{}, 1)}
}

// ModelOptions returns the model options the next pass uses.
func (r *Reconciler) ModelOptions() model.Options {
	r.mu.Lock()
	defer r.mu.Unlock()
	o := r.cfg.Model
	o.NodeAddrs = slices.Clone(o.NodeAddrs)
	return o
}

// SetGate sets Config.Gate; call it before Run.
func (r *Reconciler) SetGate(g func() bool) {
	r.mu.Lock()
	r.cfg.Gate = g
	r.mu.Unlock()
}

// SetNodeAddrs changes the addresses NodePorts are served on (model
// Options.NodeAddrs); Run applies them in its next pass, soon.
func (r *Reconciler) SetNodeAddrs(addrs []netip.Addr) {
	r.mu.Lock()
	r.cfg.Model.NodeAddrs = slices.Clone(addrs)
	r.rebuild = true
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Ready reports whether the first full pass has run: the maps reflect the API
// server (minus Services whose writes failed, which are retried).
func (r *Reconciler) Ready() bool { return r.ready.Load() }

// Passes counts the passes that ran (for tests and status).
func (r *Reconciler) Passes() int64 { return r.passes.Load() }

// Healthy fails when a change has been waiting longer than StallTimeout: the
// loop is stuck.
func (r *Reconciler) Healthy() error {
	if p := r.pendingSince.Load(); p != 0 {
		if age := time.Since(time.Unix(0, p)); age > r.cfg.StallTimeout {
			return fmt.Errorf("a change has waited %s for a reconcile pass", age.Round(time.Second))
		}
	}
	return nil
}

// Reconcile runs one pass. full forces a full pass (the first pass is
// always full). The error is ErrNotSynced or a failure to read the state;
// write failures are in Stats (Errors, Err) and do not fail the pass.
func (r *Reconciler) Reconcile(full bool) (Stats, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t0 := time.Now()
	if !r.cfg.Source.Synced() {
		return Stats{}, ErrNotSynced
	}
	inc, isInc := r.cfg.Source.(IncrementalSource)
	st := Stats{Full: full || r.applied == nil, Mode: "incremental"}
	var delta model.Delta
	// The model is rebuilt from a Snapshot on the first pass, after a
	// failed read or an option change, and on every pass of a Source that
	// cannot say what changed; otherwise it is updated with the dirty
	// Services, periodic full passes included (the Index always equals a
	// rebuild, see model.Index; a rebuild would only double the model in
	// memory for the length of the pass).
	if r.applied == nil || !isInc || r.rebuild {
		st.Mode = "rebuild"
		if st.Full {
			st.Mode = "full"
		}
		// Changes marked from here on are read again by the next pass.
		r.rebuild = true
		if isInc {
			inc.TakeDirty()
		}
		snap, err := r.cfg.Source.Snapshot()
		if err != nil {
			r.countErr(err)
			return Stats{}, err
		}
		delta = r.index.Reset(snap.Services, snap.EndpointSlices, r.cfg.NodeName, r.cfg.Model)
		r.rebuild = false
		desired := r.index.Services()
		if st.Full {
			r.full(desired, &st)
		} else {
			r.diff(desired, &st)
		}
	} else {
		keys := inc.TakeDirty()
		in := make([]model.ServiceInput, 0, len(keys))
		for _, k := range keys {
			svc, sl, err := inc.Service(k)
			if err != nil {
				r.rebuild = true // the taken keys are lost: rebuild next time
				r.countErr(err)
				return Stats{}, err
			}
			in = append(in, model.ServiceInput{Key: k, Service: svc, Slices: sl})
		}
		st.Dirty = len(in)
		delta = r.index.Update(in)
		if st.Full {
			st.Mode = "full"
			r.full(r.index.Services(), &st)
		} else {
			r.apply(delta, &st)
		}
	}
	st.NewWarnings = r.report(delta.NewWarnings)
	st.Services = len(r.applied)
	if bc, ok := r.maps.(interface{ BackendCount() int }); ok {
		st.Backends = bc.BackendCount()
	}
	if r.cfg.OnHealthChecks != nil {
		r.cfg.OnHealthChecks(r.index.HealthChecks())
	}
	st.Duration = time.Since(t0)
	r.passes.Add(1)
	if m := r.cfg.Metrics; m != nil {
		m.SyncDuration.WithLabelValues(st.Mode).Observe(st.Duration.Seconds())
		m.Services.Set(float64(st.Services))
		m.Backends.Set(float64(st.Backends))
		m.Warnings.Set(float64(r.index.WarningCount()))
		m.LastSync.Set(float64(time.Now().UnixNano()) / 1e9)
	}
	return st, nil
}

// setApplied and unsetApplied keep applied up to date.
func (r *Reconciler) setApplied(s lbmap.Service) {
	r.applied[key(s.Frontend)] = lbmap.ServiceHash(s)
}

func (r *Reconciler) unsetApplied(fe lbmap.Frontend) {
	delete(r.applied, key(fe))
}

func (r *Reconciler) resetApplied(n int) {
	r.applied = make(map[lbmap.Frontend]uint64, n)
	clear(r.retry)
}

// full makes the maps hold exactly desired.
func (r *Reconciler) full(desired []lbmap.Service, st *Stats) {
	if r.applied != nil {
		r.checkDrift(st)
	}
	st.Upserts = len(desired)
	err := r.maps.Sync(desired)
	if err == nil {
		r.resetApplied(len(desired))
		for _, s := range desired {
			r.setApplied(s)
		}
		return
	}
	r.failed(st, "sync", err)
	// Which Services made it is in the maps: start from there, and compare
	// everything on the next pass.
	r.resetApplied(len(desired))
	r.rebuild = true
	dump, derr := r.maps.Dump()
	if derr != nil {
		r.failed(st, "dump", derr)
		return
	}
	for _, s := range dump {
		s.RevNatID = 0
		r.setApplied(s)
	}
}

// checkDrift compares the maps with what was written; on a difference it
// reloads the bookkeeping from the maps so the Sync that follows repairs
// them.
func (r *Reconciler) checkDrift(st *Stats) {
	dump, err := r.maps.Dump()
	if err != nil {
		r.failed(st, "dump", err)
		return
	}
	if sameState(dump, r.applied) {
		return
	}
	st.Drift = true
	if m := r.cfg.Metrics; m != nil {
		m.Drift.Inc()
	}
	r.cfg.Log.Warn("maps differ from what the agent wrote; repairing", "programmed", len(dump), "expected", len(r.applied))
	if r.cfg.Reload == nil {
		return
	}
	m, err := r.cfg.Reload()
	if err != nil {
		r.failed(st, "reload maps", err)
		return
	}
	r.maps = m
}

// diff writes the difference between desired (the whole state) and what
// was written: it deletes the frontends that went, then upserts the changed
// ones (deleting first frees room in the maps).
func (r *Reconciler) diff(desired []lbmap.Service, st *Stats) {
	want := make(map[lbmap.Frontend]bool, len(desired))
	for _, s := range desired {
		want[key(s.Frontend)] = true
	}
	var gone []lbmap.Frontend
	for fe := range r.applied {
		if !want[fe] {
			gone = append(gone, fe)
		}
	}
	slices.SortFunc(gone, lbmap.Frontend.Compare)
	clear(r.retry) // everything is compared here
	r.write(gone, desired, st)
}

// apply writes an incremental pass's Delta and retries the frontends whose
// writes failed before.
func (r *Reconciler) apply(d model.Delta, st *Stats) {
	removed, set := d.Removed, d.Set
	if len(r.retry) > 0 {
		inDelta := make(map[lbmap.Frontend]bool, len(d.Removed)+len(d.Set))
		for _, fe := range d.Removed {
			inDelta[key(fe)] = true
		}
		for _, s := range d.Set {
			inDelta[key(s.Frontend)] = true
		}
		removed, set = slices.Clone(removed), slices.Clone(set)
		for fe := range r.retry {
			if inDelta[fe] {
				continue
			}
			if s, ok := r.index.Lookup(fe); ok {
				set = append(set, s)
			} else {
				removed = append(removed, fe)
			}
		}
		clear(r.retry)
		slices.SortFunc(removed, lbmap.Frontend.Compare)
		lbmap.SortServices(set)
	}
	r.write(removed, set, st)
}

// write deletes the frontends in gone that were written, then upserts the
// Services in set that differ from what was written. Failures are kept for
// a retry.
func (r *Reconciler) write(gone []lbmap.Frontend, set []lbmap.Service, st *Stats) {
	for _, fe := range gone {
		fe = key(fe)
		if _, ok := r.applied[fe]; !ok {
			continue
		}
		st.Deletes++
		if err := r.maps.Delete(fe); err != nil {
			r.failed(st, "delete "+fe.String(), err)
			r.retry[fe] = struct{}{}
			continue // still there: retried
		}
		r.unsetApplied(fe)
	}
	for _, s := range set {
		k := key(s.Frontend)
		if cur, ok := r.applied[k]; ok && cur == lbmap.ServiceHash(s) {
			continue
		}
		st.Upserts++
		if err := r.maps.Upsert(s); err != nil {
			r.failed(st, "upsert "+s.Frontend.String(), err)
			r.unsetApplied(k) // unknown state: retried
			r.retry[k] = struct{}{}
			continue
		}
		r.setApplied(s)
	}
}

// failed counts and logs write errors; a joined error counts each part.
func (r *Reconciler) failed(st *Stats, what string, err error) {
	parts := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		parts = j.Unwrap()
	}
	for _, e := range parts {
		st.Errors++
		if errors.Is(e, lbmap.ErrMapFull) {
			st.MapFull++
		}
		r.countErr(e)
		r.cfg.Log.Error("map write failed; will retry", "op", what, "err", e)
	}
	st.Err = errors.Join(st.Err, fmt.Errorf("%s: %w", what, err))
}

func (r *Reconciler) countErr(err error) {
	if m := r.cfg.Metrics; m != nil {
		m.SyncErrors.Inc()
		if errors.Is(err, lbmap.ErrMapFull) {
			m.MapFull.Inc()
		}
	}
}

// report hands new warnings to the Reporter (the Index says which are new:
// a warning is reported once for as long as it persists, and again if it
// comes back).
func (r *Reconciler) report(ws []model.Warning) int {
	for _, w := range ws {
		r.cfg.Log.Warn("service not fully supported", "service", w.Service.Namespace+"/"+w.Service.Name,
			"reason", w.Reason, "message", w.Message)
		if r.cfg.Reporter != nil {
			r.cfg.Reporter.Warn(w)
		}
	}
	return len(ws)
}

// Run waits for the informers, runs the first full pass, then a pass for
// every batch of changes (at most one per MinInterval), retries failed
// writes with backoff, and a full pass every ResyncInterval, until ctx ends.
func (r *Reconciler) Run(ctx context.Context, changes <-chan struct{}) error {
	log := r.cfg.Log
	t0 := time.Now()
	for !r.cfg.Source.Synced() || (r.cfg.Gate != nil && !r.cfg.Gate()) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	log.Info("lists synced", "after", time.Since(t0).Round(time.Millisecond))

	var (
		pending  bool      // changes not yet processed
		since    time.Time // first of them
		lastRun  time.Time
		retryAt  time.Time // zero: no write retry due
		holdOff  time.Time // after a failed pass: no pass before this
		backoff  = r.cfg.RetryInterval
		nextFull time.Time // zero: at once
	)
	// Drain a signal raised by the initial lists: the first pass covers it.
	select {
	case <-changes:
	default:
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
		full := !r.Ready() || !now.Before(nextFull)
		due := full || (pending && !now.Before(lastRun.Add(r.cfg.MinInterval))) ||
			(!retryAt.IsZero() && !now.Before(retryAt))
		if due && !now.Before(holdOff) {
			st, err := r.Reconcile(full)
			lastRun = time.Now()
			if err != nil {
				log.Error("reconcile pass failed; will retry", "err", err, "in", backoff)
				holdOff, backoff = lastRun.Add(backoff), min(2*backoff, r.cfg.ResyncInterval)
				continue
			}
			if pending {
				if m := r.cfg.Metrics; m != nil {
					m.SyncLag.Observe(lastRun.Sub(since).Seconds())
				}
			}
			pending = false
			r.pendingSince.Store(0)
			if st.Mode != "incremental" && r.cfg.AfterFull != nil {
				r.cfg.AfterFull()
			}
			if full {
				nextFull = lastRun.Add(r.cfg.ResyncInterval)
				if !r.Ready() {
					r.ready.Store(true)
					log.Info("first full sync done", "services", st.Services, "backends", st.Backends,
						"errors", st.Errors, "took", st.Duration.Round(time.Microsecond))
				}
			}
			if st.Errors > 0 {
				retryAt, backoff = lastRun.Add(backoff), min(2*backoff, r.cfg.ResyncInterval)
			} else {
				retryAt, backoff = time.Time{}, r.cfg.RetryInterval
			}
			if st.Upserts+st.Deletes > 0 && !full {
				log.Debug("reconciled", "upserts", st.Upserts, "deletes", st.Deletes,
					"services", st.Services, "took", st.Duration.Round(time.Microsecond))
			}
			continue
		}

		next := nextFull
		if pending {
			next = earliest(next, lastRun.Add(r.cfg.MinInterval))
		}
		if !retryAt.IsZero() {
			next = earliest(next, retryAt)
		}
		if next.Before(holdOff) {
			next = holdOff
		}
		timer.Reset(time.Until(next))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changes:
			if !pending {
				pending, since = true, time.Now()
				r.pendingSince.Store(since.UnixNano())
			}
		case <-r.kick:
			if !pending {
				pending, since = true, time.Now()
				r.pendingSince.Store(since.UnixNano())
			}
		case <-timer.C:
		}
		timer.Stop() // Go >= 1.23: no stale tick survives Stop or Reset
	}
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// key is the map key of a frontend: IPv4-mapped addresses unmapped, as the
// maps store them.
func key(fe lbmap.Frontend) lbmap.Frontend {
	fe.Addr = fe.Addr.Unmap()
	return fe
}

// sameState compares a Dump with the applied set.
func sameState(dump []lbmap.Service, applied map[lbmap.Frontend]uint64) bool {
	if len(dump) != len(applied) {
		return false
	}
	for _, s := range dump {
		h, ok := applied[key(s.Frontend)]
		if !ok || h != lbmap.ServiceHash(s) {
			return false
		}
	}
	return true
}
