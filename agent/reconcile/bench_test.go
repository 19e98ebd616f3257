package reconcile_test

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/reconcile"
)

// bigSource holds n Services of one port with two endpoints each, as the
// agent benchmark (test/bench/agent) creates them.
func bigSource(n int) *fakeSource {
	src := newSource()
	src.synced, src.inc = true, true
	for i := range n {
		vip := netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}).String()
		src.put(fmt.Sprintf("svc-%06d", i), vip, 80, 8080, "10.244.0.1", "10.244.0.2")
	}
	clear(src.dirty)
	return src
}

// BenchmarkFullPass50k: a periodic full pass at 50,000 Services with
// nothing to write (model rebuild, Sync comparing with the bookkeeping).
func BenchmarkFullPass50k(b *testing.B) {
	src := bigSource(50000)
	fake := lbmap.NewFake(lbmap.Capacity{Services: 262144, Backends: 65536, RevNat: 131072, AffinityMatch: 262144})
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()})
	if st, err := r.Reconcile(true); err != nil || st.Errors != 0 {
		b.Fatal(st, err)
	}
	b.ResetTimer()
	for range b.N {
		if st, err := r.Reconcile(true); err != nil || st.Errors != 0 || st.Services != 50000 {
			b.Fatal(st, err)
		}
	}
}

// BenchmarkIncrementalPass50k: one EndpointSlice change at 50,000 Services.
func BenchmarkIncrementalPass50k(b *testing.B) {
	src := bigSource(50000)
	fake := lbmap.NewFake(lbmap.Capacity{Services: 262144, Backends: 65536, RevNat: 131072, AffinityMatch: 262144})
	r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()})
	if _, err := r.Reconcile(true); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for i := range b.N {
		eps := []string{"10.244.0.1"}
		if i%2 == 1 {
			eps = append(eps, "10.244.0.2")
		}
		src.put("svc-012345", netip.AddrFrom4([4]byte{10, 96, 12345 >> 8, 12345 & 0xff}).String(), 80, 8080, eps...)
		st, err := r.Reconcile(false)
		if err != nil || st.Mode != "incremental" || st.Upserts != 1 {
			b.Fatal(st, err)
		}
	}
}

// BenchmarkHeap50k reports the heap kept at 50,000 Services: the model
// Index alone, and the whole reconciler over fake maps (Index, what was
// written, lbmap bookkeeping and the fake maps' content).
func BenchmarkHeap50k(b *testing.B) {
	src := bigSource(50000)
	snap, _ := src.Snapshot()
	heap := func() float64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return float64(m.HeapAlloc) / (1 << 20)
	}
	for range b.N {
		h0 := heap()
		x := model.NewIndex()
		x.Reset(snap.Services, snap.EndpointSlices, "", model.Options{})
		h1 := heap()
		runtime.KeepAlive(x)
		x = nil
		h2 := heap()
		fake := lbmap.NewFake(lbmap.Capacity{Services: 262144, Backends: 65536, RevNat: 131072, AffinityMatch: 262144})
		r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()})
		if _, err := r.Reconcile(true); err != nil {
			b.Fatal(err)
		}
		h3 := heap()
		runtime.KeepAlive(r)
		b.ReportMetric(h1-h0, "index-MiB")
		b.ReportMetric(h3-h2, "reconciler+fake-MiB")
	}
}

// BenchmarkRestartPass50k: the first (full) pass of a restarted agent at
// 50,000 Services whose maps already hold them all (nothing to write).
func BenchmarkRestartPass50k(b *testing.B) {
	src := bigSource(50000)
	fake := lbmap.NewFake(lbmap.Capacity{Services: 262144, Backends: 65536, RevNat: 131072, AffinityMatch: 262144})
	if _, err := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()}).Reconcile(true); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		r := reconcile.New(reconcile.Config{Maps: fake, Source: src.source()})
		if st, err := r.Reconcile(false); err != nil || st.Mode != "full" || st.Errors != 0 {
			b.Fatal(st, err)
		}
	}
}
