package lbmap

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/kpfree/kpfree/bpf"
)

// Capacity is the number of entries each map holds.
type Capacity struct {
	Services      int // masters + slots
	Backends      int
	RevNat        int
	AffinityMatch int
	SrcRanges     int // source-range prefixes, all Services together
	Maglev        int // Maglev tables (one per Maglev Service with backends)
}

// DefaultCapacity matches the defaults of bpf/kpf_maps.h.
var DefaultCapacity = Capacity{
	Services: 65536, Backends: 65536, RevNat: 65536, AffinityMatch: 65536,
	SrcRanges: 16384, Maglev: 16384,
}

// store is raw map access, already in map form; bpfStore and memStore
// implement it. Deleting a missing key is no error.
type store interface {
	putService(k bpf.SvcKey, v bpf.SvcVal) error
	delService(k bpf.SvcKey) error
	putBackend(id uint32, v bpf.BackendVal) error
	delBackend(id uint32) error
	putRevNat(id uint32, v bpf.RevNatVal) error
	delRevNat(id uint32) error
	putMatch(k bpf.AffMatchKey) error
	delMatch(k bpf.AffMatchKey) error
	putRange(k bpf.SrcRangeKey) error
	delRange(k bpf.SrcRangeKey) error
	putMaglev(revNat uint32, v *bpf.MaglevVal) error
	delMaglev(revNat uint32) error

	services(fn func(bpf.SvcKey, bpf.SvcVal)) error
	backends(fn func(uint32, bpf.BackendVal)) error
	revNats(fn func(uint32, bpf.RevNatVal)) error
	matches(fn func(bpf.AffMatchKey)) error
	ranges(fn func(bpf.SrcRangeKey)) error
	maglevs(fn func(uint32, *bpf.MaglevVal)) error
}

// Table implements [Maps] over a store: the bookkeeping (ids, reference
// counts) lives here, the truth in the store. After a failed write it
// re-reads the store, so it never believes in a state the maps do not hold.
type Table struct {
	mu  sync.Mutex
	st  store
	cap Capacity

	svcs      map[Frontend]*svcState
	byBackend map[Backend]uint32
	backends  map[uint32]Backend
	refs      map[uint32]int // Services using a backend id
	backendID *idAlloc
	revNatID  *idAlloc
	slots     int // Σ (1 + count): entries in the services map
	pairs     int // Σ distinct backends per Service: entries in the match map
	ranges    int // Σ source ranges: entries in the src-ranges map
	tables    int // Services with a Maglev table: entries in the maglev map
}

var _ Maps = (*Table)(nil)

func newTable(st store, c Capacity) (*Table, error) {
	t := &Table{st: st, cap: c}
	if err := t.restore(); err != nil {
		return nil, err
	}
	return t, nil
}

// Len is the number of Services (frontends) in the maps.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.svcs)
}

// BackendCount is the number of distinct backends in the maps.
func (t *Table) BackendCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.backends)
}

// Upsert implements [Maps].
func (t *Table) Upsert(svc Service) error {
	svc, err := normalize(svc)
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.upsert(svc)
}

// Delete implements [Maps].
func (t *Table) Delete(fe Frontend) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.delete(normalizeFrontend(fe))
}

// Sync implements [Maps].
func (t *Table) Sync(svcs []Service) error {
	want := make(map[Frontend]bool, len(svcs))
	norm := make([]Service, 0, len(svcs))
	for _, s := range svcs {
		n, err := normalize(s)
		if err != nil {
			return err
		}
		if want[n.Frontend] {
			return invalid("%s listed twice", n.Frontend)
		}
		want[n.Frontend] = true
		norm = append(norm, n)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	var stale []Frontend
	for fe := range t.svcs {
		if !want[fe] {
			stale = append(stale, fe)
		}
	}
	slices.SortFunc(stale, Frontend.Compare)
	var errs []error
	for _, fe := range stale {
		if err := t.delete(fe); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", fe, err))
		}
	}
	for _, s := range norm {
		if err := t.upsert(s); err != nil {
			errs = append(errs, fmt.Errorf("upsert %s: %w", s.Frontend, err))
		}
	}
	return errors.Join(errs...)
}

