package lbmap

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kpfree/kpfree/bpf"
)

func extFE(s string, port uint16) Frontend {
	f := fe4(s, port, TCP)
	f.Scope = ScopeExternal
	return f
}

func localBE(s string, port uint16) Backend {
	b := be(s, port)
	b.Local = true
	return b
}

// The same address, port and protocol in the two scopes are two Services
// with their own master entries and rev-nat ids.
func TestScopeIsPartOfTheFrontend(t *testing.T) {
	f := NewFake(Capacity{})
	in := Service{Frontend: fe4("198.19.1.2", 30080, TCP), Backends: []Backend{localBE("10.244.1.5", 8080), be("10.244.2.7", 8080)}}
	ext := Service{Frontend: extFE("198.19.1.2", 30080), Backends: []Backend{localBE("10.244.1.5", 8080)}, External: true, LocalOnly: true}
	if err := f.Sync([]Service{ext, in}); err != nil {
		t.Fatal(err)
	}
	got := mustDump(t, f)
	want := "SVC 198.19.1.2:30080/TCP -> 10.244.1.5:8080(local) 10.244.2.7:8080\n" +
		"SVC 198.19.1.2:30080/TCP@ext ext local -> 10.244.1.5:8080(local)\n"
	if Format(got) != want {
		t.Fatalf("dump:\n%s\nwant:\n%s", Format(got), want)
	}
	if got[0].RevNatID == got[1].RevNatID {
		t.Fatal("both scopes share a rev-nat id")
	}
	if !(in.Frontend.Compare(ext.Frontend) < 0) || in.Frontend == ext.Frontend {
		t.Fatal("scope does not order or distinguish frontends")
	}
	k := svcKey(ext.Frontend, 0)
	if v, ok := f.mem.svc[k]; !ok || v.Flags != bpf.SvcFlagExternal|bpf.SvcFlagLocal || k.Scope != bpf.ScopeExternal {
		t.Fatalf("external master %+v (key %+v)", v, k)
	}
	// The shared backend is one entry, flagged local.
	if n := len(f.mem.backend); n != 2 {
		t.Fatalf("%d backend entries", n)
	}
	for _, v := range f.mem.backend {
		if isLocal := v.Flags&bpf.BackendFlagLocal != 0; isLocal != (backendDecode(v).Addr == netip.MustParseAddr("10.244.1.5")) {
			t.Fatalf("backend %+v: wrong local flag", backendDecode(v))
		}
	}
	if err := f.Delete(ext.Frontend); err != nil {
		t.Fatal(err)
	}
	if got := Format(mustDump(t, f)); got != "SVC 198.19.1.2:30080/TCP -> 10.244.1.5:8080(local) 10.244.2.7:8080\n" {
		t.Fatalf("after deleting the external entry:\n%s", got)
	}
	if err := f.Verify(); err != nil {
		t.Fatal(err)
	}
}

func TestValidationExternal(t *testing.T) {
	f := NewFake(Capacity{})
	fe := fe4("192.0.2.1", 80, TCP)
	for name, s := range map[string]Service{
		"external scope without External": {Frontend: extFE("192.0.2.1", 80)},
		"LocalOnly without External":      {Frontend: fe, LocalOnly: true},
		"Maglev without External":         {Frontend: fe, Maglev: true},
		"ranges without External":         {Frontend: fe, SourceRanges: []netip.Prefix{pfx("10.0.0.0/8")}},
		"range of the other family":       {Frontend: fe, External: true, SourceRanges: []netip.Prefix{pfx("fd00::/8")}},
		"invalid range":                   {Frontend: fe, External: true, SourceRanges: []netip.Prefix{{}}},
		"unknown scope":                   {Frontend: Frontend{Addr: fe.Addr, Port: 80, Proto: TCP, Scope: 7}, External: true},
	} {
		if err := f.Upsert(s); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: got %v, want ErrInvalid", name, err)
		}
	}
	if f.Writes() != 0 {
		t.Fatalf("invalid Services wrote %d entries", f.Writes())
	}
}

