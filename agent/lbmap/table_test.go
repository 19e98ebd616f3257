package lbmap

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kpfree/kpfree/bpf"
)

func fe4(s string, port uint16, p Proto) Frontend {
	return Frontend{Addr: netip.MustParseAddr(s), Port: port, Proto: p}
}

func be(s string, port uint16) Backend { return Backend{Addr: netip.MustParseAddr(s), Port: port} }

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

var addrCmp = cmp.Options{
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
}

func mustDump(t *testing.T, m Maps) []Service {
	t.Helper()
	svcs, err := m.Dump()
	if err != nil {
		t.Fatal(err)
	}
	return svcs
}

// withoutIDs clears RevNatID for comparisons with desired state.
func withoutIDs(svcs []Service) []Service {
	out := make([]Service, len(svcs))
	for i, s := range svcs {
		s.RevNatID = 0
		out[i] = s
	}
	return out
}

func TestFakeUpsertDumpFormat(t *testing.T) {
	f := NewFake(Capacity{})
	svcs := []Service{
		{Frontend: fe4("10.96.0.10", 80, TCP), Backends: []Backend{be("10.244.1.5", 8080), be("10.244.2.7", 8080)}},
		{Frontend: fe4("10.96.0.10", 53, UDP), Backends: []Backend{be("10.244.1.9", 53)}, Affinity: 3 * time.Hour},
		{Frontend: fe4("fd00::10", 80, TCP)},
		{Frontend: fe4("10.96.0.10", 53, TCP), Backends: []Backend{be("10.244.1.9", 53)}},
	}
	for _, s := range svcs {
		if err := f.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
	got := Format(mustDump(t, f))
	want := `SVC 10.96.0.10:53/TCP -> 10.244.1.9:53
SVC 10.96.0.10:53/UDP affinity=10800s -> 10.244.1.9:53
SVC 10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.2.7:8080
SVC [fd00::10]:80/TCP -> none (refused)
`
	if got != want {
		t.Fatalf("dump:\n%s\nwant:\n%s", got, want)
	}
	// 10.244.1.9:53 is one backend entry shared by two Services.
	if n := len(f.mem.backend); n != 3 {
		t.Fatalf("%d backend entries, want 3", n)
	}
	if err := f.Verify(); err != nil {
		t.Fatal(err)
	}
}

func TestFakeIdempotentAndDelete(t *testing.T) {
	f := NewFake(Capacity{})
	s := Service{Frontend: fe4("10.96.0.1", 443, TCP), Backends: []Backend{be("192.168.0.1", 6443)}}
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	w := f.Writes()
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	if f.Writes() != w {
		t.Fatalf("unchanged upsert wrote %d entries", f.Writes()-w)
	}
	// A v4-mapped spelling is the same Service.
	mapped := s
	mapped.Frontend.Addr = netip.MustParseAddr("::ffff:10.96.0.1")
	if err := f.Upsert(mapped); err != nil || f.Writes() != w {
		t.Fatalf("v4-mapped upsert: err %v, %d writes", err, f.Writes()-w)
	}
	if err := f.Delete(s.Frontend); err != nil {
		t.Fatal(err)
	}
	if err := f.Delete(s.Frontend); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	if got := mustDump(t, f); len(got) != 0 {
		t.Fatalf("after delete: %v", got)
	}
	m := f.mem
	if len(m.svc)+len(m.backend)+len(m.revNat)+len(m.match) != 0 {
		t.Fatalf("entries left: %d svc, %d backend, %d revnat, %d match", len(m.svc), len(m.backend), len(m.revNat), len(m.match))
	}
}

func TestFakeSync(t *testing.T) {
	f := NewFake(Capacity{})
	a := Service{Frontend: fe4("10.96.0.1", 80, TCP), Backends: []Backend{be("10.0.0.1", 80)}}
	b := Service{Frontend: fe4("10.96.0.2", 80, TCP), Backends: []Backend{be("10.0.0.2", 80)}}
	c := Service{Frontend: fe4("10.96.0.3", 80, TCP), Backends: []Backend{be("10.0.0.1", 80), be("10.0.0.3", 80)}}
	if err := f.Sync([]Service{a, b}); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync([]Service{c, a}); err != nil {
		t.Fatal(err)
	}
	want := []Service{a, c}
	if d := cmp.Diff(want, withoutIDs(mustDump(t, f)), addrCmp); d != "" {
		t.Fatalf("dump (-want +got):\n%s", d)
	}
	if _, ok := f.byBackend[be("10.0.0.2", 80)]; ok {
		t.Fatal("backend of the deleted Service still allocated")
	}
	if err := f.Sync([]Service{a, a}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("duplicate frontend: %v", err)
	}
}

func TestValidation(t *testing.T) {
	f := NewFake(Capacity{})
	for name, s := range map[string]Service{
		"no address":    {Frontend: Frontend{Port: 80, Proto: TCP}},
		"port 0":        {Frontend: fe4("10.96.0.1", 0, TCP)},
		"sctp":          {Frontend: fe4("10.96.0.1", 80, 132)},
		"mixed family":  {Frontend: fe4("10.96.0.1", 80, TCP), Backends: []Backend{be("fd00::1", 80)}},
		"backend port":  {Frontend: fe4("10.96.0.1", 80, TCP), Backends: []Backend{be("10.0.0.1", 0)}},
		"neg. affinity": {Frontend: fe4("10.96.0.1", 80, TCP), Affinity: -time.Second},
	} {
		if err := f.Upsert(s); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: got %v, want ErrInvalid", name, err)
		}
	}
	if f.Writes() != 0 {
		t.Fatalf("invalid services wrote %d entries", f.Writes())
	}
	// Affinity rounds up to whole seconds.
	if err := f.Upsert(Service{Frontend: fe4("10.96.0.1", 80, TCP), Affinity: 1500 * time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	if got := mustDump(t, f)[0].Affinity; got != 2*time.Second {
		t.Fatalf("affinity %v, want 2s", got)
	}
}

func TestMapFull(t *testing.T) {
	f := NewFake(Capacity{Services: 4, Backends: 2, RevNat: 2, AffinityMatch: 8})
	ok := Service{Frontend: fe4("10.96.0.1", 80, TCP), Backends: []Backend{be("10.0.0.1", 80), be("10.0.0.2", 80)}}
	if err := f.Upsert(ok); err != nil {
		t.Fatal(err)
	}
	before := Format(mustDump(t, f))
	w := f.Writes()
	for name, s := range map[string]Service{
		"services map": {Frontend: fe4("10.96.0.2", 80, TCP), Backends: []Backend{be("10.0.0.1", 80), be("10.0.0.2", 80)}},
		"backends map": {Frontend: fe4("10.96.0.1", 80, TCP), Backends: []Backend{be("10.0.0.3", 80)}},
	} {
		err := f.Upsert(s)
		var mf *MapFullError
		if !errors.Is(err, ErrMapFull) || !errors.As(err, &mf) {
			t.Fatalf("%s: got %v, want ErrMapFull", name, err)
		}
		if !strings.Contains(err.Error(), "kpf_") {
			t.Errorf("%s: error does not name the map: %v", name, err)
		}
	}
	if f.Writes() != w || Format(mustDump(t, f)) != before {
		t.Fatal("a refused change wrote entries")
	}
	// A kernel-side E2BIG surfaces as ErrMapFull too, and the table recovers.
	f.FailWrite(1, &MapFullError{Map: bpf.MapServices})
	err := f.Upsert(Service{Frontend: fe4("10.96.0.1", 80, TCP), Backends: []Backend{be("10.0.0.2", 80), be("10.0.0.1", 80)}})
	if !errors.Is(err, ErrMapFull) {
		t.Fatalf("injected E2BIG: %v", err)
	}
	if err := f.Verify(); err != nil {
		t.Fatal(err)
	}
}

func TestRestoreFromMaps(t *testing.T) {
	f := NewFake(Capacity{})
	svcs := []Service{
		{Frontend: fe4("10.96.0.1", 80, TCP), Backends: []Backend{be("10.0.0.1", 80), be("10.0.0.2", 80)}, Affinity: time.Minute},
		{Frontend: fe4("fd00::1", 53, UDP), Backends: []Backend{be("fd00:1::1", 53)}},
	}
	if err := f.Sync(svcs); err != nil {
		t.Fatal(err)
	}
	// Garbage a crashed agent could leave: a slot past the count, an unused
	// backend, an unused rev-nat entry, a stale pair.
	m := f.mem
	m.svc[svcKey(svcs[0].Frontend, 9)] = slotVal(1, 1)
	m.backend[77] = backendVal(be("10.9.9.9", 1))
	m.revNat[55] = revNatVal(fe4("10.96.9.9", 1, TCP))
	m.match[bpf.AffMatchKey{BackendId: 77, RevNatId: 1}] = true

	t2, err := newTable(m, DefaultCapacity)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(mustDump(t, f), mustDump(t, t2), addrCmp); d != "" {
		t.Fatalf("restored dump differs:\n%s", d)
	}
	if len(m.svc) != 5 || len(m.backend) != 3 || len(m.revNat) != 2 || len(m.match) != 3 {
		t.Fatalf("garbage left: %d svc, %d backend, %d revnat, %d match", len(m.svc), len(m.backend), len(m.revNat), len(m.match))
	}
	w := m.writes
	if err := t2.Sync(svcs); err != nil {
		t.Fatal(err)
	}
	if m.writes != w {
		t.Fatalf("sync of the restored state wrote %d entries", m.writes-w)
	}
	// New backends get fresh ids after the restored ones.
	if err := t2.Upsert(Service{Frontend: fe4("10.96.0.2", 80, TCP), Backends: []Backend{be("10.0.0.5", 80)}}); err != nil {
		t.Fatal(err)
	}
	if err := t2.Verify(); err != nil {
		t.Fatal(err)
	}

	// A Service whose slot went missing is repaired by the next Upsert.
	delete(m.svc, svcKey(svcs[0].Frontend, 2))
	t3, err := newTable(m, DefaultCapacity)
	if err != nil {
		t.Fatal(err)
	}
	if t3.Verify() == nil {
		t.Fatal("missing slot not detected")
	}
	if err := t3.Upsert(svcs[0]); err != nil {
		t.Fatal(err)
	}
	if err := t3.Verify(); err != nil {
		t.Fatal(err)
	}
}

// TestMakeBeforeBreak runs random changes and checks the datapath invariants
// after every single map write, and again with a write failing at every
// position: the maps must stay consistent, the bookkeeping must match them,
// and the next attempt must converge.
func TestMakeBeforeBreak(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	ext := func(f Frontend) Frontend { f.Scope = ScopeExternal; return f }
	fes := []Frontend{fe4("10.96.0.1", 80, TCP), fe4("10.96.0.1", 80, UDP), fe4("10.96.0.2", 443, TCP), fe4("fd00::1", 80, TCP),
		ext(fe4("10.96.0.2", 443, TCP)), ext(fe4("fd00::1", 80, TCP))}
	local := func(b Backend) Backend { b.Local = true; return b }
	pool := func(fe Frontend) []Backend {
		if fe.Addr.Is4() {
			return []Backend{be("10.0.0.1", 80), be("10.0.0.2", 80), be("10.0.0.3", 80), be("10.0.0.4", 8080), local(be("10.0.0.5", 80))}
		}
		return []Backend{be("fd00:1::1", 80), local(be("fd00:1::2", 80)), be("fd00:1::3", 80)}
	}
	ranges := func(fe Frontend) []netip.Prefix {
		if fe.Addr.Is4() {
			return []netip.Prefix{pfx("10.0.0.0/8"), pfx("192.168.0.0/16"), pfx("203.0.113.7/32"), pfx("0.0.0.0/0")}
		}
		return []netip.Prefix{pfx("fd00::/8"), pfx("2001:db8::/32")}
	}
	randomService := func() Service {
		fe := fes[rng.IntN(len(fes))]
		p := pool(fe)
		s := Service{Frontend: fe}
		for range rng.IntN(5) {
			s.Backends = append(s.Backends, p[rng.IntN(len(p))])
		}
		if rng.IntN(3) == 0 {
			s.Affinity = time.Duration(1+rng.IntN(100)) * time.Second
		}
		if fe.Scope == ScopeExternal || rng.IntN(2) == 0 {
			s.External = true
			s.LocalOnly = rng.IntN(2) == 0
			s.Maglev = rng.IntN(2) == 0
			for _, r := range ranges(fe) {
				if rng.IntN(3) == 0 {
					s.SourceRanges = append(s.SourceRanges, r)
				}
			}
		}
		return s
	}

	f := NewFake(Capacity{})
	var violations []string
	f.mem.afterOne = func() {
		snap, err := readStore(f.mem)
		if err != nil {
			violations = append(violations, err.Error())
			return
		}
		if err := snap.verify(); err != nil {
			violations = append(violations, err.Error())
		}
	}
	desired := map[Frontend]Service{}
	failed := 0
	defer func() {
		if failed < 20 {
			t.Errorf("only %d injected failures hit a write", failed)
		}
	}()
	for step := range 400 {
		s := randomService()
		var err error
		if rng.IntN(5) == 0 {
			err = f.Delete(s.Frontend)
			delete(desired, s.Frontend)
		} else {
			failAt := -1
			if rng.IntN(4) == 0 {
				failAt = rng.IntN(12)
				f.FailWrite(failAt, errors.New("injected"))
			}
			err = f.Upsert(s)
			if err != nil && failAt >= 0 {
				// A failed change leaves either state; retry must converge.
				failed++
				err = f.Upsert(s)
			}
			f.FailWrite(-1, nil)
			desired[s.Frontend] = s
		}
		if err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		if len(violations) > 0 {
			t.Fatalf("step %d: invariant broken mid-change:\n%s", step, strings.Join(violations, "\n"))
		}
		var want []Service
		for _, s := range desired {
			n, _ := normalize(s)
			want = append(want, n)
		}
		SortServices(want)
		got := withoutIDs(mustDump(t, f))
		if d := cmp.Diff(Format(want), Format(got)); d != "" {
			t.Fatalf("step %d: dump differs from desired:\n%s", step, d)
		}
		// No leaks: exactly the entries the Services need.
		backends := map[Backend]bool{}
		slots, pairs, nRanges, tables := 0, 0, 0, 0
		for _, s := range want {
			nRanges += len(s.SourceRanges)
			if s.Maglev && len(s.Backends) > 0 {
				tables++
			}
			slots += 1 + len(s.Backends)
			seen := map[Backend]bool{}
			for _, b := range s.Backends {
				backends[b] = true
				if !seen[b] {
					pairs++
				}
				seen[b] = true
			}
		}
		m := f.mem
		if len(m.svc) != slots || len(m.backend) != len(backends) || len(m.revNat) != len(want) || len(m.match) != pairs {
			t.Fatalf("step %d: entries %d/%d/%d/%d, want %d/%d/%d/%d", step,
				len(m.svc), len(m.backend), len(m.revNat), len(m.match), slots, len(backends), len(want), pairs)
		}
		if len(m.srcRanges) != nRanges || len(m.tables) != tables {
			t.Fatalf("step %d: %d source ranges, %d Maglev tables; want %d, %d", step, len(m.srcRanges), len(m.tables), nRanges, tables)
		}
	}
}

func ExampleFormat() {
	f := NewFake(Capacity{})
	_ = f.Upsert(Service{
		Frontend: Frontend{Addr: netip.MustParseAddr("10.96.0.10"), Port: 53, Proto: UDP},
		Backends: []Backend{{Addr: netip.MustParseAddr("10.244.1.9"), Port: 53}},
	})
	svcs, _ := f.Dump()
	fmt.Print(Format(svcs))
	// Output: SVC 10.96.0.10:53/UDP -> 10.244.1.9:53
}