// Dump implements [Maps]: it reads the maps, not the bookkeeping.
func (t *Table) Dump() ([]Service, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	snap, err := readStore(t.st)
	if err != nil {
		return nil, err
	}
	out := make([]Service, 0, len(snap.masters))
	for fe, h := range snap.masters {
		s := Service{
			Frontend: fe, RevNatID: h.revNat, Backends: []Backend{},
			External:  h.flags&bpf.SvcFlagExternal != 0,
			LocalOnly: h.flags&bpf.SvcFlagLocal != 0,
			Maglev:    h.flags&bpf.SvcFlagMaglev != 0,
		}
		if h.flags&bpf.SvcFlagAffinity != 0 {
			s.Affinity = time.Duration(h.timeout) * time.Second
		}
		if h.flags&bpf.SvcFlagSrcRanges != 0 {
			s.SourceRanges = snap.ranges[h.revNat]
		}
		for slot := uint16(1); slot <= h.count && slot != 0; slot++ {
			if b, ok := snap.backends[snap.slots[fe][slot]]; ok {
				s.Backends = append(s.Backends, b)
			}
		}
		out = append(out, s)
	}
	SortServices(out)
	return out, nil
}

// Verify checks the datapath's invariants on the maps as they are: every
// slot of every master exists and points to an existing backend, with its
// affinity pair and rev-nat entry in place; a master flagged for source
// ranges has some, one flagged Maglev (with backends) has its table, filled
// from its own backends. Tests call it between writes.
func (t *Table) Verify() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	snap, err := readStore(t.st)
	if err != nil {
		return err
	}
	return snap.verify()
}

