//go:build linux

package bpf_test

// The tc datapath (nodeport.c) run through BPF_PROG_TEST_RUN: packets built
// here with correct checksums go through kpf_tc_in*/kpf_tc_out*, over maps
// from bpf.NewMaps written directly with the bpf types; the output is parsed
// and its checksums verified by an independent implementation.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kpfree/kpfree/bpf"
)

const (
	tcActUnspec = -1
	tcActOK     = 0
	tcActShot   = 2

	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpACK = 0x10
)

// ---- packets ----

type pkt struct {
	src, dst  netip.AddrPort
	proto     uint8 // unix.IPPROTO_TCP or IPPROTO_UDP
	tcpFlags  uint8
	noUDPCsum bool   // IPv4 UDP without checksum (0)
	fragOff   uint16 // IPv4 frag_off field (host order): 0x2000 MF, low 13 bits offset
	v4Options int    // IPv4 option words (IHL = 5 + n)
}

var payload = []byte("kpfree-nodeport-test")

func csumAdd(sum uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func csumFold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

func pseudoSum(src, dst netip.Addr, proto uint8, l4len int) uint32 {
	var s uint32
	s = csumAdd(s, src.AsSlice())
	s = csumAdd(s, dst.AsSlice())
	return s + uint32(proto) + uint32(l4len)
}

func (p pkt) bytes() []byte {
	v4 := p.src.Addr().Is4()
	var l4 []byte
	if p.proto == unix.IPPROTO_TCP {
		l4 = make([]byte, 20, 20+len(payload))
		binary.BigEndian.PutUint32(l4[4:], 1000) // seq
		l4[12] = 5 << 4
		l4[13] = p.tcpFlags
		binary.BigEndian.PutUint16(l4[14:], 65535)
	} else {
		l4 = make([]byte, 8, 8+len(payload))
	}
	binary.BigEndian.PutUint16(l4[0:], p.src.Port())
	binary.BigEndian.PutUint16(l4[2:], p.dst.Port())
	l4 = append(l4, payload...)
	csumOff := 16
	if p.proto == unix.IPPROTO_UDP {
		binary.BigEndian.PutUint16(l4[4:], uint16(len(l4)))
		csumOff = 6
	}
	if !(p.proto == unix.IPPROTO_UDP && v4 && p.noUDPCsum) {
		c := ^csumFold(csumAdd(pseudoSum(p.src.Addr(), p.dst.Addr(), p.proto, len(l4)), l4))
		if c == 0 && p.proto == unix.IPPROTO_UDP {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(l4[csumOff:], c)
	}

	eth := []byte{2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00}
	if v4 {
		ihl := 5 + p.v4Options
		ip := make([]byte, ihl*4)
		ip[0] = 0x40 | byte(ihl)
		binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)+len(l4)))
		binary.BigEndian.PutUint16(ip[6:], p.fragOff)
		ip[8] = 64
		ip[9] = p.proto
		copy(ip[12:], p.src.Addr().AsSlice())
		copy(ip[16:], p.dst.Addr().AsSlice())
		for i := 20; i < len(ip); i++ {
			ip[i] = 1 // NOP options
		}
		binary.BigEndian.PutUint16(ip[10:], ^csumFold(csumAdd(0, ip)))
		return append(append(eth, ip...), l4...)
	}
	eth[12], eth[13] = 0x86, 0xdd
	ip := make([]byte, 40)
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(l4)))
	ip[6] = p.proto
	ip[7] = 64
	copy(ip[8:], p.src.Addr().AsSlice())
	copy(ip[24:], p.dst.Addr().AsSlice())
	return append(append(eth, ip...), l4...)
}

