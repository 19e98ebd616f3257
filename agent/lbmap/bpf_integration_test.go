//go:build linux

package lbmap

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
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
		st.ranges(func(k bpf.SrcRangeKey) { got.srcRanges[k] = true }),
		st.maglevs(func(rn uint32, v *bpf.MaglevVal) { got.tables[rn] = *v }),
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
	fes := []Frontend{fe4("10.96.0.1", 80, TCP), fe4("10.96.0.1", 53, UDP), fe4("fd00::1", 80, TCP), fe4("fd00::2", 443, TCP),
		extFE("10.96.0.1", 80), extFE("fd00::2", 443)}
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
		for i := range s.Backends {
			s.Backends[i].Local = s.Backends[i].Addr.As16()[15]%2 == 1
		}
		if fe.Scope == ScopeExternal || rng.IntN(2) == 0 {
			s.External, s.LocalOnly, s.Maglev = true, rng.IntN(2) == 0, rng.IntN(2) == 0
			for _, p := range []string{"10.0.0.0/8", "192.0.2.0/24", "0.0.0.0/0", "fd00::/8", "2001:db8::/48", "::/0"} {
				if pp := pfx(p); pp.Addr().Is4() == fe.Addr.Is4() && rng.IntN(3) == 0 {
					s.SourceRanges = append(s.SourceRanges, pp)
				}
			}
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
		"ranges":   cmp.Diff(fake.mem.srcRanges, k.srcRanges),
		"maglev":   cmp.Diff(fake.mem.tables, k.tables),
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
	if !cmp.Equal(before.svc, after.svc) || !cmp.Equal(before.backend, after.backend) ||
		!cmp.Equal(before.srcRanges, after.srcRanges) || !cmp.Equal(before.tables, after.tables) {
		t.Fatal("unchanged Sync after restore rewrote entries")
	}
}

