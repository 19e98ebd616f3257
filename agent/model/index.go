package model

import (
	"cmp"
	"slices"

	"k8s.io/apimachinery/pkg/types"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/slim"
)

// ServiceInput is the current state of one Service: the object (nil: it is
// gone) and its EndpointSlices (any order; unusable ones are skipped).
type ServiceInput struct {
	Key     types.NamespacedName
	Service *slim.Service
	Slices  []*slim.EndpointSlice
}

// Delta is what an [Index.Update] changed in the desired state: the
// frontends to program (with their new Service) and the ones to remove, both
// sorted by frontend, plus the warnings that are new.
type Delta struct {
	Set     []lbmap.Service
	Removed []lbmap.Frontend
	// NewWarnings are the warnings not present before the change (sorted as
	// in Result); a warning that persists is not repeated.
	NewWarnings []Warning
	// HealthChecks: the health checks may have changed.
	HealthChecks bool
}

// Index is the model kept up to date one Service at a time: it holds every
// managed Service's build from the last change and a frontend -> claimants
// index, so that a change to a few Services costs work in proportion to
// those Services (and to the Services sharing frontends with them), not to
// the cluster. Its Result always equals Build over the same objects.
//
// Frontend conflicts are resolved as Build does (Services in name order,
// first claim wins); a change re-resolves the whole group of Services that
// share frontends with a changed one, directly or through others, which is
// the changed Service alone unless frontends conflict.
//
// An Index is not safe for concurrent use.
type Index struct {
	opts Options
	svcs map[types.NamespacedName]*serviceBuild
	// claim holds one Service claiming each frontend (in any of its groups),
	// more the others, for the rare contested frontend.
	claim map[lbmap.Frontend]*serviceBuild
	more  map[lbmap.Frontend][]*serviceBuild

	nWarnings int
	hcs       []HealthCheck // sorted, valid if hcsValid
	hcsValid  bool
}

// NewIndex returns an empty Index.
func NewIndex() *Index {
	return &Index{svcs: map[types.NamespacedName]*serviceBuild{}, claim: map[lbmap.Frontend]*serviceBuild{},
		more: map[lbmap.Frontend][]*serviceBuild{}}
}

// Reset rebuilds the Index from the whole state with new options. Its Delta
// holds only NewWarnings (warnings not present before the reset) and
// HealthChecks; use Services or Result for the desired state.
func (x *Index) Reset(svcs []*slim.Service, endpointSlices []*slim.EndpointSlice, nodeName string, o Options) Delta {
	o.NodeName = nodeName
	o.NodeAddrs = slices.Clone(o.NodeAddrs)
	bySvc := slicesByService(endpointSlices)
	// The warnings before, for the diff; the old builds can go meanwhile.
	had := map[types.NamespacedName][]Warning{}
	for name, sb := range x.svcs {
		if ws := sb.allWarnings(); len(ws) > 0 {
			had[name] = ws
		}
	}
	x.opts = o
	x.svcs = make(map[types.NamespacedName]*serviceBuild, len(svcs))
	x.claim = make(map[lbmap.Frontend]*serviceBuild, len(svcs))
	x.more = map[lbmap.Frontend][]*serviceBuild{}
	x.nWarnings = 0
	x.hcs, x.hcsValid = nil, false

	built := make([]*serviceBuild, 0, len(svcs))
	for _, svc := range svcs {
		if svc == nil {
			continue
		}
		if ok, _ := Managed(svc, o); !ok {
			continue
		}
		k := svc.Key()
		sb := buildService(svc, o, bySvc[k])
		x.svcs[k] = sb
		x.addClaims(sb)
		built = append(built, sb)
	}
	// Only Services sharing a frontend with another depend on name order:
	// resolve those together, sorted; every other one on its own.
	var contested []*serviceBuild
	scratch := map[lbmap.Frontend]types.NamespacedName{}
	for _, sb := range built {
		if x.contested(sb) {
			contested = append(contested, sb)
			continue
		}
		sb.resolveAlone(scratch)
	}
	slices.SortFunc(contested, func(a, b *serviceBuild) int { return compareName(a.name, b.name) })
	owner := map[lbmap.Frontend]types.NamespacedName{}
	for _, sb := range contested {
		sb.resolve(owner)
	}
	var d Delta
	d.HealthChecks = true
	for _, sb := range built {
		ws := sb.allWarnings()
		x.nWarnings += len(ws)
		d.NewWarnings = append(d.NewWarnings, newWarnings(had[sb.name], ws)...)
	}
	sortWarnings(d.NewWarnings)
	return d
}

