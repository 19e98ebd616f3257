package lbmap

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/cilium/ebpf"

	"github.com/kpfree/kpfree/bpf"
)

// New returns the Maps over a loaded datapath's maps. It restores its
// bookkeeping (ids, reference counts) from what the maps hold, so an agent
// restarted against pinned maps carries on without rewriting anything, and it
// removes entries no lookup can reach.
func New(m bpf.MapSet) (*Table, error) {
	for name, mp := range map[string]*ebpf.Map{
		bpf.MapServices: m.Services, bpf.MapBackends: m.Backends,
		bpf.MapRevNat: m.RevNat, bpf.MapAffMatch: m.AffinityMatch,
		bpf.MapSrcRanges: m.SrcRanges, bpf.MapMaglev: m.Maglev,
	} {
		if mp == nil {
			return nil, fmt.Errorf("lbmap: map %s missing", name)
		}
	}
	c := Capacity{
		Services:      int(m.Services.MaxEntries()),
		Backends:      int(m.Backends.MaxEntries()),
		RevNat:        int(m.RevNat.MaxEntries()),
		AffinityMatch: int(m.AffinityMatch.MaxEntries()),
		SrcRanges:     int(m.SrcRanges.MaxEntries()),
		Maglev:        int(m.Maglev.MaxEntries()),
	}
	return newTable(&bpfStore{m: m}, c)
}

type bpfStore struct{ m bpf.MapSet }

// mapErr turns the kernel's "hash map full" (E2BIG) into a MapFullError.
func mapErr(name string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, syscall.E2BIG) {
		return &MapFullError{Map: name, Err: err}
	}
	return fmt.Errorf("map %s: %w", name, err)
}

func put(m *ebpf.Map, name string, k, v any) error {
	return mapErr(name, m.Update(k, v, ebpf.UpdateAny))
}

func del(m *ebpf.Map, name string, k any) error {
	err := m.Delete(k)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return mapErr(name, err)
}

func (s *bpfStore) putService(k bpf.SvcKey, v bpf.SvcVal) error {
	return put(s.m.Services, bpf.MapServices, &k, &v)
}
func (s *bpfStore) delService(k bpf.SvcKey) error { return del(s.m.Services, bpf.MapServices, &k) }
func (s *bpfStore) putBackend(id uint32, v bpf.BackendVal) error {
	return put(s.m.Backends, bpf.MapBackends, &id, &v)
}
func (s *bpfStore) delBackend(id uint32) error { return del(s.m.Backends, bpf.MapBackends, &id) }
func (s *bpfStore) putRevNat(id uint32, v bpf.RevNatVal) error {
	return put(s.m.RevNat, bpf.MapRevNat, &id, &v)
}
func (s *bpfStore) delRevNat(id uint32) error { return del(s.m.RevNat, bpf.MapRevNat, &id) }
func (s *bpfStore) putMatch(k bpf.AffMatchKey) error {
	var one uint32 = 1
	return put(s.m.AffinityMatch, bpf.MapAffMatch, &k, &one)
}
func (s *bpfStore) delMatch(k bpf.AffMatchKey) error {
	return del(s.m.AffinityMatch, bpf.MapAffMatch, &k)
}

func (s *bpfStore) putRange(k bpf.SrcRangeKey) error {
	var one uint8 = 1
	return put(s.m.SrcRanges, bpf.MapSrcRanges, &k, &one)
}
func (s *bpfStore) delRange(k bpf.SrcRangeKey) error { return del(s.m.SrcRanges, bpf.MapSrcRanges, &k) }
func (s *bpfStore) putMaglev(revNat uint32, v *bpf.MaglevVal) error {
	return put(s.m.Maglev, bpf.MapMaglev, &revNat, v)
}
func (s *bpfStore) delMaglev(revNat uint32) error { return del(s.m.Maglev, bpf.MapMaglev, &revNat) }

// iterate calls fn for every entry. It reads the map in batches
// (BPF_MAP_LOOKUP_BATCH, Linux 5.6+: a few syscalls for the whole map
// instead of two per entry, which is most of a restart at 50,000 Services)
// and falls back to entry-by-entry iteration where batches fail. fn runs only
// once the whole map was read, so a fallback never repeats an entry.
func iterate[K, V any](m *ebpf.Map, fn func(K, V)) error {
	if ks, vs, err := readBatches[K, V](m); err == nil {
		for i := range ks {
			fn(ks[i], vs[i])
		}
		return nil
	}
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		fn(k, v)
	}
	return it.Err()
}

func readBatches[K, V any](m *ebpf.Map) ([]K, []V, error) {
	chunk := 4096
	if vs := int(m.ValueSize()); vs > 256 {
		chunk = max(64, (1<<20)/vs) // at most ~1 MiB of values per batch
	}
	kb, vb := make([]K, chunk), make([]V, chunk)
	var keys []K
	var vals []V
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, kb, vb, nil)
		keys, vals = append(keys, kb[:n]...), append(vals, vb[:n]...)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return keys, vals, nil
		}
		if err != nil {
			return nil, nil, err
		}
	}
}

func (s *bpfStore) services(fn func(bpf.SvcKey, bpf.SvcVal)) error {
	return iterate(s.m.Services, fn)
}
func (s *bpfStore) backends(fn func(uint32, bpf.BackendVal)) error {
	return iterate(s.m.Backends, fn)
}
func (s *bpfStore) revNats(fn func(uint32, bpf.RevNatVal)) error {
	return iterate(s.m.RevNat, fn)
}
func (s *bpfStore) matches(fn func(bpf.AffMatchKey)) error {
	return iterate(s.m.AffinityMatch, func(k bpf.AffMatchKey, _ uint32) { fn(k) })
}
func (s *bpfStore) ranges(fn func(bpf.SrcRangeKey)) error {
	return iterate(s.m.SrcRanges, func(k bpf.SrcRangeKey, _ uint8) { fn(k) })
}
func (s *bpfStore) maglevs(fn func(uint32, *bpf.MaglevVal)) error {
	return iterate(s.m.Maglev, func(rn uint32, v bpf.MaglevVal) { fn(rn, &v) })
}
