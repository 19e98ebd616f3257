// Package lbmap is the agent's only door to the socket load balancer's BPF
// maps: Services in, map entries out, and the other way round for Dump.
//
// It owns the byte order (byteorder.go is the one place that converts between
// netip/host order and the network-order map layout), the backend and
// rev-nat id allocation, and the write order. Every change is
// make-before-break: new backends first, then the service's slot entries,
// then its master entry with the new count, and only then the stale slots and
// backends, so the datapath never follows a slot to a missing backend.
//
// Two implementations share all of that logic: [New] over the pinned maps of
// a loaded datapath (bpf.MapSet), restoring its bookkeeping from them so a
// restarted agent continues where the last one stopped, and [NewFake], the same
// logic over in-memory maps, for unit tests of the layers above.
package lbmap

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"
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

// Frontend is a Service address: a ClusterIP (or other VIP), port and protocol.
type Frontend struct {
	Addr  netip.Addr
	Port  uint16
	Proto Proto
}

func (f Frontend) String() string {
	return netip.AddrPortFrom(f.Addr, f.Port).String() + "/" + f.Proto.String()
}

// Compare orders frontends by address, port, then protocol.
func (f Frontend) Compare(o Frontend) int {
	if c := f.Addr.Compare(o.Addr); c != 0 {
		return c
	}
	if f.Port != o.Port {
		return int(f.Port) - int(o.Port)
	}
	return int(f.Proto) - int(o.Proto)
}

// Backend is an endpoint address.
type Backend struct {
	Addr netip.Addr
	Port uint16
}

func (b Backend) String() string { return netip.AddrPortFrom(b.Addr, b.Port).String() }

// Service is one frontend and its backends.
type Service struct {
	Frontend Frontend
	// Backends in slot order; a backend may repeat (it then gets more slots).
	// No backends: the datapath refuses connections to the frontend at once.
	Backends []Backend
	// Affinity is the ClientIP session affinity timeout (whole seconds,
	// rounded up); 0 disables affinity.
	Affinity time.Duration
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
// addresses unmapped (the maps store both forms alike) and RevNatID cleared.
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
	if len(svc.Backends) > MaxBackends {
		return svc, invalid("%s: %d backends, at most %d", fe, len(svc.Backends), MaxBackends)
	}
	if svc.Affinity < 0 || affinitySeconds(svc.Affinity) > math.MaxUint32 {
		return svc, invalid("%s: affinity timeout %v out of range", fe, svc.Affinity)
	}
	out := Service{Frontend: fe, Affinity: svc.Affinity, Backends: make([]Backend, len(svc.Backends))}
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
	return out, nil
}

func normalizeFrontend(fe Frontend) Frontend {
	fe.Addr = fe.Addr.Unmap()
	return fe
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

// Format renders Services one per line, the form used by golden tests and
// `kpfree-agent services`. Ids are left out: they depend on history.
//
//	SVC 10.96.0.10:80/TCP -> 10.244.1.5:8080 10.244.2.7:8080
//	SVC 10.96.0.11:53/UDP affinity=10800s -> 10.244.1.9:53
//	SVC [fd00::10]:80/TCP -> none (refused)
func Format(svcs []Service) string {
	var b strings.Builder
	for _, s := range svcs {
		b.WriteString("SVC ")
		b.WriteString(s.Frontend.String())
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