func TestIntegrationBPFMapFull(t *testing.T) {
	m := bpfMaps(t, bpf.MapSizes{Services: 4, Backends: 2, RevNat: 2, AffinityMatch: 4})
	tbl, err := New(m)
	if err != nil {
		t.Fatal(err)
	}
	if tbl.cap != (Capacity{Services: 4, Backends: 2, RevNat: 2, AffinityMatch: 4, SrcRanges: 16384, Maglev: 16384}) {
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

// The kernel's LPM trie answers lookups for the keys lbmap writes as the tc
// datapath expects: an IPv4 client inside a range of its Service matches,
// outside it or under another Service's rev-nat id does not.
func TestIntegrationSrcRangeLookup(t *testing.T) {
	m := bpfMaps(t, bpf.MapSizes{})
	tbl, err := New(m)
	if err != nil {
		t.Fatal(err)
	}
	s4 := Service{Frontend: fe4("203.0.113.10", 443, TCP), External: true, Backends: []Backend{be("10.0.0.1", 443)},
		SourceRanges: []netip.Prefix{pfx("10.0.0.0/8"), pfx("192.0.2.128/25")}}
	s6 := Service{Frontend: fe4("2001:db8::10", 443, TCP), External: true, Backends: []Backend{be("fd00::1", 443)},
		SourceRanges: []netip.Prefix{pfx("fd00:1::/32")}}
	if err := tbl.Sync([]Service{s4, s6}); err != nil {
		t.Fatal(err)
	}
	d := mustDump(t, tbl)
	ids := map[Frontend]uint32{}
	for _, s := range d {
		ids[s.Frontend] = s.RevNatID
	}
	lookup := func(rn uint32, client string) bool {
		k := srcRangeKey(rn, netip.PrefixFrom(netip.MustParseAddr(client), netip.MustParseAddr(client).BitLen()))
		var v uint8
		err := m.SrcRanges.Lookup(&k, &v)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
		return err == nil && v == 1
	}
	rn4, rn6 := ids[s4.Frontend], ids[s6.Frontend]
	for _, c := range []struct {
		rn     uint32
		client string
		want   bool
	}{
		{rn4, "10.1.2.3", true}, {rn4, "192.0.2.200", true}, {rn4, "192.0.2.100", false}, {rn4, "11.0.0.1", false},
		{rn6, "fd00:1::5", true}, {rn6, "fd00:2::5", false}, {rn6, "10.1.2.3", false}, {rn4, "fd00:1::5", false},
	} {
		if got := lookup(c.rn, c.client); got != c.want {
			t.Errorf("rev-nat %d, client %s: allowed=%v, want %v", c.rn, c.client, got, c.want)
		}
	}
}

func TestIntegrationDevicesStatsConntrack(t *testing.T) {
	m := bpfMaps(t, bpf.MapSizes{})

	// Devices: replaced whole, byte order as the datapath reads it.
	if err := WriteDevices(m.Devices, map[int]DeviceAddrs{
		2: {V4: netip.MustParseAddr("198.19.1.2"), V6: netip.MustParseAddr("fd00:198:19::2")},
		3: {V4: netip.MustParseAddr("198.19.2.2")},
	}); err != nil {
		t.Fatal(err)
	}
	var dv bpf.DevVal
	k := uint32(2)
	if err := m.Devices.Lookup(&k, &dv); err != nil {
		t.Fatal(err)
	}
	if b := mapBytes(t, &dv); !slices.Equal(b[:4], []byte{198, 19, 1, 2}) || b[4] != 0xfd || b[19] != 2 {
		t.Fatalf("dev_val bytes %x", b)
	}
	if err := WriteDevices(m.Devices, map[int]DeviceAddrs{3: {V6: netip.MustParseAddr("fd00::3")}}); err != nil {
		t.Fatal(err)
	}
	devs, err := ReadDevices(m.Devices)
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 1 || devs[3].V4.IsValid() || devs[3].V6 != netip.MustParseAddr("fd00::3") {
		t.Fatalf("devices after replace: %+v", devs)
	}
	if err := WriteDevices(m.Devices, map[int]DeviceAddrs{4: {V4: netip.MustParseAddr("fd00::1")}}); err == nil {
		t.Fatal("IPv6 address as V4 accepted")
	}

	// Stats: summed over CPUs.
	var per []uint64
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	for i := range ncpu {
		per = append(per, uint64(10+i))
	}
	sk := uint32(bpf.StatDropSrcRange)
	if err := m.Stats.Put(&sk, per); err != nil {
		t.Fatal(err)
	}
	stats, err := ReadStats(m.Stats)
	if err != nil {
		t.Fatal(err)
	}
	want := uint64(0)
	for _, v := range per {
		want += v
	}
	if stats["drop_src_range"] != want || stats["dnat"] != 0 || len(stats) != int(bpf.StatMax) {
		t.Fatalf("stats %v, want drop_src_range=%d", stats, want)
	}

	// Conntrack: expired entries go, live ones stay and read back.
	now, err := MonotonicNow()
	if err != nil {
		t.Fatal(err)
	}
	put := func(sport uint16, typ uint8, expires time.Duration) {
		k := bpf.CTKey{Saddr: addrToMap(netip.MustParseAddr("192.0.2.1")), Daddr: addrToMap(netip.MustParseAddr("198.19.1.2")),
			Sport: portToMap(sport), Dport: portToMap(30080), Proto: uint8(TCP), Type: typ}
		v := bpf.CTVal{Addr: addrToMap(netip.MustParseAddr("10.244.1.5")), Port: portToMap(8080), Flags: bpf.CTFlagSNAT,
			RevNatId: 3, BackendId: 5, Expires: uint64(expires)}
		if err := m.CT.Put(&k, &v); err != nil {
			t.Fatal(err)
		}
	}
	put(40000, bpf.CTFwd, now+time.Minute)
	put(40001, bpf.CTFwd, now-time.Second)
	put(40002, bpf.CTReply, now-time.Minute)
	deleted, live, err := GCConntrack(m.CT, now)
	if err != nil || deleted != 2 || live != 1 {
		t.Fatalf("GC: deleted %d, live %d, err %v", deleted, live, err)
	}
	ents, err := DumpConntrack(m.CT)
	if err != nil {
		t.Fatal(err)
	}
	got := FormatConntrack(ents, now)
	if want := "CT fwd TCP 192.0.2.1:40000 -> 198.19.1.2:30080 => 10.244.1.5:8080 snat revnat=3 backend=5 expires=1m0s\n"; got != want {
		t.Fatalf("conntrack:\n%s\nwant:\n%s", got, want)
	}
}

// Batched reads (iterate's fast path) return what entry-by-entry iteration
// does, across several batches, and do not fall back on this kernel.
func TestIntegrationBatchedReads(t *testing.T) {
	m := bpfMaps(t, bpf.MapSizes{Services: 32768})
	for i := range 10000 {
		k := bpf.SvcKey{Port: uint16(i), Proto: 6}
		k.Addr[3] = uint32(i)
		if err := m.Services.Put(&k, &bpf.SvcVal{BackendId: uint32(i)}); err != nil {
			t.Fatal(err)
		}
	}
	for _, rn := range []uint32{1, 7} {
		v := bpf.MaglevVal{}
		v.BackendId[0] = rn
		if err := m.Maglev.Put(&rn, &v); err != nil {
			t.Fatal(err)
		}
	}
	ks, vs, err := readBatches[bpf.SvcKey, bpf.SvcVal](m.Services)
	if err != nil {
		t.Fatalf("batched read failed (kernel >= 5.6 has it): %v", err)
	}
	want := map[bpf.SvcKey]bpf.SvcVal{}
	var k bpf.SvcKey
	var v bpf.SvcVal
	it := m.Services.Iterate()
	for it.Next(&k, &v) {
		want[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	if len(ks) != 10000 || len(want) != 10000 {
		t.Fatalf("batched read %d entries, iteration %d; want 10000", len(ks), len(want))
	}
	for i := range ks {
		if want[ks[i]] != vs[i] {
			t.Fatalf("entry %v: batched %v, iterated %v", ks[i], vs[i], want[ks[i]])
		}
	}
	mk, mv, err := readBatches[uint32, bpf.MaglevVal](m.Maglev)
	if err != nil || len(mk) != 2 || mv[0].BackendId[0] != mk[0] || mv[1].BackendId[0] != mk[1] {
		t.Fatalf("maglev batched read: %v %v", mk, err)
	}
}
