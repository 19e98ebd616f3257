package lbmap

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/kpfree/kpfree/bpf"
)

// mapBytes is what the kernel sees: the struct as cilium/ebpf marshals it.
func mapBytes(t *testing.T, v any) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := binary.Write(&b, binary.NativeEndian, v); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func TestSvcKeyBytesAreNetworkOrder(t *testing.T) {
	fe := Frontend{Addr: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: TCP}
	k := svcKey(fe, 3)
	got := mapBytes(t, &k)
	want := []byte{
		0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10, // ::ffff:10.96.0.10
		0, 80, // port, network order
		6,    // proto
		0,    // scope
		3, 0, // slot, host order (little endian here)
		0, 0, // pad
	}
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		want[20], want[21] = 0, 3 // big-endian host
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("svc_key bytes\n got %v\nwant %v", got, want)
	}
	if fe2, slot := svcKeyDecode(k); fe2 != fe || slot != 3 {
		t.Fatalf("round trip: %v #%d", fe2, slot)
	}
}

func TestBackendBytesIPv6(t *testing.T) {
	b := Backend{Addr: netip.MustParseAddr("fd00::1:2"), Port: 8443}
	v := backendVal(b)
	got := mapBytes(t, &v)
	want := append(netip.MustParseAddr("fd00::1:2").AsSlice(), 0x20, 0xfb, 0, 0)
	if !bytes.Equal(got, want) {
		t.Fatalf("backend_val bytes\n got %v\nwant %v", got, want)
	}
	if backendDecode(v) != b {
		t.Fatalf("round trip: %v", backendDecode(v))
	}
}

func TestAddrRoundTrip(t *testing.T) {
	for _, s := range []string{"0.0.0.0", "127.0.0.1", "10.96.0.10", "255.255.255.255", "::1", "fd00::10", "2001:db8::ffff:1"} {
		a := netip.MustParseAddr(s)
		if got := addrFromMap(addrToMap(a)); got != a {
			t.Errorf("%s -> %s", a, got)
		}
	}
	// An IPv4-mapped IPv6 address is the IPv4 address in the maps.
	if got := addrFromMap(addrToMap(netip.MustParseAddr("::ffff:10.0.0.1"))); got != netip.MustParseAddr("10.0.0.1") {
		t.Errorf("v4-mapped decodes to %s", got)
	}
}

func TestPortConversion(t *testing.T) {
	for _, p := range []uint16{1, 80, 443, 8080, 65535} {
		n := portToMap(p)
		var b [2]byte
		binary.NativeEndian.PutUint16(b[:], n)
		if binary.BigEndian.Uint16(b[:]) != p {
			t.Errorf("port %d: map form bytes %v are not network order", p, b)
		}
		if portFromMap(n) != p {
			t.Errorf("port %d round trip: %d", p, portFromMap(n))
		}
	}
}

func TestRevNatAndMasterValues(t *testing.T) {
	fe := Frontend{Addr: netip.MustParseAddr("fd00::10"), Port: 53, Proto: UDP}
	a, p := revNatDecode(revNatVal(fe))
	if a != fe.Addr || p != 53 {
		t.Fatalf("revnat round trip: %s %d", a, p)
	}
	h := masterHdr{revNat: 7, count: 3, flags: bpf.SvcFlagAffinity, timeout: 10800}
	if got := masterDecode(masterVal(h)); got != h {
		t.Fatalf("master round trip: %+v", got)
	}
	v := masterVal(h)
	if v.BackendId != 0 {
		t.Fatalf("master carries a backend id: %+v", v)
	}
}
