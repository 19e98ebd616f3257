package lbmap

import (
	"net/netip"
	"slices"
	"testing"
	"time"
)

func opStrings(ops []op) []string {
	out := make([]string, len(ops))
	for i, o := range ops {
		out[i] = o.String()
	}
	return out
}

func TestPlanUpsert(t *testing.T) {
	fe := Frontend{Addr: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: TCP}
	be := func(port uint16) Backend { return Backend{Addr: netip.MustParseAddr("10.0.0.1"), Port: port} }
	tests := []struct {
		name    string
		old     *svcState
		want    svcState
		fresh   []idBackend
		orphans []uint32
		ops     []string
	}{
		{
			name:  "new service",
			want:  svcState{hdr: masterHdr{revNat: 1, count: 2}, ids: []uint32{1, 2}},
			fresh: []idBackend{{1, be(1)}, {2, be(2)}},
			ops: []string{
				"put backend 1 10.0.0.1:1",
				"put backend 2 10.0.0.1:2",
				"put match 1/1",
				"put match 2/1",
				"put slot 10.96.0.10:80/TCP#1 -> 1",
				"put slot 10.96.0.10:80/TCP#2 -> 2",
				"put revnat 1 10.96.0.10:80/TCP",
				"put master 10.96.0.10:80/TCP count=2",
			},
		},
		{
			name: "new service without backends",
			want: svcState{hdr: masterHdr{revNat: 4}},
			ops: []string{
				"put revnat 4 10.96.0.10:80/TCP",
				"put master 10.96.0.10:80/TCP count=0",
			},
		},
		{
			name:    "shrink and swap: 1,2,3 -> 2,4",
			old:     &svcState{hdr: masterHdr{revNat: 1, count: 3}, ids: []uint32{1, 2, 3}},
			want:    svcState{hdr: masterHdr{revNat: 1, count: 2}, ids: []uint32{2, 4}},
			fresh:   []idBackend{{4, be(4)}},
			orphans: []uint32{1, 3},
			ops: []string{
				"put backend 4 10.0.0.1:4",
				"put match 4/1",
				"put slot 10.96.0.10:80/TCP#1 -> 2",
				"put slot 10.96.0.10:80/TCP#2 -> 4",
				"put master 10.96.0.10:80/TCP count=2",
				"del slot 10.96.0.10:80/TCP#3",
				"del match 1/1",
				"del match 3/1",
				"del backend 1",
				"del backend 3",
			},
		},
		{
			name: "grow: unchanged slots are not rewritten",
			old:  &svcState{hdr: masterHdr{revNat: 2, count: 1}, ids: []uint32{5}},
			want: svcState{hdr: masterHdr{revNat: 2, count: 2}, ids: []uint32{5, 6}},
			ops: []string{
				"put match 6/2",
				"put slot 10.96.0.10:80/TCP#2 -> 6",
				"put master 10.96.0.10:80/TCP count=2",
			},
		},
		{
			name: "affinity only",
			old:  &svcState{hdr: masterHdr{revNat: 2, count: 1}, ids: []uint32{5}},
			want: svcState{hdr: masterHdr{revNat: 2, count: 1, flags: 1, timeout: 60}, ids: []uint32{5}},
			ops:  []string{"put master 10.96.0.10:80/TCP count=1"},
		},
		{
			name: "dirty: everything rewritten",
			old:  &svcState{hdr: masterHdr{revNat: 2, count: 2}, ids: []uint32{5, 0}, dirty: true},
			want: svcState{hdr: masterHdr{revNat: 2, count: 2}, ids: []uint32{5, 6}},
			ops: []string{
				"put match 5/2",
				"put match 6/2",
				"put slot 10.96.0.10:80/TCP#1 -> 5",
				"put slot 10.96.0.10:80/TCP#2 -> 6",
				"put revnat 2 10.96.0.10:80/TCP",
				"put master 10.96.0.10:80/TCP count=2",
			},
		},
		{
			name:    "to zero backends: master first, then the rest",
			old:     &svcState{hdr: masterHdr{revNat: 3, count: 2}, ids: []uint32{7, 7}},
			want:    svcState{hdr: masterHdr{revNat: 3}},
			orphans: []uint32{7},
			ops: []string{
				"put master 10.96.0.10:80/TCP count=0",
				"del slot 10.96.0.10:80/TCP#1",
				"del slot 10.96.0.10:80/TCP#2",
				"del match 7/3",
				"del backend 7",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := opStrings(planUpsert(fe, tt.old, tt.want, tt.fresh, tt.orphans, nil))
			if !slices.Equal(got, tt.ops) {
				t.Fatalf("ops:\n got %q\nwant %q", got, tt.ops)
			}
		})
	}
}

