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
		Slot:  slot,
	}
}

func svcKeyDecode(k bpf.SvcKey) (Frontend, uint16) {
	return Frontend{Addr: addrFromMap(k.Addr), Port: portFromMap(k.Port), Proto: Proto(k.Proto)}, k.Slot
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
	return bpf.BackendVal{Addr: addrToMap(b.Addr), Port: portToMap(b.Port)}
}

func backendDecode(v bpf.BackendVal) Backend {
	return Backend{Addr: addrFromMap(v.Addr), Port: portFromMap(v.Port)}
}

func revNatVal(fe Frontend) bpf.RevNatVal {
	return bpf.RevNatVal{Addr: addrToMap(fe.Addr), Port: portToMap(fe.Port)}
}

func revNatDecode(v bpf.RevNatVal) (netip.Addr, uint16) {
	return addrFromMap(v.Addr), portFromMap(v.Port)
}
