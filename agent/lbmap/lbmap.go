// Package lbmap is the agent's only door to the load balancer's BPF maps
// (the socket load balancer's and the tc datapath's, bpf/kpf_maps.h):
// Services in, map entries out, and the other way round for Dump.
//
// It owns the byte order (byteorder.go is the one place that converts between
// netip/host order and the network-order map layout), the backend and
// rev-nat id allocation, and the write order. Every change is
// make-before-break: new backends first, then the service's slot entries,
// source ranges and Maglev table, then its master entry with the new count
// and flags, and only then the stale slots, ranges and backends, so the
// datapath never follows a slot to a missing backend (plan.go).
//
// Two implementations share all of that logic: [New] over the pinned maps of
// a loaded datapath (bpf.MapSet), restoring its bookkeeping from them so a
// restarted agent continues where the last one stopped, and [NewFake], the same
// logic over in-memory maps, for unit tests of the layers above. node.go has
// the helpers for the tc datapath's device, statistics and conntrack maps.
package lbmap

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/maphash"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/kpfree/kpfree/bpf"
)

// Proto is an L4 protocol number.
type Proto uint8

// The protocols the datapath translates.
const (
	TCP Proto = 6
	UDP Proto = 17
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "TCP"
	case UDP:
		return "UDP"
	}
	return "proto" + strconv.Itoa(int(p))
}

// Scope says which datapath looks a frontend up (svc_key.scope).
type Scope uint8

// Scopes, as SCOPE_* in bpf/kpf_maps.h.
const (
	// ScopeInternal entries serve the socket load balancer (pods and host
	// processes of this node), and tc when no ScopeExternal entry exists.
	ScopeInternal Scope = bpf.ScopeInternal
	// ScopeExternal entries serve only tc (traffic entering the node): the
	// externalTrafficPolicy Local view of a frontend.
	ScopeExternal Scope = bpf.ScopeExternal
)

func (s Scope) String() string {
	switch s {
	case ScopeInternal:
		return "int"
	case ScopeExternal:
		return "ext"
	}
	return "scope" + strconv.Itoa(int(s))
}

// Frontend is a Service address (ClusterIP, node address, external or
// load-balancer IP), port and protocol, in one scope: the same address may
// have an internal and an external entry.
type Frontend struct {
	Addr  netip.Addr
	Port  uint16
	Proto Proto
	Scope Scope
}

// String renders "10.96.0.1:80/TCP", with "@ext" appended for the external
// scope.
func (f Frontend) String() string {
	s := netip.AddrPortFrom(f.Addr, f.Port).String() + "/" + f.Proto.String()
	if f.Scope != ScopeInternal {
		s += "@" + f.Scope.String()
	}
	return s
}

// Compare orders frontends by address, port, protocol, then scope.
func (f Frontend) Compare(o Frontend) int {
	if c := f.Addr.Compare(o.Addr); c != 0 {
		return c
	}
	if f.Port != o.Port {
		return int(f.Port) - int(o.Port)
	}
	if f.Proto != o.Proto {
		return int(f.Proto) - int(o.Proto)
	}
	return int(f.Scope) - int(o.Scope)
}

// Backend is an endpoint address. Local says it runs on this node (no SNAT
// needed to reach it); it is part of the backend's identity, so the same
// address and port with and without Local would be two backend entries (the
// model derives Local from the endpoint's node, so one address has one value).
type Backend struct {
	Addr  netip.Addr
	Port  uint16
	Local bool
}

func (b Backend) String() string {
	s := netip.AddrPortFrom(b.Addr, b.Port).String()
	if b.Local {
		s += "(local)"
	}
	return s
}

// Compare orders backends by address, port, then Local.
func (b Backend) Compare(o Backend) int {
	if c := b.Addr.Compare(o.Addr); c != 0 {
		return c
	}
	if b.Port != o.Port {
		return int(b.Port) - int(o.Port)
	}
	switch {
	case b.Local == o.Local:
		return 0
	case o.Local:
		return -1
	}
	return 1
}

// Service is one frontend and its backends.
type Service struct {
	Frontend Frontend
	// Backends in slot order; a backend may repeat (it then gets more slots).
	// No backends: the datapath refuses connections to the frontend at once.
	Backends []Backend
	// Affinity is the ClientIP session affinity timeout (whole seconds,
	// rounded up); 0 disables affinity.
	Affinity time.Duration
	// External: a NodePort, ExternalIP or LoadBalancer frontend that tc
	// serves for traffic entering the node (SVC_F_EXTERNAL). Required for
	// ScopeExternal, LocalOnly, SourceRanges and Maglev.
	External bool
	// LocalOnly: externalTrafficPolicy Local, never SNAT (SVC_F_LOCAL).
	LocalOnly bool
	// SourceRanges are the client prefixes allowed (loadBalancerSourceRanges);
	// empty: any client. Normalized to masked prefixes of the frontend's
	// family (IPv4-mapped IPv6 prefixes become IPv4), sorted, without
	// repeats; Dump returns them so.
	SourceRanges []netip.Prefix
	// Maglev: tc picks the backend from the Service's Maglev table
	// (SVC_F_MAGLEV), written by lbmap from the distinct backends.
	Maglev bool
	// RevNatID is assigned by the Maps implementation: Upsert and Sync
	// ignore it, Dump fills it in.
	RevNatID uint32
}