func (t *Table) upsert(svc Service) error {
	fe := svc.Frontend
	old := t.svcs[fe]

	hdr := masterHdr{count: uint16(len(svc.Backends)), flags: svcFlags(svc)}
	if svc.Affinity > 0 {
		hdr.timeout = uint32(affinitySeconds(svc.Affinity))
	}
	wantMaglev := svc.Maglev && len(svc.Backends) > 0
	if old != nil {
		hdr.revNat = old.hdr.revNat
	}
	ids := make([]uint32, len(svc.Backends))
	var need []Backend
	needIdx := map[Backend]int{}
	for i, b := range svc.Backends {
		if id, ok := t.byBackend[b]; ok {
			ids[i] = id
		} else if _, ok := needIdx[b]; !ok {
			needIdx[b] = len(need)
			need = append(need, b)
		}
	}
	if old != nil && !old.dirty && len(need) == 0 && old.hdr == hdr && slices.Equal(old.ids, ids) &&
		slices.Equal(old.ranges, svc.SourceRanges) && old.maglev == wantMaglev {
		return nil // unchanged
	}

	var oldIDs []uint32
	var oldRanges []netip.Prefix
	oldMaglev := false
	if old != nil {
		oldIDs, oldRanges, oldMaglev = old.ids, old.ranges, old.maglev
	}
	newRanges := 0
	for _, p := range svc.SourceRanges {
		if !slices.Contains(oldRanges, p) {
			newRanges++
		}
	}
	had := idSet(distinct(oldIDs))
	added := len(need)
	for _, id := range distinct(ids) {
		if !had[id] {
			added++
		}
	}
	if err := t.checkRoom(old == nil, len(ids), len(oldIDs), len(need), added); err != nil {
		return err
	}
	if need := t.ranges + newRanges; need > t.cap.SrcRanges {
		return &MapFullError{Map: bpf.MapSrcRanges, Need: need, Cap: t.cap.SrcRanges}
	}
	if need := t.tables + 1; wantMaglev && !oldMaglev && need > t.cap.Maglev {
		return &MapFullError{Map: bpf.MapMaglev, Need: need, Cap: t.cap.Maglev}
	}

	// Allocate; nothing is written yet, so a failure just gives the ids back.
	var fresh []idBackend
	undo := func() {
		for _, f := range fresh {
			t.backendID.release(f.id)
		}
		if old == nil && hdr.revNat != 0 {
			t.revNatID.release(hdr.revNat)
		}
	}
	if old == nil {
		rn, ok := t.revNatID.alloc()
		if !ok {
			return &MapFullError{Map: bpf.MapRevNat, Need: len(t.svcs) + 1, Cap: t.cap.RevNat}
		}
		hdr.revNat = rn
	}
	for _, b := range need {
		id, ok := t.backendID.alloc()
		if !ok {
			undo()
			return &MapFullError{Map: bpf.MapBackends, Need: len(t.backends) + len(need), Cap: t.cap.Backends}
		}
		fresh = append(fresh, idBackend{id: id, b: b})
	}
	for i, b := range svc.Backends {
		if ids[i] == 0 {
			ids[i] = fresh[needIdx[b]].id
		}
	}

	keep := idSet(ids)
	var orphans []uint32
	for _, id := range distinct(oldIDs) {
		if !keep[id] && t.refs[id] == 1 {
			orphans = append(orphans, id)
		}
	}
	want := svcState{hdr: hdr, ids: ids, ranges: svc.SourceRanges, maglev: wantMaglev}
	var table []uint32
	if wantMaglev {
		table = maglevIDs(svc.Backends, ids)
	}
	if err := t.apply(planUpsert(fe, old, want, fresh, orphans, table)); err != nil {
		return err
	}

	// Commit the bookkeeping.
	for _, f := range fresh {
		t.byBackend[f.b] = f.id
		t.backends[f.id] = f.b
	}
	for _, id := range distinct(ids) {
		if !had[id] {
			t.refs[id]++
		}
	}
	for _, id := range distinct(oldIDs) {
		if !keep[id] {
			t.unref(id)
		}
	}
	if old == nil {
		t.slots++
	}
	t.slots += len(ids) - len(oldIDs)
	t.pairs += len(distinct(ids)) - len(distinct(oldIDs))
	t.ranges += len(want.ranges) - len(oldRanges)
	t.tables += b2i(want.maglev) - b2i(oldMaglev)
	t.svcs[fe] = &want
	return nil
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// svcFlags are the master entry's SVC_F_* flags for a normalized Service.
func svcFlags(svc Service) uint8 {
	var f uint8
	if svc.Affinity > 0 {
		f |= bpf.SvcFlagAffinity
	}
	if svc.External {
		f |= bpf.SvcFlagExternal
	}
	if svc.LocalOnly {
		f |= bpf.SvcFlagLocal
	}
	if len(svc.SourceRanges) > 0 {
		f |= bpf.SvcFlagSrcRanges
	}
	if svc.Maglev {
		f |= bpf.SvcFlagMaglev
	}
	return f
}

func (t *Table) delete(fe Frontend) error {
	old := t.svcs[fe]
	if old == nil {
		return nil
	}
	var orphans []uint32
	for _, id := range distinct(old.ids) {
		if t.refs[id] == 1 {
			orphans = append(orphans, id)
		}
	}
	if err := t.apply(planDelete(fe, *old, orphans)); err != nil {
		return err
	}
	for _, id := range distinct(old.ids) {
		t.unref(id)
	}
	t.revNatID.release(old.hdr.revNat)
	t.slots -= 1 + len(old.ids)
	t.pairs -= len(distinct(old.ids))
	t.ranges -= len(old.ranges)
	t.tables -= b2i(old.maglev)
	delete(t.svcs, fe)
	return nil
}

func (t *Table) unref(id uint32) {
	t.refs[id]--
	if t.refs[id] > 0 {
		return
	}
	delete(t.refs, id)
	if b, ok := t.backends[id]; ok && t.byBackend[b] == id {
		delete(t.byBackend, b)
	}
	delete(t.backends, id)
	t.backendID.release(id)
}

// checkRoom checks the peak each map reaches during the change: old and new
// entries coexist until the stale ones go.
func (t *Table) checkRoom(isNew bool, nSlots, oldSlots, newBackends, newPairs int) error {
	newSvc := 0
	if isNew {
		newSvc = 1
	}
	if need := t.slots + newSvc + max(0, nSlots-oldSlots); need > t.cap.Services {
		return &MapFullError{Map: bpf.MapServices, Need: need, Cap: t.cap.Services}
	}
	if need := len(t.backends) + newBackends; need > t.cap.Backends {
		return &MapFullError{Map: bpf.MapBackends, Need: need, Cap: t.cap.Backends}
	}
	if need := len(t.svcs) + newSvc; need > t.cap.RevNat {
		return &MapFullError{Map: bpf.MapRevNat, Need: need, Cap: t.cap.RevNat}
	}
	if need := t.pairs + newPairs; need > t.cap.AffinityMatch {
		return &MapFullError{Map: bpf.MapAffMatch, Need: need, Cap: t.cap.AffinityMatch}
	}
	return nil
}

// apply writes ops in order. On failure it re-reads the store (the writes
// done so far are harmless by construction, and the next Upsert repairs the
// rest) and returns the write error.
func (t *Table) apply(ops []op) error {
	for _, o := range ops {
		if err := t.write(o); err != nil {
			werr := fmt.Errorf("lbmap: %s: %w", o, err)
			if rerr := t.restore(); rerr != nil {
				return errors.Join(werr, fmt.Errorf("lbmap: re-reading maps: %w", rerr))
			}
			return werr
		}
	}
	return nil
}

func (t *Table) write(o op) error {
	switch o.kind {
	case opPutBackend:
		return t.st.putBackend(o.id, backendVal(o.backend))
	case opPutMatch:
		return t.st.putMatch(bpf.AffMatchKey{BackendId: o.id, RevNatId: o.revNat})
	case opPutSlot:
		return t.st.putService(svcKey(o.fe, o.slot), slotVal(o.id, o.revNat))
	case opPutRevNat:
		return t.st.putRevNat(o.revNat, revNatVal(o.fe))
	case opPutRange:
		return t.st.putRange(srcRangeKey(o.revNat, o.prefix))
	case opPutMaglev:
		return t.st.putMaglev(o.revNat, maglevVal(o.table))
	case opPutMaster:
		return t.st.putService(svcKey(o.fe, 0), masterVal(o.hdr))
	case opDelMaster:
		return t.st.delService(svcKey(o.fe, 0))
	case opDelSlot:
		return t.st.delService(svcKey(o.fe, o.slot))
	case opDelRange:
		return t.st.delRange(srcRangeKey(o.revNat, o.prefix))
	case opDelMaglev:
		return t.st.delMaglev(o.revNat)
	case opDelRevNat:
		return t.st.delRevNat(o.revNat)
	case opDelMatch:
		return t.st.delMatch(bpf.AffMatchKey{BackendId: o.id, RevNatId: o.revNat})
	case opDelBackend:
		return t.st.delBackend(o.id)
	}
	return fmt.Errorf("unknown op %d", o.kind)
}

// snapshot is the decoded content of the maps.
type snapshot struct {
	masters  map[Frontend]masterHdr
	slots    map[Frontend]map[uint16]uint32 // slot -> backend id
	slotRN   map[Frontend]map[uint16]uint32 // slot -> rev-nat id in the slot
	backends map[uint32]Backend
	revNats  map[uint32]Frontend // Proto unset: rev-nat entries are per address+port
	matches  map[bpf.AffMatchKey]bool
	ranges   map[uint32][]netip.Prefix // rev-nat id -> prefixes, sorted
	badRange []bpf.SrcRangeKey         // keys no srcRangeKey makes
	maglev   map[uint32][]uint32       // rev-nat id -> table
}

func readStore(st store) (*snapshot, error) {
	s := &snapshot{
		masters:  map[Frontend]masterHdr{},
		slots:    map[Frontend]map[uint16]uint32{},
		slotRN:   map[Frontend]map[uint16]uint32{},
		backends: map[uint32]Backend{},
		revNats:  map[uint32]Frontend{},
		matches:  map[bpf.AffMatchKey]bool{},
		ranges:   map[uint32][]netip.Prefix{},
		maglev:   map[uint32][]uint32{},
	}
	err := errors.Join(
		st.services(func(k bpf.SvcKey, v bpf.SvcVal) {
			fe, slot := svcKeyDecode(k)
			if slot == 0 {
				s.masters[fe] = masterDecode(v)
				return
			}
			if s.slots[fe] == nil {
				s.slots[fe] = map[uint16]uint32{}
				s.slotRN[fe] = map[uint16]uint32{}
			}
			s.slots[fe][slot] = v.BackendId
			s.slotRN[fe][slot] = v.RevNatId
		}),
		st.backends(func(id uint32, v bpf.BackendVal) { s.backends[id] = backendDecode(v) }),
		st.revNats(func(id uint32, v bpf.RevNatVal) {
			addr, port := revNatDecode(v)
			s.revNats[id] = Frontend{Addr: addr, Port: port}
		}),
		st.matches(func(k bpf.AffMatchKey) { s.matches[k] = true }),
		st.ranges(func(k bpf.SrcRangeKey) {
			rn, p, ok := srcRangeDecode(k)
			if !ok {
				s.badRange = append(s.badRange, k)
				return
			}
			s.ranges[rn] = append(s.ranges[rn], p)
		}),
		st.maglevs(func(rn uint32, v *bpf.MaglevVal) { s.maglev[rn] = slices.Clone(v.BackendId[:]) }),
	)
	if err != nil {
		return nil, fmt.Errorf("lbmap: read maps: %w", err)
	}
	for _, l := range s.ranges {
		slices.SortFunc(l, comparePrefix)
	}
	return s, nil
}

// problems lists what breaks the invariants for one master entry.
func (s *snapshot) problems(fe Frontend, h masterHdr) []string {
	var out []string
	if rn, ok := s.revNats[h.revNat]; h.revNat == 0 || !ok || rn.Addr != fe.Addr || rn.Port != fe.Port {
		out = append(out, fmt.Sprintf("%s: rev-nat %d missing or wrong", fe, h.revNat))
	}
	for slot := uint16(1); slot <= h.count && slot != 0; slot++ {
		id, ok := s.slots[fe][slot]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("%s: slot %d missing", fe, slot))
		case s.slotRN[fe][slot] != h.revNat:
			out = append(out, fmt.Sprintf("%s: slot %d has rev-nat %d", fe, slot, s.slotRN[fe][slot]))
		default:
			if _, ok := s.backends[id]; !ok {
				out = append(out, fmt.Sprintf("%s: slot %d -> backend %d missing", fe, slot, id))
			}
			if !s.matches[bpf.AffMatchKey{BackendId: id, RevNatId: h.revNat}] {
				out = append(out, fmt.Sprintf("%s: affinity pair %d/%d missing", fe, id, h.revNat))
			}
		}
	}
	if h.flags&bpf.SvcFlagSrcRanges != 0 && len(s.ranges[h.revNat]) == 0 {
		out = append(out, fmt.Sprintf("%s: source ranges flagged but none in the map", fe))
	}
	if h.flags&bpf.SvcFlagMaglev != 0 && h.count > 0 {
		table, ok := s.maglev[h.revNat]
		if !ok {
			out = append(out, fmt.Sprintf("%s: Maglev table %d missing", fe, h.revNat))
		}
		for _, id := range distinct(table) {
			if _, ok := s.backends[id]; !ok {
				out = append(out, fmt.Sprintf("%s: Maglev table -> backend %d missing", fe, id))
			} else if !s.matches[bpf.AffMatchKey{BackendId: id, RevNatId: h.revNat}] {
				out = append(out, fmt.Sprintf("%s: Maglev table -> affinity pair %d/%d missing", fe, id, h.revNat))
			}
		}
	}
	return out
}

