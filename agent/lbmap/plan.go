package lbmap

import (
	"fmt"
	"net/netip"
	"slices"
)

// Planning is pure: from the current state of one Service and the wanted one
// it derives the ordered map writes. The order is the datapath's safety
// argument (make-before-break):
//
//  1. new backends          (nothing points at them yet)
//  2. new affinity pairs    (so an affinity entry for a new backend counts)
//  3. changed slots 1..n    (slots up to the old count now point at
//                            backends that exist, old or new)
//  4. rev-nat entry         (new Services: the reverse path before the forward)
//  5. new source ranges     (allowed before the master's flag says to look)
//  6. Maglev table          (replaced whole; it names backends that exist)
//  7. master with count n   (the switch: from here lookups see the new slots)
//  8. stale slots n+1..old  (unreachable since 7)
//  9. stale source ranges   (during 5..9 the union of old and new is allowed)
// 10. a Maglev table no longer wanted
// 11. stale affinity pairs
// 12. backends no Service uses any more (unreachable since 8 and 10)
//
// Deleting is the mirror image: master first (lookups miss, fail open), then
// what it made reachable.

type opKind uint8

const (
	opPutBackend opKind = iota
	opPutMatch
	opPutSlot
	opPutRevNat
	opPutRange
	opPutMaglev
	opPutMaster
	opDelMaster
	opDelSlot
	opDelRange
	opDelMaglev
	opDelRevNat
	opDelMatch
	opDelBackend
)

type op struct {
	kind    opKind
	fe      Frontend
	slot    uint16       // opPutSlot, opDelSlot
	id      uint32       // backend id: backend, slot and match ops
	revNat  uint32       // rev-nat id: slot, rev-nat, match and master ops
	backend Backend      // opPutBackend
	hdr     masterHdr    // opPutMaster
	prefix  netip.Prefix // opPutRange, opDelRange
	table   []uint32     // opPutMaglev
}

func (o op) String() string {
	switch o.kind {
	case opPutBackend:
		return fmt.Sprintf("put backend %d %s", o.id, o.backend)
	case opPutMatch:
		return fmt.Sprintf("put match %d/%d", o.id, o.revNat)
	case opPutSlot:
		return fmt.Sprintf("put slot %s#%d -> %d", o.fe, o.slot, o.id)
	case opPutRevNat:
		return fmt.Sprintf("put revnat %d %s", o.revNat, o.fe)
	case opPutRange:
		return fmt.Sprintf("put range %d %s", o.revNat, o.prefix)
	case opPutMaglev:
		return fmt.Sprintf("put maglev %d", o.revNat)
	case opPutMaster:
		return fmt.Sprintf("put master %s count=%d", o.fe, o.hdr.count)
	case opDelMaster:
		return fmt.Sprintf("del master %s", o.fe)
	case opDelSlot:
		return fmt.Sprintf("del slot %s#%d", o.fe, o.slot)
	case opDelRange:
		return fmt.Sprintf("del range %d %s", o.revNat, o.prefix)
	case opDelMaglev:
		return fmt.Sprintf("del maglev %d", o.revNat)
	case opDelRevNat:
		return fmt.Sprintf("del revnat %d", o.revNat)
	case opDelMatch:
		return fmt.Sprintf("del match %d/%d", o.id, o.revNat)
	case opDelBackend:
		return fmt.Sprintf("del backend %d", o.id)
	}
	return "?"
}

// svcState is what the maps hold for one Service.
type svcState struct {
	hdr masterHdr
	ids []uint32 // slot i+1 -> backend id; 0 where a restored slot was missing
	// ranges are the source ranges in kpf_src_ranges under hdr.revNat.
	ranges []netip.Prefix
	// maglev: kpf_maglev holds the table for ids under hdr.revNat.
	maglev bool
	// dirty: restored from maps that were not consistent; the next Upsert
	// rewrites every entry.
	dirty bool
}

type idBackend struct {
	id uint32
	b  Backend
}

