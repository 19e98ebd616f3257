//go:build linux

package bpf_test

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/bpf"
)

func pinnedMaxEntries(t *testing.T, pinDir, name string) uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, bpf.PinVersion, "maps", name), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	return m.MaxEntries()
}

// A size change keeps every Service: the pinned maps are copied into maps of
// the new size, the next Load reuses them, and connections keep working.
func TestIntegrationResizePinned(t *testing.T) {
	requireRoot(t)
	e := newEnv(t)
	a := e.tcpServer("A", "127.0.0.1:0")
	b := e.tcpServer("B", "127.0.0.2:0")
	small := bpf.MapSizes{Services: 64, Backends: 64, RevNat: 64, AffinityMatch: 64, CT: 128}
	dp := e.load(bpf.Options{MapSizes: small})
	m := mustMaps(t, dp)
	upsert(t, m, svc(vip4, lbmap.TCP, a, b))
	for i := 0; i < 20; i++ { // 20 more Services: 3 + 20 x 2 = 43 of 64 entries
		upsert(t, m, svc(netipAddrPort(t, "10.96.1.%d:80", i), lbmap.TCP, a))
	}
	before, err := m.Dump()
	if err != nil {
		t.Fatal(err)
	}
	dp.Close()

	// Shrinking below what the services map holds is refused, nothing changes.
	if _, err := bpf.ResizePinned(e.pinDir, bpf.MapSizes{Services: 16, Backends: 64, RevNat: 64, AffinityMatch: 64, CT: 128}); err == nil ||
		!strings.Contains(err.Error(), "kpf_services holds") {
		t.Fatalf("shrink below the content: err = %v, want a refusal naming kpf_services", err)
	}
	if got := pinnedMaxEntries(t, e.pinDir, bpf.MapServices); got != 64 {
		t.Fatalf("after a refused shrink kpf_services has %d entries max, want 64", got)
	}

	big := bpf.MapSizes{Services: 4096, Backends: 1024, RevNat: 1024, AffinityMatch: 64, CT: 1024}
	resized, err := bpf.ResizePinned(e.pinDir, big)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bpf.Resized{}
	for _, r := range resized {
		got[r.Map] = r
	}
	if r := got[bpf.MapServices]; r.From != 64 || r.To != 4096 || r.Copied != 43 {
		t.Errorf("kpf_services: %+v, want 64 -> 4096 with 43 entries copied", r)
	}
	if _, ok := got[bpf.MapAffMatch]; ok {
		t.Errorf("kpf_aff_match kept its size but was resized: %+v", got[bpf.MapAffMatch])
	}
	if n := pinnedMaxEntries(t, e.pinDir, bpf.MapCT); n != 1024 {
		t.Errorf("kpf_ct max entries %d, want 1024", n)
	}

	dp2 := e.load(bpf.Options{MapSizes: big}) // would fail with ErrMapIncompatible without the resize
	m2 := mustMaps(t, dp2)
	after, err := m2.Dump()
	if err != nil {
		t.Fatal(err)
	}
	if lbmap.Format(after) != lbmap.Format(before) {
		t.Errorf("services changed across the resize:\nbefore\n%s\nafter\n%s", lbmap.Format(before), lbmap.Format(after))
	}
	as := e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 20}, true)
	requireAllOK(t, as)
	requireBoth(t, as, "A", "B")

	// Same sizes again: nothing to do.
	if again, err := bpf.ResizePinned(e.pinDir, big); err != nil || len(again) != 0 {
		t.Errorf("second resize: %v %v, want nothing done", again, err)
	}
}

func netipAddrPort(t *testing.T, format string, args ...any) netip.AddrPort {
	t.Helper()
	ap, err := netip.ParseAddrPort(fmt.Sprintf(format, args...))
	if err != nil {
		t.Fatal(err)
	}
	return ap
}