// Source ranges are normalized, written before the master that flags them,
// replaced make-before-break and removed after the master stops flagging them.
func TestSourceRanges(t *testing.T) {
	f := NewFake(Capacity{})
	var log []string
	f.mem.afterOne = func() {
		snap, _ := readStore(f.mem)
		if err := snap.verify(); err != nil {
			t.Errorf("invariant broken mid-change: %v", err)
		}
		var h masterHdr
		for fe, m := range snap.masters {
			if fe.Port == 443 {
				h = m
			}
		}
		var rs []string
		for _, ps := range snap.ranges { // one Service: its ranges, master or not
			for _, p := range ps {
				rs = append(rs, p.String())
			}
		}
		log = append(log, strings.Join(rs, ",")+"|"+map[bool]string{true: "flag", false: "-"}[h.flags&bpf.SvcFlagSrcRanges != 0])
	}
	fe := fe4("203.0.113.10", 443, TCP)
	s := Service{Frontend: fe, External: true, Backends: []Backend{be("10.244.1.5", 8443)},
		SourceRanges: []netip.Prefix{pfx("192.168.7.7/16"), pfx("10.0.0.0/8"), pfx("::ffff:10.0.0.0/104"), pfx("203.0.113.99/32")}}
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	got := mustDump(t, f)
	wantRanges := []netip.Prefix{pfx("10.0.0.0/8"), pfx("192.168.0.0/16"), pfx("203.0.113.99/32")}
	if d := cmp.Diff(wantRanges, got[0].SourceRanges, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); d != "" {
		t.Fatalf("ranges (-want +got):\n%s", d)
	}
	// The LPM key: rev-nat id in network order, prefix length 32 + 96 + n.
	rn := got[0].RevNatID
	k := srcRangeKey(rn, pfx("10.0.0.0/8"))
	if !f.mem.srcRanges[k] || k.Prefixlen != 32+96+8 || be32FromMap(k.RevNatId) != rn {
		t.Fatalf("key %+v missing or wrong", k)
	}
	kb := mapBytes(t, &k)
	if want := []byte{byte(rn >> 24), byte(rn >> 16), byte(rn >> 8), byte(rn)}; !slices.Equal(kb[4:8], want) {
		t.Fatalf("rev-nat id bytes %x, want %x (network order)", kb[4:8], want)
	}
	if !slices.Equal(kb[8:24], netip.MustParseAddr("::ffff:10.0.0.0").AsSlice()) {
		t.Fatalf("address bytes %x", kb[8:24])
	}
	if i := slices.Index(log, "10.0.0.0/8,192.168.0.0/16,203.0.113.99/32|-"); i < 0 || log[len(log)-1] != "10.0.0.0/8,192.168.0.0/16,203.0.113.99/32|flag" {
		t.Fatalf("ranges not all written before the flagged master: %q", log)
	}

	// Replace: the new range goes in before, the stale ones after the master.
	log = nil
	s.SourceRanges = []netip.Prefix{pfx("10.0.0.0/8"), pfx("172.16.0.0/12")}
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	if want := []string{
		"10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,203.0.113.99/32|flag",
		"10.0.0.0/8,172.16.0.0/12,203.0.113.99/32|flag",
		"10.0.0.0/8,172.16.0.0/12|flag",
	}; !slices.Equal(log, want) {
		t.Fatalf("replace wrote %q, want %q", log, want)
	}
	// Remove all: master first (no flag), then the ranges.
	log = nil
	s.SourceRanges = nil
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	if len(log) != 3 || log[0] != "10.0.0.0/8,172.16.0.0/12|-" || log[2] != "|-" {
		t.Fatalf("removal wrote %q", log)
	}
	if len(f.mem.srcRanges) != 0 || len(mustDump(t, f)[0].SourceRanges) != 0 {
		t.Fatal("ranges left")
	}
	// Deleting the Service deletes its ranges.
	s.SourceRanges = wantRanges
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	if err := f.Delete(fe); err != nil {
		t.Fatal(err)
	}
	if len(f.mem.srcRanges) != 0 || len(f.mem.svc) != 0 {
		t.Fatalf("left: %d ranges, %d services entries", len(f.mem.srcRanges), len(f.mem.svc))
	}
}