// distinct returns the ids in first-seen order without repeats or zeros.
func distinct(ids []uint32) []uint32 {
	seen := make(map[uint32]bool, len(ids))
	out := make([]uint32, 0, len(ids))
	for _, id := range ids {
		if id != 0 && !seen[id] {
			seen[id] = true
			out = append(out, id)
		}
	}
	return out
}

func idSet(ids []uint32) map[uint32]bool {
	s := make(map[uint32]bool, len(ids))
	for _, id := range ids {
		s[id] = true
	}
	return s
}

// planUpsert plans the move of fe from old (nil: new Service) to want.
// fresh are the backends allocated for this change, orphans the backend ids no
// Service uses once it is done, table the Maglev table to hold when
// want.maglev.
func planUpsert(fe Frontend, old *svcState, want svcState, fresh []idBackend, orphans []uint32, table []uint32) []op {
	full := old == nil || old.dirty
	var oldIDs []uint32
	var oldRanges []netip.Prefix
	oldMaglev := false
	if old != nil {
		oldIDs, oldRanges, oldMaglev = old.ids, old.ranges, old.maglev
	}
	rn := want.hdr.revNat
	var ops []op
	for _, f := range fresh {
		ops = append(ops, op{kind: opPutBackend, id: f.id, backend: f.b})
	}
	had := idSet(oldIDs)
	for _, id := range distinct(want.ids) {
		if full || !had[id] {
			ops = append(ops, op{kind: opPutMatch, id: id, revNat: rn})
		}
	}
	for i, id := range want.ids {
		if full || i >= len(oldIDs) || oldIDs[i] != id {
			ops = append(ops, op{kind: opPutSlot, fe: fe, slot: uint16(i + 1), id: id, revNat: rn})
		}
	}
	if full {
		ops = append(ops, op{kind: opPutRevNat, fe: fe, revNat: rn})
	}
	for _, p := range want.ranges {
		if full || !slices.Contains(oldRanges, p) {
			ops = append(ops, op{kind: opPutRange, revNat: rn, prefix: p})
		}
	}
	if want.maglev && (full || !oldMaglev || !slices.Equal(oldIDs, want.ids)) {
		ops = append(ops, op{kind: opPutMaglev, revNat: rn, table: table})
	}
	if full || old.hdr != want.hdr {
		ops = append(ops, op{kind: opPutMaster, fe: fe, revNat: rn, hdr: want.hdr})
	}
	for s := len(want.ids) + 1; s <= len(oldIDs); s++ {
		ops = append(ops, op{kind: opDelSlot, fe: fe, slot: uint16(s)})
	}
	for _, p := range oldRanges {
		if !slices.Contains(want.ranges, p) {
			ops = append(ops, op{kind: opDelRange, revNat: rn, prefix: p})
		}
	}
	if oldMaglev && !want.maglev {
		ops = append(ops, op{kind: opDelMaglev, revNat: rn})
	}
	keep := idSet(want.ids)
	for _, id := range distinct(oldIDs) {
		if !keep[id] {
			ops = append(ops, op{kind: opDelMatch, id: id, revNat: rn})
		}
	}
	for _, id := range orphans {
		ops = append(ops, op{kind: opDelBackend, id: id})
	}
	return ops
}

// planDelete plans the removal of fe.
func planDelete(fe Frontend, old svcState, orphans []uint32) []op {
	rn := old.hdr.revNat
	ops := []op{{kind: opDelMaster, fe: fe}}
	for s := 1; s <= len(old.ids); s++ {
		ops = append(ops, op{kind: opDelSlot, fe: fe, slot: uint16(s)})
	}
	for _, p := range old.ranges {
		ops = append(ops, op{kind: opDelRange, revNat: rn, prefix: p})
	}
	if old.maglev {
		ops = append(ops, op{kind: opDelMaglev, revNat: rn})
	}
	ops = append(ops, op{kind: opDelRevNat, revNat: rn})
	for _, id := range distinct(old.ids) {
		ops = append(ops, op{kind: opDelMatch, id: id, revNat: rn})
	}
	for _, id := range orphans {
		ops = append(ops, op{kind: opDelBackend, id: id})
	}
	return ops
}