// MaxBackends is the most backend slots a Service can have (svc_val.count).
const MaxBackends = math.MaxUint16

// Maps programs the load balancer. Implementations are safe for concurrent use.
type Maps interface {
	// Upsert creates or replaces one Service. Idempotent: an unchanged
	// Service writes nothing.
	Upsert(svc Service) error
	// Delete removes a Service; deleting an unknown frontend is no error.
	Delete(fe Frontend) error
	// Sync makes the maps hold exactly these Services: it deletes the others
	// first (freeing room), then upserts each. Call it once the caller knows
	// the full desired state (watchers synced), never with a partial list.
	// It goes on past a failing Service and returns every error joined.
	Sync(svcs []Service) error
	// Dump reads the Services back from the maps, sorted by frontend.
	Dump() ([]Service, error)
}

// ErrMapFull is matched (errors.Is) by the error returned when a map has no
// room for a change; the change is then not applied.
var ErrMapFull = errors.New("lbmap: map full")

// ErrInvalid is matched by errors for Services that cannot be programmed.
var ErrInvalid = errors.New("lbmap: invalid service")

// MapFullError says which map lacks room.
type MapFullError struct {
	Map       string
	Need, Cap int // entries the change needs in total, and the map's size
	Err       error
}

func (e *MapFullError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("lbmap: map %s full: %v", e.Map, e.Err)
	}
	return fmt.Sprintf("lbmap: map %s full: needs %d entries, holds %d", e.Map, e.Need, e.Cap)
}

func (e *MapFullError) Is(target error) bool { return target == ErrMapFull }
func (e *MapFullError) Unwrap() error        { return e.Err }

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// normalize validates a Service and returns it with IPv4-mapped IPv6
// addresses unmapped (the maps store both forms alike), source ranges
// normalized and RevNatID cleared.
func normalize(svc Service) (Service, error) {
	fe := svc.Frontend
	if !fe.Addr.IsValid() {
		return svc, invalid("frontend has no address")
	}
	fe.Addr = fe.Addr.Unmap()
	if fe.Addr.Zone() != "" {
		return svc, invalid("%s: zoned address", svc.Frontend)
	}
	if fe.Proto != TCP && fe.Proto != UDP {
		return svc, invalid("%s: protocol must be TCP or UDP", svc.Frontend)
	}
	if fe.Port == 0 {
		return svc, invalid("%s: port 0", svc.Frontend)
	}
	if fe.Scope != ScopeInternal && fe.Scope != ScopeExternal {
		return svc, invalid("%s: unknown scope %d", svc.Frontend, fe.Scope)
	}
	if !svc.External {
		switch {
		case fe.Scope == ScopeExternal:
			return svc, invalid("%s: an external-scope entry must be External", fe)
		case svc.LocalOnly, svc.Maglev, len(svc.SourceRanges) > 0:
			return svc, invalid("%s: LocalOnly, Maglev and SourceRanges need External (only tc uses them)", fe)
		}
	}
	if len(svc.Backends) > MaxBackends {
		return svc, invalid("%s: %d backends, at most %d", fe, len(svc.Backends), MaxBackends)
	}
	if svc.Affinity < 0 || affinitySeconds(svc.Affinity) > math.MaxUint32 {
		return svc, invalid("%s: affinity timeout %v out of range", fe, svc.Affinity)
	}
	out := Service{
		Frontend: fe, Affinity: svc.Affinity, Backends: make([]Backend, len(svc.Backends)),
		External: svc.External, LocalOnly: svc.LocalOnly, Maglev: svc.Maglev,
	}
	for i, b := range svc.Backends {
		if !b.Addr.IsValid() || b.Port == 0 {
			return svc, invalid("%s: backend %d (%s) needs an address and a port", fe, i, b)
		}
		b.Addr = b.Addr.Unmap()
		if b.Addr.Is4() != fe.Addr.Is4() {
			return svc, invalid("%s: backend %s is of another address family", fe, b)
		}
		if b.Addr.Zone() != "" {
			return svc, invalid("%s: backend %s: zoned address", fe, b)
		}
		out.Backends[i] = b
	}
	ranges, err := normalizeRanges(fe, svc.SourceRanges)
	if err != nil {
		return svc, err
	}
	out.SourceRanges = ranges
	return out, nil
}

