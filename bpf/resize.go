//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
)

// Resized is one pinned map [ResizePinned] replaced.
type Resized struct {
	Map      string
	From, To uint32 // max_entries
	Copied   int    // entries carried over
	Dropped  int    // entries that did not fit (LRU maps only; see ResizePinned)
}

// ResizePinned gives the maps pinned under pinDir (by an earlier [Load]) the
// sizes asked for, keeping their contents, so the next Load reuses them
// instead of failing with ErrMapIncompatible. Run it before Load.
//
// For each pinned map whose max_entries differs from the spec (with sizes
// applied), a new map is created, every entry copied, and the pin replaced.
// Programs still attached from the earlier run keep using the old map until
// Load replaces them (link update): both maps hold the same entries, so no
// connection sees a gap. A shrink that cannot hold the entries of a
// Service-defining map fails and changes nothing; LRU maps (affinity,
// conntrack, socket reverse NAT) keep what fits.
func ResizePinned(pinDir string, sizes MapSizes) ([]Resized, error) {
	dir := filepath.Join(pinDir, PinVersion, "maps")
	spec, err := Spec(sizes)
	if err != nil {
		return nil, err
	}
	if err := RemoveMemlock(); err != nil {
		return nil, err
	}
	type job struct {
		name string
		old  *ebpf.Map
		spec *ebpf.MapSpec
	}
	var jobs []job
	defer func() {
		for _, j := range jobs {
			j.old.Close()
		}
	}()
	for name, ms := range spec.Maps {
		pin := filepath.Join(dir, name)
		if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
			continue
		}
		old, err := ebpf.LoadPinnedMap(pin, nil)
		if err != nil {
			return nil, fmt.Errorf("bpf: open pinned map %s: %w", pin, err)
		}
		if old.MaxEntries() == ms.MaxEntries {
			old.Close()
			continue
		}
		if old.Type() != ms.Type || old.KeySize() != ms.KeySize || old.ValueSize() != ms.ValueSize {
			old.Close()
			return nil, fmt.Errorf("bpf: pinned map %s has another layout (type %s key %d value %d, want %s %d %d): "+
				"this build needs a new PinVersion", pin, old.Type(), old.KeySize(), old.ValueSize(), ms.Type, ms.KeySize, ms.ValueSize)
		}
		jobs = append(jobs, job{name, old, ms})
	}
	// Check every non-LRU map fits before touching anything.
	for _, j := range jobs {
		if isLRU(j.spec.Type) || j.spec.Type == ebpf.PerCPUArray {
			continue
		}
		n, err := CountEntries(j.old)
		if err != nil {
			return nil, fmt.Errorf("bpf: count %s: %w", j.name, err)
		}
		if n > int(j.spec.MaxEntries) {
			return nil, fmt.Errorf("bpf: map %s holds %d entries, more than the %d asked for: choose a larger size",
				j.name, n, j.spec.MaxEntries)
		}
	}
	var out []Resized
	for _, j := range jobs {
		r, err := replacePinned(filepath.Join(dir, j.name), j.old, j.spec)
		if err != nil {
			return out, fmt.Errorf("bpf: resize %s: %w", j.name, err)
		}
		r.Map = j.name
		out = append(out, r)
	}
	return out, nil
}

func isLRU(t ebpf.MapType) bool { return t == ebpf.LRUHash || t == ebpf.LRUCPUHash }

// CountEntries counts the entries of a (non per-CPU) map by iterating it
// with raw buffers: nothing is decoded.
func CountEntries(m *ebpf.Map) (int, error) {
	if m == nil {
		return 0, errors.New("bpf: no map")
	}
	if m.Type() == ebpf.PerCPUHash || m.Type() == ebpf.PerCPUArray || m.Type() == ebpf.LRUCPUHash {
		return 0, fmt.Errorf("bpf: CountEntries: per-CPU map %s not supported", m.Type())
	}
	var n int
	k := make([]byte, m.KeySize())
	v := make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	return n, it.Err()
}

// replacePinned copies old into a new map made from spec and swaps the pin.
func replacePinned(pin string, old *ebpf.Map, spec *ebpf.MapSpec) (Resized, error) {
	r := Resized{From: old.MaxEntries(), To: spec.MaxEntries}
	ms := spec.Copy()
	ms.Pinning = ebpf.PinNone
	nm, err := ebpf.NewMap(ms)
	if err != nil {
		return r, err
	}
	defer nm.Close()
	k := make([]byte, old.KeySize())
	var v []byte
	if spec.Type == ebpf.PerCPUArray {
		// Counters: per-CPU values go across as they are.
		var pv [][]byte
		it := old.Iterate()
		for it.Next(&k, &pv) {
			if err := nm.Put(k, pv); err != nil {
				return r, err
			}
			r.Copied++
		}
		if err := it.Err(); err != nil {
			return r, err
		}
	} else {
		v = make([]byte, old.ValueSize())
		it := old.Iterate()
		for it.Next(&k, &v) {
			if err := nm.Put(k, v); err != nil {
				if isLRU(spec.Type) {
					r.Dropped++
					continue
				}
				return r, err
			}
			r.Copied++
		}
		if err := it.Err(); err != nil {
			return r, err
		}
	}
	// bpffs has no atomic replace of a pin: unpin, then pin. Nothing reads
	// the pin in between (Load comes after), and attached programs hold the
	// old map by reference.
	if err := os.Remove(pin); err != nil {
		return r, err
	}
	if err := nm.Pin(pin); err != nil {
		return r, fmt.Errorf("pin %s: %w (the old map is unpinned; the next Load creates an empty one)", pin, err)
	}
	return r, nil
}