// The Maglev table is written with the Service, replaced when its backends
// change (before the orphaned backend goes) and deleted when not wanted.
func TestMaglevTableWrittenAndReplaced(t *testing.T) {
	f := NewFake(Capacity{})
	f.mem.afterOne = func() {
		snap, _ := readStore(f.mem)
		if err := snap.verify(); err != nil {
			t.Errorf("invariant broken mid-change: %v", err)
		}
	}
	fe := fe4("198.19.1.2", 30080, TCP)
	bes := []Backend{be("10.244.1.5", 8080), be("10.244.2.7", 8080), be("10.244.3.9", 8080)}
	s := Service{Frontend: fe, External: true, Maglev: true, Backends: bes}
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	table := func() (map[Backend]int, uint32) {
		t.Helper()
		d := mustDump(t, f)
		if len(d) != 1 || !d[0].Maglev {
			t.Fatalf("dump %+v", d)
		}
		v, ok := f.mem.tables[d[0].RevNatID]
		if !ok {
			t.Fatal("no Maglev table")
		}
		counts := map[Backend]int{}
		for _, id := range v.BackendId {
			b, ok := f.backends[id]
			if !ok {
				t.Fatalf("table names backend %d, which is not in the map", id)
			}
			counts[b]++
		}
		return counts, d[0].RevNatID
	}
	counts, rn := table()
	if len(counts) != 3 || counts[bes[0]] < 340 || counts[bes[0]] > 341 {
		t.Fatalf("table counts %v", counts)
	}
	if err := f.Verify(); err != nil {
		t.Fatal(err)
	}

	s.Backends = bes[:2]
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	counts, rn2 := table()
	if rn2 != rn || len(counts) != 2 || counts[bes[2]] != 0 {
		t.Fatalf("after removing a backend: %v", counts)
	}
	if len(f.mem.backend) != 2 {
		t.Fatalf("%d backends left, want 2", len(f.mem.backend))
	}
	w := f.Writes()
	if err := f.Upsert(s); err != nil || f.Writes() != w {
		t.Fatalf("unchanged Maglev Service rewrote %d entries (%v)", f.Writes()-w, err)
	}

	s.Backends = nil // refused: no table
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	if len(f.mem.tables) != 0 {
		t.Fatal("table left for a Service without backends")
	}
	s.Backends = bes
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	s.Maglev = false
	if err := f.Upsert(s); err != nil {
		t.Fatal(err)
	}
	if len(f.mem.tables) != 0 || mustDump(t, f)[0].Maglev {
		t.Fatal("table or flag left after Maglev was turned off")
	}
}

func TestMaglevCapacity(t *testing.T) {
	f := NewFake(Capacity{Maglev: 1, SrcRanges: 2})
	mk := func(port uint16, n int) Service {
		s := Service{Frontend: fe4("192.0.2.1", port, TCP), External: true, Maglev: true, Backends: []Backend{be("10.0.0.1", 80)}}
		for i := range n {
			s.SourceRanges = append(s.SourceRanges, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16))
		}
		return s
	}
	if err := f.Upsert(mk(80, 2)); err != nil {
		t.Fatal(err)
	}
	var mf *MapFullError
	if err := f.Upsert(mk(81, 0)); !errors.As(err, &mf) || mf.Map != bpf.MapMaglev {
		t.Fatalf("second table: %v", err)
	}
	s := mk(82, 1)
	s.Maglev = false
	if err := f.Upsert(s); !errors.As(err, &mf) || mf.Map != bpf.MapSrcRanges {
		t.Fatalf("third range: %v", err)
	}
	if err := f.Verify(); err != nil {
		t.Fatal(err)
	}
}