// parsePkt reads a packet back and verifies its IPv4 header checksum and its
// TCP/UDP checksum. udpCsum0 reports an IPv4 UDP checksum of 0 (none).
func parsePkt(b []byte) (p pkt, udpCsum0 bool, err error) {
	if len(b) < 14 {
		return p, false, errors.New("short packet")
	}
	var src, dst netip.Addr
	var l4 []byte
	switch binary.BigEndian.Uint16(b[12:]) {
	case 0x0800:
		ip := b[14:]
		ihl := int(ip[0]&0xf) * 4
		if csumFold(csumAdd(0, ip[:ihl])) != 0xffff {
			return p, false, errors.New("bad IPv4 header checksum")
		}
		p.proto = ip[9]
		p.fragOff = binary.BigEndian.Uint16(ip[6:])
		src, dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
		l4 = ip[ihl:binary.BigEndian.Uint16(ip[2:])]
	case 0x86dd:
		ip := b[14:]
		p.proto = ip[6]
		src, dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
		l4 = ip[40 : 40+int(binary.BigEndian.Uint16(ip[4:]))]
	default:
		return p, false, errors.New("not IP")
	}
	p.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:]))
	p.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))
	if p.proto == unix.IPPROTO_TCP {
		p.tcpFlags = l4[13]
	}
	if p.proto == unix.IPPROTO_UDP && src.Is4() && binary.BigEndian.Uint16(l4[6:]) == 0 {
		return p, true, nil
	}
	if csumFold(csumAdd(pseudoSum(src, dst, p.proto, len(l4)), l4)) != 0xffff {
		return p, false, fmt.Errorf("bad %d checksum", p.proto)
	}
	return p, false, nil
}

// ---- maps ----

// addr16 is the 16-byte map form (IPv4 as ::ffff:a.b.c.d), network order.
func addr16(a netip.Addr) [4]uint32 {
	b := a.As16()
	var out [4]uint32
	for i := range out {
		out[i] = binary.NativeEndian.Uint32(b[i*4:])
	}
	return out
}

// nport is a port in network order, as the maps hold it.
func nport(p uint16) uint16 { return binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, p)) }

type npEnv struct {
	t     *testing.T
	maps  bpf.MapSet
	progs *bpf.NodePortPrograms
}

// loIfindex is the ifindex BPF_PROG_TEST_RUN gives a tc program's skb: the
// loopback device of the caller's network namespace.
const loIfindex = 1

func newNPEnv(t *testing.T) *npEnv {
	t.Helper()
	requireRoot(t)
	maps, err := bpf.NewMaps(bpf.MapSizes{CT: 4096, Maglev: 16, SrcRanges: 64})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { maps.Close() })
	progs, err := bpf.NewNodePortPrograms(maps)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { progs.Close() })
	return &npEnv{t: t, maps: maps, progs: progs}
}

type be struct {
	id    uint32
	addr  netip.AddrPort
	flags uint8
}

type svcDef struct {
	fe       netip.AddrPort
	proto    uint8
	scope    uint8
	flags    uint8
	revNat   uint32
	backends []be
	timeout  uint32 // affinity
}

func (e *npEnv) put(m *ebpf.Map, k, v any) {
	e.t.Helper()
	if err := m.Put(k, v); err != nil {
		e.t.Fatalf("map put: %v", err)
	}
}

func (e *npEnv) addService(s svcDef) {
	e.t.Helper()
	key := bpf.SvcKey{Addr: addr16(s.fe.Addr()), Port: nport(s.fe.Port()), Proto: s.proto, Scope: s.scope}
	for i, b := range s.backends {
		e.put(e.maps.Backends, b.id, bpf.BackendVal{Addr: addr16(b.addr.Addr()), Port: nport(b.addr.Port()), Flags: b.flags})
		e.put(e.maps.AffinityMatch, bpf.AffMatchKey{BackendId: b.id, RevNatId: s.revNat}, uint32(1))
		key.Slot = uint16(i + 1)
		e.put(e.maps.Services, key, bpf.SvcVal{BackendId: b.id, RevNatId: s.revNat})
	}
	e.put(e.maps.RevNat, s.revNat, bpf.RevNatVal{Addr: addr16(s.fe.Addr()), Port: nport(s.fe.Port())})
	key.Slot = 0
	e.put(e.maps.Services, key, bpf.SvcVal{RevNatId: s.revNat, Count: uint16(len(s.backends)), Flags: s.flags, AffinityTimeout: s.timeout})
}