// Update applies changed Services (in any order; a key may appear once) and
// returns what changed in the desired state. Services not listed keep their
// last build.
func (x *Index) Update(changes []ServiceInput) Delta {
	var d Delta
	// Old builds and their warnings, for the diff.
	type before struct {
		sb       *serviceBuild
		warnings []Warning
	}
	prev := map[types.NamespacedName]before{}
	remember := func(sb *serviceBuild) {
		if _, ok := prev[sb.name]; !ok {
			prev[sb.name] = before{sb: sb, warnings: sb.allWarnings()}
		}
	}
	var seeds []lbmap.Frontend // frontends whose claimants must be re-resolved
	component := map[types.NamespacedName]*serviceBuild{}
	for _, in := range changes {
		if old := x.svcs[in.Key]; old != nil {
			remember(old)
			seeds = append(seeds, old.frontends()...)
			x.dropClaims(old)
			delete(x.svcs, in.Key)
			if old.hc != nil {
				d.HealthChecks = true
			}
		} else if _, ok := prev[in.Key]; !ok {
			prev[in.Key] = before{}
		}
		if in.Service == nil {
			continue
		}
		if ok, _ := Managed(in.Service, x.opts); !ok {
			continue
		}
		l := make([]*slim.EndpointSlice, 0, len(in.Slices))
		for _, es := range in.Slices {
			if es != nil && UsableSlice(es) && es.ServiceKey() == in.Key {
				l = append(l, es)
			}
		}
		sortSlices(l)
		sb := buildService(in.Service, x.opts, l)
		x.svcs[in.Key] = sb
		x.addClaims(sb)
		component[in.Key] = sb
		seeds = append(seeds, sb.frontends()...)
		if sb.hc != nil {
			d.HealthChecks = true
		}
	}
	// Close over shared frontends: every claimant of a seed frontend joins,
	// and its frontends become seeds in turn.
	seen := map[lbmap.Frontend]bool{}
	for len(seeds) > 0 {
		fe := seeds[len(seeds)-1]
		seeds = seeds[:len(seeds)-1]
		if seen[fe] {
			continue
		}
		seen[fe] = true
		x.claimants(fe, func(sb *serviceBuild) {
			if _, ok := component[sb.name]; ok {
				return
			}
			remember(sb)
			component[sb.name] = sb
			seeds = append(seeds, sb.frontends()...)
		})
	}

	// What the component served before.
	touched := map[lbmap.Frontend]bool{}
	for _, p := range prev {
		if p.sb == nil {
			continue
		}
		for _, g := range p.sb.groups {
			if g.accepted {
				for _, e := range g.entries {
					touched[e.LB.Frontend] = true
				}
			}
		}
	}
	// Re-resolve the component in name order. No Service outside it claims
	// any of its frontends, so an empty owner map is the right start.
	members := make([]*serviceBuild, 0, len(component))
	for _, sb := range component {
		members = append(members, sb)
	}
	slices.SortFunc(members, func(a, b *serviceBuild) int { return compareName(a.name, b.name) })
	owner := map[lbmap.Frontend]types.NamespacedName{}
	set := map[lbmap.Frontend]int{}
	for _, sb := range members {
		sb.resolve(owner)
		for _, g := range sb.groups {
			if !g.accepted {
				continue
			}
			for _, e := range g.entries {
				set[e.LB.Frontend] = len(d.Set)
				d.Set = append(d.Set, e.LB)
			}
		}
	}
	for fe := range touched {
		if _, ok := set[fe]; !ok {
			d.Removed = append(d.Removed, fe)
		}
	}
	slices.SortFunc(d.Set, func(a, b lbmap.Service) int { return a.Frontend.Compare(b.Frontend) })
	slices.SortFunc(d.Removed, lbmap.Frontend.Compare)

	// Warnings: per Service, the ones it did not have before.
	for _, p := range prev {
		x.nWarnings -= len(p.warnings)
	}
	for _, sb := range members {
		ws := sb.allWarnings()
		x.nWarnings += len(ws)
		d.NewWarnings = append(d.NewWarnings, newWarnings(prev[sb.name].warnings, ws)...)
	}
	sortWarnings(d.NewWarnings)
	if d.HealthChecks {
		x.hcsValid = false
	}
	return d
}

// newWarnings are the warnings in ws that are not in had.
func newWarnings(had, ws []Warning) []Warning {
	if len(had) == 0 {
		return ws
	}
	keys := make(map[string]bool, len(had))
	for _, w := range had {
		keys[w.Key()] = true
	}
	var out []Warning
	for _, w := range ws {
		if !keys[w.Key()] {
			out = append(out, w)
		}
	}
	return out
}

// Lookup returns the desired Service of a frontend, if one is served.
func (x *Index) Lookup(fe lbmap.Frontend) (lbmap.Service, bool) {
	var out lbmap.Service
	found := false
	x.claimants(fe, func(sb *serviceBuild) {
		for _, g := range sb.groups {
			if !g.accepted {
				continue
			}
			for _, e := range g.entries {
				if e.LB.Frontend == fe {
					out, found = e.LB, true
				}
			}
		}
	})
	return out, found
}