func TestPlanDelete(t *testing.T) {
	fe := Frontend{Addr: netip.MustParseAddr("fd00::10"), Port: 53, Proto: UDP}
	got := opStrings(planDelete(fe, svcState{hdr: masterHdr{revNat: 9, count: 3}, ids: []uint32{1, 2, 1}}, []uint32{2}))
	want := []string{
		"del master [fd00::10]:53/UDP",
		"del slot [fd00::10]:53/UDP#1",
		"del slot [fd00::10]:53/UDP#2",
		"del slot [fd00::10]:53/UDP#3",
		"del revnat 9",
		"del match 1/9",
		"del match 2/9",
		"del backend 2",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("ops:\n got %q\nwant %q", got, want)
	}
}

func TestIDAllocNextFitReuse(t *testing.T) {
	a := newIDAlloc(4)
	var got []uint32
	for range 4 {
		id, ok := a.alloc()
		if !ok {
			t.Fatal("alloc failed with room left")
		}
		got = append(got, id)
	}
	if !slices.Equal(got, []uint32{1, 2, 3, 4}) {
		t.Fatalf("ids %v", got)
	}
	if _, ok := a.alloc(); ok {
		t.Fatal("alloc beyond the limit")
	}
	a.release(2)
	a.release(3)
	if id, _ := a.alloc(); id != 2 {
		t.Fatalf("after wrap got %d, want 2 (reused)", id)
	}
	a.release(1)
	// Next-fit: 3 comes before the just-freed 1.
	if id, _ := a.alloc(); id != 3 {
		t.Fatalf("got %d, want 3", id)
	}
	if id, _ := a.alloc(); id != 1 {
		t.Fatalf("got %d, want 1", id)
	}

	r := newIDAlloc(10)
	r.take(7)
	r.take(3)
	if id, _ := r.alloc(); id != 8 {
		t.Fatalf("after restore got %d, want 8", id)
	}
}

// ServiceHash agrees with SameService: the same Service written in another
// form (IPv4-mapped addresses, an IPv4-mapped source range) hashes equal,
// and every field SameService compares changes the hash.
func TestServiceHashFollowsSameService(t *testing.T) {
	base := Service{
		Frontend: Frontend{Addr: netip.MustParseAddr("192.0.2.10"), Port: 80, Proto: TCP},
		Backends: []Backend{{Addr: netip.MustParseAddr("10.244.0.1"), Port: 8080}, {Addr: netip.MustParseAddr("10.244.0.2"), Port: 8080, Local: true}},
		Affinity: 3 * time.Hour, External: true, SourceRanges: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")},
	}
	clone := func() Service {
		s := base
		s.Backends = slices.Clone(base.Backends)
		s.SourceRanges = slices.Clone(base.SourceRanges)
		return s
	}
	same := clone()
	same.Frontend.Addr = netip.MustParseAddr("::ffff:192.0.2.10")
	same.Backends[0].Addr = netip.MustParseAddr("::ffff:10.244.0.1")
	same.SourceRanges = []netip.Prefix{netip.MustParsePrefix("::ffff:198.51.100.0/120")}
	same.RevNatID = 7 // not compared
	if !SameService(base, same) || ServiceHash(base) != ServiceHash(same) {
		t.Fatalf("the same Service in another form: SameService %v, hashes %x %x", SameService(base, same), ServiceHash(base), ServiceHash(same))
	}
	for name, mut := range map[string]func(*Service){
		"frontend addr": func(s *Service) { s.Frontend.Addr = netip.MustParseAddr("192.0.2.11") },
		"frontend port": func(s *Service) { s.Frontend.Port = 81 },
		"protocol":      func(s *Service) { s.Frontend.Proto = UDP },
		"scope":         func(s *Service) { s.Frontend.Scope = ScopeExternal },
		"affinity":      func(s *Service) { s.Affinity = time.Hour },
		"local only":    func(s *Service) { s.LocalOnly = true },
		"maglev":        func(s *Service) { s.Maglev = true },
		"backend order": func(s *Service) { s.Backends[0], s.Backends[1] = s.Backends[1], s.Backends[0] },
		"backend local": func(s *Service) { s.Backends[0].Local = true },
		"backend port":  func(s *Service) { s.Backends[1].Port = 8081 },
		"one backend":   func(s *Service) { s.Backends = s.Backends[:1] },
		"source range":  func(s *Service) { s.SourceRanges[0] = netip.MustParsePrefix("198.51.100.0/25") },
		"no range":      func(s *Service) { s.SourceRanges = nil },
		"range->backend": func(s *Service) {
			s.SourceRanges = nil
			s.Backends = append(s.Backends, Backend{Addr: netip.MustParseAddr("198.51.100.0"), Port: 24})
		},
	} {
		s := clone()
		mut(&s)
		if SameService(base, s) {
			t.Fatalf("%s: SameService still true", name)
		}
		if ServiceHash(base) == ServiceHash(s) {
			t.Errorf("%s: hash unchanged", name)
		}
	}
}