func (e *npEnv) stat(s bpf.Stat) uint64 {
	e.t.Helper()
	var per []uint64
	if err := e.maps.Stats.Lookup(uint32(s), &per); err != nil {
		e.t.Fatal(err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n
}

// run runs a program on p and returns the verdict and the parsed output
// (checksums verified).
func (e *npEnv) run(prog string, p pkt) (int32, pkt, bool) {
	e.t.Helper()
	in := p.bytes()
	opts := &ebpf.RunOptions{Data: in, DataOut: make([]byte, len(in)+64)}
	ret, err := e.progs.Program(prog).Run(opts)
	if err != nil {
		e.t.Fatalf("%s: test run: %v", prog, err)
	}
	out, csum0, err := parsePkt(opts.DataOut)
	if err != nil {
		e.t.Fatalf("%s: output: %v (% x)", prog, err, opts.DataOut)
	}
	return int32(ret), out, csum0
}

// expect runs p and requires the verdict and, for OK, the rewritten tuple.
func (e *npEnv) expect(prog string, p pkt, wantRet int32, wantSrc, wantDst netip.AddrPort) pkt {
	e.t.Helper()
	ret, out, _ := e.run(prog, p)
	if ret != wantRet {
		e.t.Fatalf("%s %s -> %s: verdict %d, want %d", prog, p.src, p.dst, ret, wantRet)
	}
	if wantRet == tcActUnspec || wantRet == tcActShot {
		wantSrc, wantDst = p.src, p.dst // untouched
	}
	if out.src != wantSrc || out.dst != wantDst {
		e.t.Fatalf("%s %s -> %s: got %s -> %s, want %s -> %s", prog, p.src, p.dst, out.src, out.dst, wantSrc, wantDst)
	}
	if out.proto != p.proto || p.proto == unix.IPPROTO_TCP && out.tcpFlags != p.tcpFlags {
		e.t.Fatalf("%s: proto/flags changed: %+v", prog, out)
	}
	return out
}

func (e *npEnv) ct(src, dst netip.AddrPort, proto, typ uint8) (bpf.CTVal, bool) {
	var v bpf.CTVal
	err := e.maps.CT.Lookup(bpf.CTKey{Saddr: addr16(src.Addr()), Daddr: addr16(dst.Addr()), Sport: nport(src.Port()),
		Dport: nport(dst.Port()), Proto: proto, Type: typ}, &v)
	return v, err == nil
}

// ---- the families x protocols matrix ----

type family struct {
	name                         string
	client, node, backend, other netip.Addr
	in, out                      string
}

var families = []family{
	{"v4", netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("198.18.0.11"), netip.MustParseAddr("10.244.1.5"),
		netip.MustParseAddr("203.0.113.7"), bpf.ProgTCIn4, bpf.ProgTCOut4},
	{"v6", netip.MustParseAddr("2001:db8::10"), netip.MustParseAddr("fd00:18::11"), netip.MustParseAddr("fd00:244:1::5"),
		netip.MustParseAddr("2001:db8:99::7"), bpf.ProgTCIn6, bpf.ProgTCOut6},
}

var protos = []struct {
	name  string
	proto uint8
	first uint8 // TCP flags of a first packet
}{{"tcp", unix.IPPROTO_TCP, tcpSYN}, {"udp", unix.IPPROTO_UDP, 0}}

func forEachFamilyProto(t *testing.T, fn func(t *testing.T, f family, proto uint8, first uint8)) {
	for _, f := range families {
		for _, p := range protos {
			t.Run(f.name+"_"+p.name, func(t *testing.T) { fn(t, f, p.proto, p.first) })
		}
	}
}

// TestNodePortDNATLocalBackend: a flow to a NodePort whose backend runs on
// this node is DNATed at ingress without SNAT, its reply is restored to the
// frontend at egress, and the next packet of the flow follows conntrack.
func TestNodePortDNATLocalBackend(t *testing.T) {
	forEachFamilyProto(t, func(t *testing.T, f family, proto, first uint8) {
		e := newNPEnv(t)
		fe := netip.AddrPortFrom(f.node, 30080)
		bk := netip.AddrPortFrom(f.backend, 8080)
		client := netip.AddrPortFrom(f.client, 40001)
		e.addService(svcDef{fe: fe, proto: proto, flags: bpf.SvcFlagExternal, revNat: 7,
			backends: []be{{id: 1, addr: bk, flags: bpf.BackendFlagLocal}}})

		e.expect(f.in, pkt{src: client, dst: fe, proto: proto, tcpFlags: first}, tcActOK, client, bk)
		fwd, ok := e.ct(client, fe, proto, bpf.CTFwd)
		if !ok || fwd.BackendId != 1 || fwd.RevNatId != 7 || fwd.Flags&bpf.CTFlagSNAT != 0 {
			t.Fatalf("CT_FWD %+v (found %v): want backend 1, rev-nat 7, no SNAT", fwd, ok)
		}
		if _, ok := e.ct(client, bk, proto, bpf.CTOut); ok {
			t.Fatal("CT_OUT created for a local backend")
		}
		// The reply leaves by the device: the client sees the frontend.
		e.expect(f.out, pkt{src: bk, dst: client, proto: proto, tcpFlags: tcpSYN | tcpACK}, tcActOK, fe, client)
		// The flow goes on through conntrack.
		e.expect(f.in, pkt{src: client, dst: fe, proto: proto, tcpFlags: tcpACK}, tcActOK, client, bk)
		// A packet nobody knows passes untouched, both ways.
		e.expect(f.out, pkt{src: client, dst: bk, proto: proto, tcpFlags: tcpACK}, tcActUnspec, client, bk)
		e.expect(f.in, pkt{src: client, dst: netip.AddrPortFrom(f.node, 22), proto: proto}, tcActUnspec, client, fe)
		if e.stat(bpf.StatDNAT) != 1 || e.stat(bpf.StatRevNAT) != 1 || e.stat(bpf.StatSNAT) != 0 {
			t.Fatalf("stats dnat=%d revnat=%d snat=%d, want 1 1 0", e.stat(bpf.StatDNAT), e.stat(bpf.StatRevNAT), e.stat(bpf.StatSNAT))
		}
	})
}

// TestNodePortSNATRemoteBackend: the whole SNAT round trip: ingress DNAT,
// egress SNAT to kpf_devices[ifindex] keeping the client's port, the reply's
// ingress un-SNAT, the reply's egress restoring the frontend. A second
// client whose port is taken gets a random port in 32768..60999.
func TestNodePortSNATRemoteBackend(t *testing.T) {
	forEachFamilyProto(t, func(t *testing.T, f family, proto, first uint8) {
		e := newNPEnv(t)
		fe := netip.AddrPortFrom(f.node, 30080)
		bk := netip.AddrPortFrom(f.backend, 8080)
		client := netip.AddrPortFrom(f.client, 40001)
		e.addService(svcDef{fe: fe, proto: proto, flags: bpf.SvcFlagExternal, revNat: 7, backends: []be{{id: 1, addr: bk}}})
		dev := bpf.DevVal{}
		if f.node.Is4() {
			dev.Addr4 = addr16(f.node)[3]
		} else {
			dev.Addr6 = addr16(f.node)
		}
		e.put(e.maps.Devices, uint32(loIfindex), dev)

		e.expect(f.in, pkt{src: client, dst: fe, proto: proto, tcpFlags: first}, tcActOK, client, bk)
		if out, ok := e.ct(client, bk, proto, bpf.CTOut); !ok || out.Flags&bpf.CTFlagPending == 0 {
			t.Fatalf("CT_OUT %+v (found %v): want pending", out, ok)
		}
		snat := netip.AddrPortFrom(f.node, client.Port())
		e.expect(f.out, pkt{src: client, dst: bk, proto: proto, tcpFlags: first}, tcActOK, snat, bk)
		e.expect(f.in, pkt{src: bk, dst: snat, proto: proto, tcpFlags: tcpSYN | tcpACK}, tcActOK, bk, client)
		e.expect(f.out, pkt{src: bk, dst: client, proto: proto, tcpFlags: tcpSYN | tcpACK}, tcActOK, fe, client)
		// Established: the CT_OUT entry holds the SNAT address now.
		e.expect(f.in, pkt{src: client, dst: fe, proto: proto, tcpFlags: tcpACK}, tcActOK, client, bk)
		e.expect(f.out, pkt{src: client, dst: bk, proto: proto, tcpFlags: tcpACK}, tcActOK, snat, bk)

		// Another client with the same port: the node's port is taken.
		client2 := netip.AddrPortFrom(f.other, client.Port())
		e.expect(f.in, pkt{src: client2, dst: fe, proto: proto, tcpFlags: first}, tcActOK, client2, bk)
		_, out, _ := e.run(f.out, pkt{src: client2, dst: bk, proto: proto, tcpFlags: first})
		if out.src.Addr() != f.node || out.src.Port() < 32768 || out.src.Port() > 60999 {
			t.Fatalf("second client SNATed to %s, want %s:32768..60999", out.src, f.node)
		}
		e.expect(f.in, pkt{src: bk, dst: out.src, proto: proto, tcpFlags: tcpACK}, tcActOK, bk, client2)
		if e.stat(bpf.StatSNAT) != 2 || e.stat(bpf.StatDNAT) != 2 {
			t.Fatalf("stats snat=%d dnat=%d, want 2 2", e.stat(bpf.StatSNAT), e.stat(bpf.StatDNAT))
		}
	})
}

// TestNodePortDrops: the counted drops and the passes of the ingress path.
func TestNodePortDrops(t *testing.T) {
	forEachFamilyProto(t, func(t *testing.T, f family, proto, first uint8) {
		e := newNPEnv(t)
		bk := netip.AddrPortFrom(f.backend, 8080)
		client := netip.AddrPortFrom(f.client, 40001)
		ranged := netip.AddrPortFrom(f.node, 30081)
		empty := netip.AddrPortFrom(f.node, 30082)
		internal := netip.AddrPortFrom(f.node, 30083)
		e.addService(svcDef{fe: ranged, proto: proto, flags: bpf.SvcFlagExternal | bpf.SvcFlagSrcRanges, revNat: 1,
			backends: []be{{id: 1, addr: bk, flags: bpf.BackendFlagLocal}}})
		e.addService(svcDef{fe: empty, proto: proto, flags: bpf.SvcFlagExternal, revNat: 2})
		e.addService(svcDef{fe: internal, proto: proto, revNat: 3, backends: []be{{id: 1, addr: bk}}})
		// loadBalancerSourceRanges: the client's /24 (IPv4; 96 + 24 bits in
		// the 16-byte form) or /48 (IPv6), after the 32 bits of rev_nat_id
		// (network order).
		pfx, bits := netip.PrefixFrom(f.client, 24).Masked(), 96+24
		if f.client.Is6() {
			pfx, bits = netip.PrefixFrom(f.client, 48).Masked(), 48
		}
		e.put(e.maps.SrcRanges, bpf.SrcRangeKey{Prefixlen: uint32(32 + bits), RevNatId: nu32(1), Addr: addr16(pfx.Addr())}, uint8(1))

		e.expect(f.in, pkt{src: client, dst: ranged, proto: proto, tcpFlags: first}, tcActOK, client, bk)
		outsider := netip.AddrPortFrom(f.other, 40001)
		e.expect(f.in, pkt{src: outsider, dst: ranged, proto: proto, tcpFlags: first}, tcActShot, outsider, ranged)
		e.expect(f.in, pkt{src: client, dst: empty, proto: proto, tcpFlags: first}, tcActShot, client, empty)
		e.expect(f.in, pkt{src: client, dst: internal, proto: proto, tcpFlags: first}, tcActUnspec, client, internal)
		if e.stat(bpf.StatDropSrcRange) != 1 || e.stat(bpf.StatDropNoBackend) != 1 || e.stat(bpf.StatDNAT) != 1 {
			t.Fatalf("stats src_range=%d no_backend=%d dnat=%d, want 1 1 1",
				e.stat(bpf.StatDropSrcRange), e.stat(bpf.StatDropNoBackend), e.stat(bpf.StatDNAT))
		}
		if f.client.Is4() {
			// A first fragment (MF) for a frontend is dropped; one for
			// another address and non-first fragments pass untouched.
			e.expect(f.in, pkt{src: client, dst: ranged, proto: proto, fragOff: 0x2000}, tcActShot, client, ranged)
			other := netip.AddrPortFrom(f.node, 22)
			e.expect(f.in, pkt{src: client, dst: other, proto: proto, fragOff: 0x2000}, tcActUnspec, client, other)
			e.expect(f.in, pkt{src: client, dst: ranged, proto: proto, fragOff: 0x0010}, tcActUnspec, client, ranged)
			if e.stat(bpf.StatDropFrag) != 1 {
				t.Fatalf("drop_frag=%d, want 1", e.stat(bpf.StatDropFrag))
			}
		}
	})
}

// nu32 is a uint32 in network order.
func nu32(v uint32) uint32 { return binary.NativeEndian.Uint32(binary.BigEndian.AppendUint32(nil, v)) }

// TestNodePortIPv4OptionsAndUDPNoChecksum: any IHL parses; a UDP/IPv4
// checksum of 0 stays 0 through DNAT and reverse NAT.
func TestNodePortIPv4OptionsAndUDPNoChecksum(t *testing.T) {
	e := newNPEnv(t)
	f := families[0]
	fe := netip.AddrPortFrom(f.node, 30080)
	bk := netip.AddrPortFrom(f.backend, 8080)
	client := netip.AddrPortFrom(f.client, 40001)
	for _, proto := range []uint8{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		e.addService(svcDef{fe: fe, proto: proto, flags: bpf.SvcFlagExternal, revNat: 7,
			backends: []be{{id: 1, addr: bk, flags: bpf.BackendFlagLocal}}})
	}
	e.expect(f.in, pkt{src: client, dst: fe, proto: unix.IPPROTO_TCP, tcpFlags: tcpSYN, v4Options: 3}, tcActOK, client, bk)

	ret, out, csum0 := e.run(f.in, pkt{src: client, dst: fe, proto: unix.IPPROTO_UDP, noUDPCsum: true})
	if ret != tcActOK || out.dst != bk || !csum0 {
		t.Fatalf("UDP without checksum: verdict %d, dst %s, checksum still 0: %v", ret, out.dst, csum0)
	}
	ret, out, csum0 = e.run(f.out, pkt{src: bk, dst: client, proto: unix.IPPROTO_UDP, noUDPCsum: true})
	if ret != tcActOK || out.src != fe || !csum0 {
		t.Fatalf("UDP reply without checksum: verdict %d, src %s, checksum still 0: %v", ret, out.src, csum0)
	}
}

// TestNodePortMaglev: a Maglev Service takes the backend from its table, not
// from the slots; the choice ignores the destination address (the same flow
// through another node address picks the same backend) and spreads flows.
func TestNodePortMaglev(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			e := newNPEnv(t)
			proto := uint8(unix.IPPROTO_TCP)
			fe1 := netip.AddrPortFrom(f.node, 30080)
			fe2 := netip.AddrPortFrom(f.other, 30080) // a second node address
			var bks []be
			for i := range 3 {
				bks = append(bks, be{id: uint32(10 + i), addr: netip.AddrPortFrom(f.backend, uint16(9000+i)), flags: bpf.BackendFlagLocal})
			}
			// Slots name only the first backend; the table all three.
			for _, fe := range []netip.AddrPort{fe1, fe2} {
				e.addService(svcDef{fe: fe, proto: proto, flags: bpf.SvcFlagExternal | bpf.SvcFlagMaglev, revNat: 5, backends: bks[:1]})
			}
			for _, b := range bks {
				e.put(e.maps.Backends, b.id, bpf.BackendVal{Addr: addr16(b.addr.Addr()), Port: nport(b.addr.Port()), Flags: b.flags})
			}
			var table bpf.MaglevVal
			for i := range table.BackendId {
				table.BackendId[i] = bks[i%3].id
			}
			e.put(e.maps.Maglev, uint32(5), &table)

			seen := map[uint16]int{}
			for port := uint16(41000); port < 41030; port++ {
				client := netip.AddrPortFrom(f.client, port)
				_, o1, _ := e.run(f.in, pkt{src: client, dst: fe1, proto: proto, tcpFlags: tcpSYN})
				_, o2, _ := e.run(f.in, pkt{src: client, dst: fe2, proto: proto, tcpFlags: tcpSYN})
				if o1.dst != o2.dst {
					t.Fatalf("client %s: %s via %s but %s via %s", client, o1.dst, fe1, o2.dst, fe2)
				}
				seen[o1.dst.Port()]++
			}
			if len(seen) < 2 {
				t.Fatalf("30 flows all went to %v: the Maglev table is not used", seen)
			}
		})
	}
}