// Services returns the desired lbmap Services, sorted by frontend (as
// Result().Services()).
func (x *Index) Services() []lbmap.Service {
	out := make([]lbmap.Service, 0, len(x.claim))
	for _, sb := range x.svcs {
		for _, g := range sb.groups {
			if g.accepted {
				for _, e := range g.entries {
					out = append(out, e.LB)
				}
			}
		}
	}
	lbmap.SortServices(out)
	return out
}

// WarningCount is the number of current warnings.
func (x *Index) WarningCount() int { return x.nWarnings }

// HealthChecks returns the current health checks, sorted by Service. The
// slice is shared until the next change: do not modify it.
func (x *Index) HealthChecks() []HealthCheck {
	if !x.hcsValid {
		x.hcs = nil
		for _, sb := range x.svcs {
			if sb.hc != nil {
				x.hcs = append(x.hcs, *sb.hc)
			}
		}
		sortHealthChecks(x.hcs)
		x.hcsValid = true
	}
	return x.hcs
}

// Result materializes the whole desired state, equal to Build's.
func (x *Index) Result() Result {
	var res Result
	for _, sb := range x.svcs {
		res.Entries = sb.appendAccepted(res.Entries)
		res.Warnings = append(res.Warnings, sb.warnings...)
		res.Warnings = append(res.Warnings, sb.conflicts...)
	}
	slices.SortFunc(res.Entries, func(a, b Entry) int { return a.LB.Frontend.Compare(b.LB.Frontend) })
	sortWarnings(res.Warnings)
	res.Warnings = slices.CompactFunc(res.Warnings, func(a, b Warning) bool { return a.Key() == b.Key() })
	res.HealthChecks = slices.Clone(x.HealthChecks())
	return res
}

// allWarnings are the Service's warnings, sorted and without repeats.
func (sb *serviceBuild) allWarnings() []Warning {
	if len(sb.warnings)+len(sb.conflicts) == 0 {
		return nil
	}
	ws := make([]Warning, 0, len(sb.warnings)+len(sb.conflicts))
	ws = append(append(ws, sb.warnings...), sb.conflicts...)
	sortWarnings(ws)
	return slices.CompactFunc(ws, func(a, b Warning) bool { return a.Key() == b.Key() })
}

// frontends are the distinct frontends the Service claims, accepted or not.
func (sb *serviceBuild) frontends() []lbmap.Frontend {
	var out []lbmap.Frontend
	for _, g := range sb.groups {
		for _, e := range g.entries {
			if !slices.Contains(out, e.LB.Frontend) {
				out = append(out, e.LB.Frontend)
			}
		}
	}
	return out
}

// resolveAlone resolves a Service no other one shares a frontend with: only
// its own groups can conflict. scratch is an empty map to work in.
func (sb *serviceBuild) resolveAlone(scratch map[lbmap.Frontend]types.NamespacedName) {
	if len(sb.groups) <= 1 { // the entries of one group are distinct frontends
		sb.conflicts = nil
		for i := range sb.groups {
			sb.groups[i].accepted = true
		}
		return
	}
	sb.resolve(scratch)
	clear(scratch)
}

// contested reports whether another Service claims one of sb's frontends.
func (x *Index) contested(sb *serviceBuild) bool {
	if len(x.more) == 0 {
		return false
	}
	for _, g := range sb.groups {
		for _, e := range g.entries {
			if len(x.more[e.LB.Frontend]) > 0 {
				return true
			}
		}
	}
	return false
}

func (x *Index) addClaims(sb *serviceBuild) {
	for _, g := range sb.groups {
		for _, e := range g.entries {
			fe := e.LB.Frontend
			if cur, ok := x.claim[fe]; !ok {
				x.claim[fe] = sb
			} else if cur != sb && !slices.Contains(x.more[fe], sb) {
				x.more[fe] = append(x.more[fe], sb)
			}
		}
	}
}

func (x *Index) dropClaims(sb *serviceBuild) {
	for _, g := range sb.groups {
		for _, e := range g.entries {
			fe := e.LB.Frontend
			more := x.more[fe]
			switch {
			case x.claim[fe] == sb && len(more) == 0:
				delete(x.claim, fe)
				continue
			case x.claim[fe] == sb:
				x.claim[fe] = more[0]
				more = more[1:]
			case slices.Contains(more, sb):
				more = slices.DeleteFunc(slices.Clone(more), func(o *serviceBuild) bool { return o == sb })
			default:
				continue // a repeated frontend, already dropped
			}
			if len(more) == 0 {
				delete(x.more, fe)
			} else {
				x.more[fe] = more
			}
		}
	}
}

func (x *Index) claimants(fe lbmap.Frontend, fn func(*serviceBuild)) {
	if sb, ok := x.claim[fe]; ok {
		fn(sb)
	}
	for _, sb := range x.more[fe] {
		fn(sb)
	}
}

func compareName(a, b types.NamespacedName) int {
	return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
}