// normalizeRanges masks, unmaps, sorts and dedupes source ranges and checks
// they are of the frontend's family. Nil when there are none.
func normalizeRanges(fe Frontend, in []netip.Prefix) ([]netip.Prefix, error) {
	if len(in) == 0 {
		return nil, nil
	}
	out := make([]netip.Prefix, 0, len(in))
	for _, p := range in {
		if !p.IsValid() {
			return nil, invalid("%s: source range %q is not a valid prefix", fe, p)
		}
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		if p.Addr().Zone() != "" {
			return nil, invalid("%s: source range %s: zoned address", fe, p)
		}
		if p.Addr().Is4() != fe.Addr.Is4() {
			return nil, invalid("%s: source range %s is of another address family", fe, p)
		}
		out = append(out, p.Masked())
	}
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out), nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// SameService reports whether two Services program the maps alike: equal
// after normalization, RevNatID ignored. Invalid Services compare by their
// fields as given.
func SameService(a, b Service) bool {
	if na, err := normalize(a); err == nil {
		a = na
	}
	if nb, err := normalize(b); err == nil {
		b = nb
	}
	return a.Frontend == b.Frontend && a.Affinity == b.Affinity && a.External == b.External &&
		a.LocalOnly == b.LocalOnly && a.Maglev == b.Maglev &&
		slices.Equal(a.Backends, b.Backends) && slices.Equal(a.SourceRanges, b.SourceRanges)
}

func normalizeFrontend(fe Frontend) Frontend {
	fe.Addr = fe.Addr.Unmap()
	return fe
}

// hashSeed keys ServiceHash for the life of the process (hashes are never
// stored).
var hashSeed = maphash.MakeSeed()

// ServiceHash is a 64-bit digest of what SameService compares: two Services
// that are the same have the same hash, and different ones differ but with
// probability 2^-64. It lets a caller remember what it wrote in 8 bytes per
// frontend instead of a copy of the Service.
func ServiceHash(s Service) uint64 {
	if n, err := normalize(s); err == nil {
		s = n
	}
	var h maphash.Hash
	h.SetSeed(hashSeed)
	var b [16 + 2 + 1 + 1 + 8 + 3]byte
	put := func(a netip.Addr, port uint16) {
		a16 := a.As16()
		copy(b[:16], a16[:])
		binary.LittleEndian.PutUint16(b[16:], port)
	}
	put(s.Frontend.Addr, s.Frontend.Port)
	b[18], b[19] = byte(s.Frontend.Proto), byte(s.Frontend.Scope)
	binary.LittleEndian.PutUint64(b[20:], uint64(s.Affinity))
	b[28], b[29], b[30] = boolByte(s.External), boolByte(s.LocalOnly), boolByte(s.Maglev)
	_, _ = h.Write(b[:])
	for _, be := range s.Backends {
		put(be.Addr, be.Port)
		b[18] = boolByte(be.Local)
		_, _ = h.Write(b[:19])
	}
	_ = h.WriteByte(0xff) // backends end here
	for _, p := range s.SourceRanges {
		put(p.Addr(), uint16(p.Bits()))
		_, _ = h.Write(b[:18])
	}
	return h.Sum64()
}

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

// affinitySeconds rounds up to whole seconds.
func affinitySeconds(d time.Duration) int64 {
	if d <= 0 {
		return 0
	}
	return int64((d + time.Second - 1) / time.Second)
}

// SortServices sorts by frontend.
func SortServices(svcs []Service) {
	slices.SortFunc(svcs, func(a, b Service) int { return a.Frontend.Compare(b.Frontend) })
}

// Flags names the datapath flags of a Service besides affinity, in the
// order Format shows them: "ext", "local", "src=P1,P2", "maglev".
func (s Service) Flags() []string {
	var out []string
	if s.External {
		out = append(out, "ext")
	}
	if s.LocalOnly {
		out = append(out, "local")
	}
	if len(s.SourceRanges) > 0 {
		ps := make([]string, len(s.SourceRanges))
		for i, p := range s.SourceRanges {
			ps[i] = p.String()
		}
		out = append(out, "src="+strings.Join(ps, ","))
	}
	if s.Maglev {
		out = append(out, "maglev")
	}
	return out
}

// Format renders Services one per line, the form used by golden tests and
// `kpfree-agent services`. Ids are left out: they depend on history. After
// the frontend ("@ext": the external scope) come the flags: ext (tc serves
// it), local (externalTrafficPolicy Local: no SNAT), src= (allowed client
// prefixes), maglev, affinity=; backends on this node say "(local)".
//
//	SVC 10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.2.7:8080(local)
//	SVC 10.96.0.11:53/UDP affinity=10800s -> 10.244.1.9:53
//	SVC 192.0.2.10:80/TCP@ext ext local src=10.0.0.0/8 maglev -> 10.244.2.7:8080(local)
//	SVC [fd00::10]:80/TCP -> none (refused)
func Format(svcs []Service) string {
	var b strings.Builder
	for _, s := range svcs {
		b.WriteString("SVC ")
		b.WriteString(s.Frontend.String())
		for _, f := range s.Flags() {
			b.WriteString(" " + f)
		}
		if s.Affinity > 0 {
			fmt.Fprintf(&b, " affinity=%ds", affinitySeconds(s.Affinity))
		}
		b.WriteString(" ->")
		if len(s.Backends) == 0 {
			b.WriteString(" none (refused)")
		}
		for _, be := range s.Backends {
			b.WriteByte(' ')
			b.WriteString(be.String())
		}
		b.WriteByte('\n')
	}
	return b.String()
}