// TestNodePortAffinity: ClientIP affinity pins every new flow of a client to
// the backend of its first flow.
func TestNodePortAffinity(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			e := newNPEnv(t)
			proto := uint8(unix.IPPROTO_UDP)
			fe := netip.AddrPortFrom(f.node, 30080)
			var bks []be
			for i := range 4 {
				bks = append(bks, be{id: uint32(20 + i), addr: netip.AddrPortFrom(f.backend, uint16(9000+i)), flags: bpf.BackendFlagLocal})
			}
			e.addService(svcDef{fe: fe, proto: proto, flags: bpf.SvcFlagExternal | bpf.SvcFlagAffinity, revNat: 9, backends: bks, timeout: 600})
			_, first, _ := e.run(f.in, pkt{src: netip.AddrPortFrom(f.client, 42000), dst: fe, proto: proto})
			for port := uint16(42001); port < 42021; port++ {
				_, o, _ := e.run(f.in, pkt{src: netip.AddrPortFrom(f.client, port), dst: fe, proto: proto})
				if o.dst != first.dst {
					t.Fatalf("flow %d went to %s, the client's first flow to %s", port, o.dst, first.dst)
				}
			}
			var av bpf.AffVal
			if err := e.maps.Affinity.Lookup(bpf.AffKey{ClientAddr: addr16(f.client), RevNatId: 9}, &av); err != nil {
				t.Fatalf("affinity entry: %v", err)
			}
			// Another client is pinned too, to its own first choice.
			others := map[netip.AddrPort]bool{}
			for port := uint16(43000); port < 43020; port++ {
				_, o, _ := e.run(f.in, pkt{src: netip.AddrPortFrom(f.other, port), dst: fe, proto: proto})
				others[o.dst] = true
			}
			if len(others) != 1 {
				t.Fatalf("second client spread over %v despite affinity", others)
			}
			// Without affinity the same 20 flows spread (4 backends: all on
			// one has chance 4^-19).
			e.addService(svcDef{fe: fe, proto: proto, flags: bpf.SvcFlagExternal, revNat: 9, backends: bks})
			spread := map[netip.AddrPort]bool{}
			for port := uint16(44000); port < 44020; port++ {
				_, o, _ := e.run(f.in, pkt{src: netip.AddrPortFrom(f.client, port), dst: fe, proto: proto})
				spread[o.dst] = true
			}
			if len(spread) < 2 {
				t.Fatalf("without affinity 20 flows all went to %v", spread)
			}
		})
	}
}

