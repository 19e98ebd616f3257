package lbmap

import (
	"sync"
	"syscall"

	"github.com/kpfree/kpfree/bpf"
)

// Fake is the real Table logic over in-memory maps that behave like the
// kernel's (fixed size, E2BIG when full), for unit tests of the layers above.
// It can fail writes on demand.
type Fake struct {
	*Table
	mem *memStore
}

var _ Maps = (*Fake)(nil)

// NewFake returns an empty Fake with maps of the given sizes (zero fields:
// DefaultCapacity).
func NewFake(c Capacity) *Fake {
	d := DefaultCapacity
	if c.Services == 0 {
		c.Services = d.Services
	}
	if c.Backends == 0 {
		c.Backends = d.Backends
	}
	if c.RevNat == 0 {
		c.RevNat = d.RevNat
	}
	if c.AffinityMatch == 0 {
		c.AffinityMatch = d.AffinityMatch
	}
	if c.SrcRanges == 0 {
		c.SrcRanges = d.SrcRanges
	}
	if c.Maglev == 0 {
		c.Maglev = d.Maglev
	}
	mem := newMemStore(c)
	t, err := newTable(mem, c)
	if err != nil {
		panic("lbmap: empty fake cannot fail to restore: " + err.Error())
	}
	return &Fake{Table: t, mem: mem}
}

// FailWrite makes the n-th map write from now (0: the next one) fail with err.
func (f *Fake) FailWrite(n int, err error) {
	f.mem.mu.Lock()
	defer f.mem.mu.Unlock()
	f.mem.failIn, f.mem.failErr = n, err
}

// Writes counts the map writes (puts and deletes) done so far.
func (f *Fake) Writes() int {
	f.mem.mu.Lock()
	defer f.mem.mu.Unlock()
	return f.mem.writes
}

// memStore mirrors the BPF maps in memory, keyed by the same raw structs, so
// the byte-order code runs in unit tests too.
type memStore struct {
	mu        sync.Mutex
	cap       Capacity
	svc       map[bpf.SvcKey]bpf.SvcVal
	backend   map[uint32]bpf.BackendVal
	revNat    map[uint32]bpf.RevNatVal
	match     map[bpf.AffMatchKey]bool
	srcRanges map[bpf.SrcRangeKey]bool
	tables    map[uint32]bpf.MaglevVal
	writes    int
	failIn    int // -1: none
	failErr   error
	afterOne  func() // test hook, called after each successful write
}

func newMemStore(c Capacity) *memStore {
	return &memStore{
		cap:       c,
		svc:       map[bpf.SvcKey]bpf.SvcVal{},
		backend:   map[uint32]bpf.BackendVal{},
		revNat:    map[uint32]bpf.RevNatVal{},
		match:     map[bpf.AffMatchKey]bool{},
		srcRanges: map[bpf.SrcRangeKey]bool{},
		tables:    map[uint32]bpf.MaglevVal{},
		failIn:    -1,
	}
}

// write runs one mutation with fault injection and the test hook.
func (m *memStore) write(fn func() error) error {
	m.mu.Lock()
	if m.failIn == 0 {
		m.failIn = -1
		err := m.failErr
		m.mu.Unlock()
		return err
	}
	if m.failIn > 0 {
		m.failIn--
	}
	m.writes++
	err := fn()
	hook := m.afterOne
	m.mu.Unlock()
	if err == nil && hook != nil {
		hook()
	}
	return err
}

func memPut[K comparable, V any](m map[K]V, name string, size int, k K, v V) error {
	if _, ok := m[k]; !ok && len(m) >= size {
		return &MapFullError{Map: name, Err: syscall.E2BIG}
	}
	m[k] = v
	return nil
}

func (m *memStore) putService(k bpf.SvcKey, v bpf.SvcVal) error {
	return m.write(func() error { return memPut(m.svc, bpf.MapServices, m.cap.Services, k, v) })
}
func (m *memStore) delService(k bpf.SvcKey) error {
	return m.write(func() error { delete(m.svc, k); return nil })
}
func (m *memStore) putBackend(id uint32, v bpf.BackendVal) error {
	return m.write(func() error { return memPut(m.backend, bpf.MapBackends, m.cap.Backends, id, v) })
}
func (m *memStore) delBackend(id uint32) error {
	return m.write(func() error { delete(m.backend, id); return nil })
}
func (m *memStore) putRevNat(id uint32, v bpf.RevNatVal) error {
	return m.write(func() error { return memPut(m.revNat, bpf.MapRevNat, m.cap.RevNat, id, v) })
}
func (m *memStore) delRevNat(id uint32) error {
	return m.write(func() error { delete(m.revNat, id); return nil })
}
func (m *memStore) putMatch(k bpf.AffMatchKey) error {
	return m.write(func() error { return memPut(m.match, bpf.MapAffMatch, m.cap.AffinityMatch, k, true) })
}
func (m *memStore) delMatch(k bpf.AffMatchKey) error {
	return m.write(func() error { delete(m.match, k); return nil })
}

func (m *memStore) putRange(k bpf.SrcRangeKey) error {
	return m.write(func() error { return memPut(m.srcRanges, bpf.MapSrcRanges, m.cap.SrcRanges, k, true) })
}
func (m *memStore) delRange(k bpf.SrcRangeKey) error {
	return m.write(func() error { delete(m.srcRanges, k); return nil })
}
func (m *memStore) putMaglev(revNat uint32, v *bpf.MaglevVal) error {
	return m.write(func() error { return memPut(m.tables, bpf.MapMaglev, m.cap.Maglev, revNat, *v) })
}
func (m *memStore) delMaglev(revNat uint32) error {
	return m.write(func() error { delete(m.tables, revNat); return nil })
}

func (m *memStore) services(fn func(bpf.SvcKey, bpf.SvcVal)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, v := range m.svc {
		fn(k, v)
	}
	return nil
}
func (m *memStore) backends(fn func(uint32, bpf.BackendVal)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, v := range m.backend {
		fn(k, v)
	}
	return nil
}
func (m *memStore) revNats(fn func(uint32, bpf.RevNatVal)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, v := range m.revNat {
		fn(k, v)
	}
	return nil
}
func (m *memStore) matches(fn func(bpf.AffMatchKey)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k := range m.match {
		fn(k)
	}
	return nil
}
func (m *memStore) ranges(fn func(bpf.SrcRangeKey)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k := range m.srcRanges {
		fn(k)
	}
	return nil
}
func (m *memStore) maglevs(fn func(uint32, *bpf.MaglevVal)) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for k, v := range m.tables {
		fn(k, &v)
	}
	return nil
}
