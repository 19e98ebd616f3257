//go:build linux

package lbmap

import (
	"errors"
	"math/rand/v2"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kpfree/kpfree/bpf"
)

func bpfMaps(t *testing.T, sizes bpf.MapSizes) bpf.MapSet {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root to create BPF maps")
	}
	m, err := bpf.NewMaps(sizes)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// kernelContent reads the kernel maps into a memStore for comparison.
func kernelContent(t *testing.T, m bpf.MapSet) *memStore {
	t.Helper()
	got := newMemStore(Capacity{})
	st := &bpfStore{m: m}
	err := errors.Join(
		st.services(func(k bpf.SvcKey, v bpf.SvcVal) { got.svc[k] = v }),
		st.backends(func(id uint32, v bpf.BackendVal) { got.backend[id] = v }),
		st.revNats(func(id uint32, v bpf.RevNatVal) { got.revNat[id] = v }),
		st.matches(func(k bpf.AffMatchKey) { got.match[k] = true }),
	)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// The BPF implementation and the Fake write byte-identical entries for the
// same history, and the kernel maps restore into an equal Table.
func TestIntegrationBPFMatchesFake(t *testing.T) {
	m := bpfMaps(t, bpf.MapSizes{})
	real, err := New(m)
	if err != nil {
		t.Fatal(err)
	}
	fake := NewFake(Capacity{})
	rng := rand.New(rand.NewPCG(3, 4))
	fes := []Frontend{fe4("10.96.0.1", 80, TCP), fe4("10.96.0.1", 53, UDP), fe4("fd00::1", 80, TCP), fe4("fd00::2", 443, TCP)}
	for step := range 200 {
		fe := fes[rng.IntN(len(fes))]
		s := Service{Frontend: fe}
		for range rng.IntN(4) {
			if fe.Addr.Is4() {
				s.Backends = append(s.Backends, be("10.0.0."+strconv.Itoa(1+rng.IntN(4)), 8080))
			} else {
				s.Backends = append(s.Backends, be("fd00:1::"+strconv.Itoa(1+rng.IntN(4)), 8080))
			}
		}
		if rng.IntN(3) == 0 {
			s.Affinity = time.Minute
		}
		var e1, e2 error
		if rng.IntN(5) == 0 {
			e1, e2 = real.Delete(fe), fake.Delete(fe)
		} else {
			e1, e2 = real.Upsert(s), fake.Upsert(s)
		}
		if e1 != nil || e2 != nil {
			t.Fatalf("step %d: %v / %v", step, e1, e2)
		}
		d1, d2 := mustDump(t, real), mustDump(t, fake)
		if d := cmp.Diff(d2, d1, addrCmp); d != "" {
			t.Fatalf("step %d: dumps differ (-fake +bpf):\n%s", step, d)
		}
	}
	k := kernelContent(t, m)
	for name, d := range map[string]string{
		"services": cmp.Diff(fake.mem.svc, k.svc),
		"backends": cmp.Diff(fake.mem.backend, k.backend),
		"revnat":   cmp.Diff(fake.mem.revNat, k.revNat),
		"match":    cmp.Diff(fake.mem.match, k.match),
	} {
		if d != "" {
			t.Errorf("%s map differs (-fake +kernel):\n%s", name, d)
		}
	}
	if err := real.Verify(); err != nil {
		t.Fatal(err)
	}

	// Restart: a new Table over the same maps sees the same Services and
	// writes nothing for an unchanged Sync.
	restored, err := New(m)
	if err != nil {
		t.Fatal(err)
	}
	want := mustDump(t, real)
	if d := cmp.Diff(want, mustDump(t, restored), addrCmp); d != "" {
		t.Fatalf("restored dump differs:\n%s", d)
	}
	before := kernelContent(t, m)
	if err := restored.Sync(withoutIDs(want)); err != nil {
		t.Fatal(err)
	}
	after := kernelContent(t, m)
	if !cmp.Equal(before.svc, after.svc) || !cmp.Equal(before.backend, after.backend) {
		t.Fatal("unchanged Sync after restore rewrote entries")
	}
}

func TestIntegrationBPFMapFull(t *testing.T) {
	m := bpfMaps(t, bpf.MapSizes{Services: 4, Backends: 2, RevNat: 2, AffinityMatch: 4})
	tbl, err := New(m)
	if err != nil {
		t.Fatal(err)
	}
	if tbl.cap != (Capacity{Services: 4, Backends: 2, RevNat: 2, AffinityMatch: 4}) {
		t.Fatalf("capacity from MaxEntries: %+v", tbl.cap)
	}
	if err := tbl.Upsert(Service{Frontend: fe4("10.96.0.1", 80, TCP), Backends: []Backend{be("10.0.0.1", 80), be("10.0.0.2", 80)}}); err != nil {
		t.Fatal(err)
	}
	err = tbl.Upsert(Service{Frontend: fe4("10.96.0.2", 80, TCP), Backends: []Backend{be("10.0.0.3", 80)}})
	if !errors.Is(err, ErrMapFull) {
		t.Fatalf("got %v, want ErrMapFull", err)
	}
	// The kernel's own "full" (E2BIG), bypassing the pre-check.
	st := &bpfStore{m: m}
	err = st.putBackend(99, backendVal(be("10.0.0.9", 80)))
	var mf *MapFullError
	if !errors.As(err, &mf) || !errors.Is(err, ErrMapFull) || !errors.Is(err, syscall.E2BIG) || mf.Map != bpf.MapBackends {
		t.Fatalf("kernel E2BIG: %v", err)
	}
	if err := tbl.Verify(); err != nil {
		t.Fatal(err)
	}
}