// TestNodePortConntrackLifetime: an expired entry is ignored (the flow is
// balanced anew), a live one is followed even to a backend the slots do not
// name, one whose backend left the Service is not; FIN marks it closing with
// the short lifetime.
func TestNodePortConntrackLifetime(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			e := newNPEnv(t)
			proto := uint8(unix.IPPROTO_TCP)
			fe := netip.AddrPortFrom(f.node, 30080)
			bk := netip.AddrPortFrom(f.backend, 8080)
			stale := netip.AddrPortFrom(f.other, 7777)
			client := netip.AddrPortFrom(f.client, 40001)
			e.addService(svcDef{fe: fe, proto: proto, flags: bpf.SvcFlagExternal, revNat: 7,
				backends: []be{{id: 1, addr: bk, flags: bpf.BackendFlagLocal}}})
			key := bpf.CTKey{Saddr: addr16(client.Addr()), Daddr: addr16(fe.Addr()), Sport: nport(client.Port()),
				Dport: nport(fe.Port()), Proto: proto, Type: bpf.CTFwd}
			ctTo := func(expires uint64, backendID uint32) {
				e.put(e.maps.CT, key, bpf.CTVal{Addr: addr16(stale.Addr()), Port: nport(stale.Port()), RevNatId: 7,
					BackendId: backendID, Expires: expires})
			}
			e.put(e.maps.AffinityMatch, bpf.AffMatchKey{BackendId: 99, RevNatId: 7}, uint32(1))

			ctTo(monotonicNow(t)+uint64(time.Hour), 99)
			e.expect(f.in, pkt{src: client, dst: fe, proto: proto, tcpFlags: tcpACK}, tcActOK, client, stale)
			ctTo(1, 99) // expired
			e.expect(f.in, pkt{src: client, dst: fe, proto: proto, tcpFlags: tcpACK}, tcActOK, client, bk)
			ctTo(monotonicNow(t)+uint64(time.Hour), 98) // backend 98 is not in the Service
			e.expect(f.in, pkt{src: client, dst: fe, proto: proto, tcpFlags: tcpACK}, tcActOK, client, bk)

			v, _ := e.ct(client, fe, proto, bpf.CTFwd)
			if left := time.Duration(v.Expires - monotonicNow(t)); left < 6*time.Hour-time.Minute {
				t.Fatalf("established TCP entry expires in %s, want ~6h", left)
			}
			e.expect(f.in, pkt{src: client, dst: fe, proto: proto, tcpFlags: tcpFIN | tcpACK}, tcActOK, client, bk)
			v, _ = e.ct(client, fe, proto, bpf.CTFwd)
			left := time.Duration(v.Expires - monotonicNow(t))
			if v.Flags&bpf.CTFlagClosing == 0 || left > 11*time.Second {
				t.Fatalf("after FIN: flags %#x, expires in %s; want closing, <= 10s", v.Flags, left)
			}
		})
	}
}

// TestNodePortChecksumVerifier: the test's own checksum check accepts the
// packets it builds and rejects any single flipped byte in the headers (no
// root needed).
func TestNodePortChecksumVerifier(t *testing.T) {
	for _, f := range families {
		for _, p := range protos {
			in := pkt{src: netip.AddrPortFrom(f.client, 40001), dst: netip.AddrPortFrom(f.node, 30080), proto: p.proto, tcpFlags: p.first}
			b := in.bytes()
			out, _, err := parsePkt(b)
			if err != nil || out.src != in.src || out.dst != in.dst {
				t.Fatalf("%s/%s: parse %+v, %v", f.name, p.name, out, err)
			}
			for i := 14 + 8; i < len(b)-len(payload); i++ { // addresses, ports, checksums
				if f.node.Is4() && (i < 14+12 || i == 14+20+4 && p.proto == unix.IPPROTO_UDP) {
					continue // before the addresses; UDP length is not covered alone
				}
				c := append([]byte(nil), b...)
				c[i] ^= 0x10
				if _, _, err := parsePkt(c); err == nil {
					t.Fatalf("%s/%s: byte %d flipped, checksum still valid", f.name, p.name, i)
				}
			}
		}
	}
}
