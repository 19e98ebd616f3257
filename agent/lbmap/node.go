package lbmap

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/kpfree/kpfree/bpf"
)

// This file holds the agent's helpers for the tc datapath's other maps:
// kpf_devices (written), kpf_stats and kpf_ct (read, and expired conntrack
// entries removed). Byte order is converted here as everywhere in lbmap.

// DeviceAddrs are the node addresses tc uses as SNAT source on one device;
// a zero address leaves that family un-SNATed there.
type DeviceAddrs struct {
	V4 netip.Addr // IPv4, or zero
	V6 netip.Addr // IPv6 (not IPv4-mapped), or zero
}

// WriteDevices makes kpf_devices hold exactly devs (ifindex -> addresses):
// the new entries are written first, then the ones not in devs deleted.
func WriteDevices(m *ebpf.Map, devs map[int]DeviceAddrs) error {
	if m == nil {
		return fmt.Errorf("lbmap: map %s missing", bpf.MapDevices)
	}
	vals := make(map[uint32]bpf.DevVal, len(devs))
	for ifindex, d := range devs {
		if ifindex <= 0 || int64(ifindex) > int64(^uint32(0)) {
			return fmt.Errorf("lbmap: device ifindex %d out of range", ifindex)
		}
		if d.V4.IsValid() && !d.V4.Unmap().Is4() {
			return fmt.Errorf("lbmap: device %d: V4 address %s is not IPv4", ifindex, d.V4)
		}
		if d.V6.IsValid() && (!d.V6.Is6() || d.V6.Is4In6() || d.V6.Zone() != "") {
			return fmt.Errorf("lbmap: device %d: V6 address %s is not an unzoned IPv6 address", ifindex, d.V6)
		}
		vals[uint32(ifindex)] = bpf.DevVal{Addr4: ipv4ToMap(d.V4), Addr6: ipv6ToMap(d.V6)}
	}
	if len(vals) > int(m.MaxEntries()) {
		return &MapFullError{Map: bpf.MapDevices, Need: len(vals), Cap: int(m.MaxEntries())}
	}
	var stale []uint32
	err := iterate(m, func(k uint32, _ bpf.DevVal) {
		if _, ok := vals[k]; !ok {
			stale = append(stale, k)
		}
	})
	if err != nil {
		return fmt.Errorf("lbmap: read %s: %w", bpf.MapDevices, err)
	}
	for k, v := range vals {
		if err := put(m, bpf.MapDevices, &k, &v); err != nil {
			return fmt.Errorf("lbmap: device %d: %w", k, err)
		}
	}
	for _, k := range stale {
		if err := del(m, bpf.MapDevices, &k); err != nil {
			return fmt.Errorf("lbmap: device %d: %w", k, err)
		}
	}
	return nil
}

// ReadDevices returns what kpf_devices holds.
func ReadDevices(m *ebpf.Map) (map[int]DeviceAddrs, error) {
	out := map[int]DeviceAddrs{}
	err := iterate(m, func(k uint32, v bpf.DevVal) {
		var d DeviceAddrs
		if v.Addr4 != 0 {
			d.V4 = ipv4FromMap(v.Addr4)
		}
		if v.Addr6 != ([4]uint32{}) {
			d.V6 = ipv6FromMap(v.Addr6)
		}
		out[int(k)] = d
	})
	if err != nil {
		return nil, fmt.Errorf("lbmap: read %s: %w", bpf.MapDevices, err)
	}
	return out, nil
}

// ReadStats sums the per-CPU counters of kpf_stats, keyed by bpf.StatNames.
func ReadStats(m *ebpf.Map) (map[string]uint64, error) {
	if m == nil {
		return nil, fmt.Errorf("lbmap: map %s missing", bpf.MapStats)
	}
	out := make(map[string]uint64, bpf.StatMax)
	for i := bpf.Stat(0); i < bpf.StatMax; i++ {
		var per []uint64
		k := uint32(i)
		if err := m.Lookup(&k, &per); err != nil {
			return nil, fmt.Errorf("lbmap: read %s[%s]: %w", bpf.MapStats, bpf.StatNames[i], err)
		}
		var sum uint64
		for _, v := range per {
			sum += v
		}
		out[bpf.StatNames[i]] = sum
	}
	return out, nil
}

// CTType is ct_key.type: which direction and stage an entry tracks.
type CTType uint8

// Conntrack entry types (CT_* in bpf/kpf_maps.h).
const (
	CTFwd       CTType = bpf.CTFwd
	CTOut       CTType = bpf.CTOut
	CTReplySNAT CTType = bpf.CTReplySNAT
	CTReply     CTType = bpf.CTReply
)

func (t CTType) String() string {
	switch t {
	case CTFwd:
		return "fwd"
	case CTOut:
		return "out"
	case CTReplySNAT:
		return "reply-snat"
	case CTReply:
		return "reply"
	}
	return fmt.Sprintf("type%d", uint8(t))
}

