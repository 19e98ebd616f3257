package lbmap

import (
	"encoding/binary"
	"net/netip"

	"github.com/kpfree/kpfree/bpf"
)

// The one place for byte order. In the maps (see bpf/sock_lb.c):
//   - an address is 16 bytes in network order, IPv4 as ::ffff:a.b.c.d, held
//     in a [4]uint32 whose in-memory bytes are exactly those 16 bytes;
//   - a port is 2 bytes in network order held in a uint16;
//   - ids, counts, flags, slots and timeouts are host order.
// The kernel copies keys and values byte for byte, and cilium/ebpf marshals
// the generated structs in native order, so "network order" here means:
// choose the uint32/uint16 whose native-order bytes are the network bytes.

func addrToMap(a netip.Addr) [4]uint32 {
	b := a.As16() // IPv4 becomes ::ffff:a.b.c.d
	var w [4]uint32
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

func addrFromMap(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	return netip.AddrFrom16(b).Unmap()
}

func portToMap(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

func portFromMap(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

func svcKey(fe Frontend, slot uint16) bpf.SvcKey {
	return bpf.SvcKey{
		Addr:  addrToMap(fe.Addr),
		Port:  portToMap(fe.Port),
		Proto: uint8(fe.Proto),
		Scope: uint8(fe.Scope),
		Slot:  slot,
	}
}

func svcKeyDecode(k bpf.SvcKey) (Frontend, uint16) {
	return Frontend{Addr: addrFromMap(k.Addr), Port: portFromMap(k.Port), Proto: Proto(k.Proto), Scope: Scope(k.Scope)}, k.Slot
}

// masterHdr is the decoded master entry (slot 0) of a Service.
type masterHdr struct {
	revNat  uint32
	count   uint16
	flags   uint8
	timeout uint32 // seconds
}

func masterVal(h masterHdr) bpf.SvcVal {
	return bpf.SvcVal{RevNatId: h.revNat, Count: h.count, Flags: h.flags, AffinityTimeout: h.timeout}
}

func masterDecode(v bpf.SvcVal) masterHdr {
	return masterHdr{revNat: v.RevNatId, count: v.Count, flags: v.Flags, timeout: v.AffinityTimeout}
}

func slotVal(backendID, revNat uint32) bpf.SvcVal {
	return bpf.SvcVal{BackendId: backendID, RevNatId: revNat}
}

func backendVal(b Backend) bpf.BackendVal {
	v := bpf.BackendVal{Addr: addrToMap(b.Addr), Port: portToMap(b.Port)}
	if b.Local {
		v.Flags |= bpf.BackendFlagLocal
	}
	return v
}

func backendDecode(v bpf.BackendVal) Backend {
	return Backend{Addr: addrFromMap(v.Addr), Port: portFromMap(v.Port), Local: v.Flags&bpf.BackendFlagLocal != 0}
}

func revNatVal(fe Frontend) bpf.RevNatVal {
	return bpf.RevNatVal{Addr: addrToMap(fe.Addr), Port: portToMap(fe.Port)}
}

func revNatDecode(v bpf.RevNatVal) (netip.Addr, uint16) {
	return addrFromMap(v.Addr), portFromMap(v.Port)
}

// srcRangeKey is the kpf_src_ranges key of one allowed prefix of a Service:
// the LPM prefix length counts the 32 bits of the rev-nat id (network order)
// and then the bits of the 16-byte address form (an IPv4 /n is 32+96+n).
func srcRangeKey(revNat uint32, p netip.Prefix) bpf.SrcRangeKey {
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return bpf.SrcRangeKey{
		Prefixlen: uint32(32 + bits),
		RevNatId:  be32ToMap(revNat),
		Addr:      addrToMap(p.Masked().Addr()),
	}
}

// srcRangeDecode returns the rev-nat id and prefix of a kpf_src_ranges key;
// ok is false for a key no srcRangeKey makes (a prefix length out of range).
func srcRangeDecode(k bpf.SrcRangeKey) (revNat uint32, p netip.Prefix, ok bool) {
	revNat = be32FromMap(k.RevNatId)
	bits := int(k.Prefixlen) - 32
	if bits < 0 || bits > 128 {
		return revNat, netip.Prefix{}, false
	}
	var b [16]byte
	for i := range k.Addr {
		binary.NativeEndian.PutUint32(b[4*i:], k.Addr[i])
	}
	a := netip.AddrFrom16(b)
	if a.Is4In6() && bits >= 96 {
		return revNat, netip.PrefixFrom(a.Unmap(), bits-96), true
	}
	return revNat, netip.PrefixFrom(a, bits), true
}

// be32ToMap returns the uint32 whose native-order bytes are v in network
// order.
func be32ToMap(v uint32) uint32 {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return binary.NativeEndian.Uint32(b[:])
}

func be32FromMap(v uint32) uint32 {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return binary.BigEndian.Uint32(b[:])
}

// maglevVal is a kpf_maglev value: the table of backend ids, host order.
func maglevVal(table []uint32) *bpf.MaglevVal {
	var v bpf.MaglevVal
	copy(v.BackendId[:], table)
	return &v
}

// ipv4ToMap is an IPv4 address as a __be32 (dev_val.addr4); zero when a is
// not IPv4.
func ipv4ToMap(a netip.Addr) uint32 {
	a = a.Unmap()
	if !a.Is4() {
		return 0
	}
	b := a.As4()
	return binary.NativeEndian.Uint32(b[:])
}

func ipv4FromMap(v uint32) netip.Addr {
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}

// ipv6ToMap is an IPv6 address in the 16-byte form (dev_val.addr6); zero
// when a is not IPv6.
func ipv6ToMap(a netip.Addr) [4]uint32 {
	if !a.Is6() || a.Is4In6() {
		return [4]uint32{}
	}
	return addrToMap(a)
}

func ipv6FromMap(w [4]uint32) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	return netip.AddrFrom16(b)
}