// A Table restored from maps holding external Services, ranges and tables
// sees them as they are, writes nothing for the same desired state and
// removes ranges and tables no master uses.
func TestRestoreExternal(t *testing.T) {
	f := NewFake(Capacity{})
	svcs := []Service{
		{Frontend: fe4("203.0.113.10", 443, TCP), External: true, Maglev: true, SourceRanges: []netip.Prefix{pfx("10.0.0.0/8")},
			Backends: []Backend{localBE("10.244.1.5", 8443), be("10.244.2.7", 8443)}},
		{Frontend: extFE("203.0.113.10", 443), External: true, LocalOnly: true, Maglev: true, Backends: []Backend{localBE("10.244.1.5", 8443)}},
		{Frontend: fe4("fd00::10", 80, TCP), External: true, SourceRanges: []netip.Prefix{pfx("fd00::/8"), pfx("2001:db8::/32")},
			Backends: []Backend{be("fd00:244::1", 80)}},
	}
	if err := f.Sync(svcs); err != nil {
		t.Fatal(err)
	}
	m := f.mem
	m.srcRanges[srcRangeKey(999, pfx("10.0.0.0/8"))] = true // rev-nat id nobody uses
	m.tables[999] = bpf.MaglevVal{}

	t2, err := newTable(m, DefaultCapacity)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(Format(mustDump(t, f)), Format(mustDump(t, t2))); d != "" {
		t.Fatalf("restored dump differs:\n%s", d)
	}
	if len(m.srcRanges) != 3 || len(m.tables) != 2 {
		t.Fatalf("garbage left: %d ranges, %d tables", len(m.srcRanges), len(m.tables))
	}
	if t2.ranges != 3 || t2.tables != 2 {
		t.Fatalf("restored counts: %d ranges, %d tables", t2.ranges, t2.tables)
	}
	w := m.writes
	if err := t2.Sync(svcs); err != nil {
		t.Fatal(err)
	}
	if m.writes != w {
		t.Fatalf("sync of the restored state wrote %d entries", m.writes-w)
	}

	// A change interrupted after the table and before the master: the table
	// names a backend no slot does. Restore rewrites the table from the
	// slots before it deletes that backend.
	rn := mustDump(t, t2)[1].RevNatID // the @ext entry
	m.backend[500] = backendVal(be("10.244.9.9", 8443))
	m.match[bpf.AffMatchKey{BackendId: 500, RevNatId: rn}] = true
	m.tables[rn] = *maglevVal(slices.Repeat([]uint32{500}, bpf.MaglevM))
	t3, err := newTable(m, DefaultCapacity)
	if err != nil {
		t.Fatal(err)
	}
	if err := t3.Verify(); err != nil {
		t.Fatal(err)
	}
	if _, ok := m.backend[500]; ok {
		t.Fatal("backend only the stale table named was kept")
	}
	if tbl := m.tables[rn]; slices.Contains(tbl.BackendId[:], 500) {
		t.Fatal("stale table kept")
	}
}

func TestSameService(t *testing.T) {
	a := Service{Frontend: fe4("192.0.2.1", 80, TCP), External: true, SourceRanges: []netip.Prefix{pfx("10.1.0.0/8"), pfx("192.168.0.0/16")}}
	b := a
	b.Frontend.Addr = netip.MustParseAddr("::ffff:192.0.2.1")
	b.SourceRanges = []netip.Prefix{pfx("192.168.0.0/16"), pfx("10.0.0.0/8")}
	b.RevNatID = 9
	if !SameService(a, b) {
		t.Fatal("normalized-equal Services differ")
	}
	for name, mut := range map[string]func(*Service){
		"scope":  func(s *Service) { s.Frontend.Scope = ScopeExternal },
		"local":  func(s *Service) { s.LocalOnly = true },
		"maglev": func(s *Service) { s.Maglev = true },
		"ranges": func(s *Service) { s.SourceRanges = s.SourceRanges[:1] },
		"be":     func(s *Service) { s.Backends = []Backend{localBE("10.0.0.1", 80)} },
	} {
		c := a
		mut(&c)
		if SameService(a, c) {
			t.Errorf("%s change not seen", name)
		}
	}
}