// CTEntry is one decoded kpf_ct entry.
type CTEntry struct {
	Type  CTType
	Proto Proto
	Src   netip.AddrPort // the packet's source as seen at the hook
	Dst   netip.AddrPort
	// To is the translation: the backend (fwd), the SNAT address (out), the
	// real client (reply-snat) or the frontend (reply).
	To        netip.AddrPort
	Flags     uint8 // bpf.CTFlag*
	RevNatID  uint32
	BackendID uint32
	// Expires is the deadline on CLOCK_MONOTONIC (bpf_ktime_get_ns), as
	// [MonotonicNow] returns it.
	Expires time.Duration
}

// MonotonicNow is CLOCK_MONOTONIC, the clock of ct_val.expires.
func MonotonicNow() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("lbmap: clock_gettime(CLOCK_MONOTONIC): %w", err)
	}
	return time.Duration(ts.Nano()), nil
}

func ctDecode(k bpf.CTKey, v bpf.CTVal) CTEntry {
	return CTEntry{
		Type:      CTType(k.Type),
		Proto:     Proto(k.Proto),
		Src:       netip.AddrPortFrom(addrFromMap(k.Saddr), portFromMap(k.Sport)),
		Dst:       netip.AddrPortFrom(addrFromMap(k.Daddr), portFromMap(k.Dport)),
		To:        netip.AddrPortFrom(addrFromMap(v.Addr), portFromMap(v.Port)),
		Flags:     v.Flags,
		RevNatID:  v.RevNatId,
		BackendID: v.BackendId,
		Expires:   time.Duration(v.Expires),
	}
}

// DumpConntrack reads kpf_ct, sorted by type, source and destination.
func DumpConntrack(m *ebpf.Map) ([]CTEntry, error) {
	if m == nil {
		return nil, fmt.Errorf("lbmap: map %s missing", bpf.MapCT)
	}
	var out []CTEntry
	if err := iterate(m, func(k bpf.CTKey, v bpf.CTVal) { out = append(out, ctDecode(k, v)) }); err != nil {
		return nil, fmt.Errorf("lbmap: read %s: %w", bpf.MapCT, err)
	}
	slices.SortFunc(out, func(a, b CTEntry) int {
		if a.Type != b.Type {
			return int(a.Type) - int(b.Type)
		}
		if c := a.Src.Compare(b.Src); c != 0 {
			return c
		}
		if c := a.Dst.Compare(b.Dst); c != 0 {
			return c
		}
		return int(a.Proto) - int(b.Proto)
	})
	return out, nil
}

// FormatConntrack renders entries one per line, with the time left until
// each expires relative to now (CLOCK_MONOTONIC):
//
//	CT fwd TCP 192.0.2.1:40000 -> 198.19.1.2:30080 => 10.244.1.5:8080 snat revnat=3 backend=5 expires=59s
func FormatConntrack(entries []CTEntry, now time.Duration) string {
	var b strings.Builder
	for _, e := range entries {
		fmt.Fprintf(&b, "CT %s %s %s -> %s => %s", e.Type, e.Proto, e.Src, e.Dst, e.To)
		for _, f := range []struct {
			bit  uint8
			name string
		}{{bpf.CTFlagSNAT, "snat"}, {bpf.CTFlagPending, "pending"}, {bpf.CTFlagClosing, "closing"}} {
			if e.Flags&f.bit != 0 {
				b.WriteString(" " + f.name)
			}
		}
		if e.RevNatID != 0 {
			fmt.Fprintf(&b, " revnat=%d", e.RevNatID)
		}
		if e.BackendID != 0 {
			fmt.Fprintf(&b, " backend=%d", e.BackendID)
		}
		if left := e.Expires - now; left > 0 {
			fmt.Fprintf(&b, " expires=%s\n", left.Round(time.Second))
		} else {
			b.WriteString(" expired\n")
		}
	}
	return b.String()
}

// GCConntrack deletes the kpf_ct entries that expired before now
// (CLOCK_MONOTONIC, see [MonotonicNow]) and returns how many it deleted and
// how many live ones it saw. The datapath treats expired entries as missing;
// removing them only frees room. Entries the kernel or the datapath removed
// meanwhile are no error.
func GCConntrack(m *ebpf.Map, now time.Duration) (deleted, live int, err error) {
	if m == nil {
		return 0, 0, fmt.Errorf("lbmap: map %s missing", bpf.MapCT)
	}
	var expired []bpf.CTKey
	err = iterate(m, func(k bpf.CTKey, v bpf.CTVal) {
		if time.Duration(v.Expires) < now {
			expired = append(expired, k)
		} else {
			live++
		}
	})
	if err != nil {
		return 0, live, fmt.Errorf("lbmap: read %s: %w", bpf.MapCT, err)
	}
	var errs []error
	for _, k := range expired {
		if err := m.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
			continue
		}
		deleted++
	}
	if len(errs) > 0 {
		return deleted, live, fmt.Errorf("lbmap: delete expired %s entries (%d failed): %w", bpf.MapCT, len(errs), errors.Join(errs...))
	}
	return deleted, live, nil
}