func (s *snapshot) verify() error {
	var errs []error
	for fe, h := range s.masters {
		for _, p := range s.problems(fe, h) {
			errs = append(errs, errors.New(p))
		}
	}
	return errors.Join(errs...)
}

// restore rebuilds the bookkeeping from the store and deletes what no lookup
// can reach (slots past a count, unused backends, rev-nat entries and pairs).
// A Service whose entries are incomplete is kept but marked dirty, so the
// next Upsert rewrites it whole.
func (t *Table) restore() error {
	snap, err := readStore(t.st)
	if err != nil {
		return err
	}
	t.svcs = map[Frontend]*svcState{}
	t.byBackend = map[Backend]uint32{}
	t.backends = map[uint32]Backend{}
	t.refs = map[uint32]int{}
	t.backendID = newIDAlloc(idLimit(t.cap.Backends))
	t.revNatID = newIDAlloc(idLimit(t.cap.RevNat))
	t.slots, t.pairs, t.ranges, t.tables = 0, 0, 0, 0

	usedRN := map[uint32]bool{}
	pairs := map[bpf.AffMatchKey]bool{}
	for fe, h := range snap.masters {
		_, hasTable := snap.maglev[h.revNat]
		st := &svcState{
			hdr: h, ids: make([]uint32, h.count), dirty: len(snap.problems(fe, h)) > 0,
			ranges: snap.ranges[h.revNat], maglev: hasTable,
		}
		for i := range st.ids {
			id := snap.slots[fe][uint16(i+1)]
			if _, ok := snap.backends[id]; ok {
				st.ids[i] = id
			}
		}
		for _, id := range distinct(st.ids) {
			t.refs[id]++
			pairs[bpf.AffMatchKey{BackendId: id, RevNatId: h.revNat}] = true
		}
		t.svcs[fe] = st
		t.slots += 1 + len(st.ids)
		t.pairs += len(distinct(st.ids))
		t.ranges += len(st.ranges)
		usedRN[h.revNat] = true
		t.revNatID.take(h.revNat)
	}

	var errs []error
	// A change interrupted between a Maglev table and its master leaves a
	// table naming backends the slots do not: rewrite it from the slots
	// before those backends are deleted below.
	for _, st := range t.svcs {
		if h := st.hdr; h.flags&bpf.SvcFlagMaglev != 0 && h.count > 0 {
			var ids []uint32
			var bes []Backend
			for _, id := range st.ids {
				if id != 0 {
					ids, bes = append(ids, id), append(bes, snap.backends[id])
				}
			}
			want := maglevIDs(bes, ids)
			if got, ok := snap.maglev[h.revNat]; ok && slices.Equal(got, want) {
				continue
			}
			if want == nil {
				errs = append(errs, t.st.delMaglev(h.revNat))
				st.maglev = false
			} else {
				errs = append(errs, t.st.putMaglev(h.revNat, maglevVal(want)))
				st.maglev = true
				st.dirty = st.dirty || len(ids) != len(st.ids)
			}
		}
	}
	for _, st := range t.svcs {
		t.tables += b2i(st.maglev)
	}
	for fe, slots := range snap.slots {
		h, ok := snap.masters[fe]
		for slot := range slots {
			if !ok || slot > h.count {
				errs = append(errs, t.st.delService(svcKey(fe, slot)))
			}
		}
	}
	for id, b := range snap.backends {
		if t.refs[id] == 0 {
			errs = append(errs, t.st.delBackend(id))
			continue
		}
		t.backends[id] = b
		t.backendID.take(id)
		if cur, ok := t.byBackend[b]; !ok || id < cur {
			t.byBackend[b] = id
		}
	}
	for id := range snap.revNats {
		if !usedRN[id] {
			errs = append(errs, t.st.delRevNat(id))
		}
	}
	for k := range snap.matches {
		if !pairs[k] {
			errs = append(errs, t.st.delMatch(k))
		}
	}
	for rn, ps := range snap.ranges {
		if !usedRN[rn] {
			for _, p := range ps {
				errs = append(errs, t.st.delRange(srcRangeKey(rn, p)))
			}
		}
	}
	for _, k := range snap.badRange {
		errs = append(errs, t.st.delRange(k))
	}
	for rn := range snap.maglev {
		if !usedRN[rn] {
			errs = append(errs, t.st.delMaglev(rn))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("lbmap: removing unreachable entries: %w", err)
	}
	return nil
}
