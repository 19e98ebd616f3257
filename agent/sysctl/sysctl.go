// Package sysctl reserves the NodePort range in the kernel's
// ip_local_reserved_ports, so that no local socket is given an ephemeral
// port (bind to port 0, an unbound connect) inside the range and collides
// with a NodePort.
//
// net.ipv4.ip_local_reserved_ports is per network namespace (it applies to
// IPv4 and IPv6 sockets of that namespace), and /proc/sys/net shows the
// namespace of the thread that opens the file: the agent must call
// ReserveNodePortRange from the node's (host) network namespace.
// Reservation only keeps the kernel from choosing these ports; a program
// that binds one explicitly still gets it.
package sysctl

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ReservedPortsPath is ip_local_reserved_ports relative to /proc/sys.
const ReservedPortsPath = "net/ipv4/ip_local_reserved_ports"

// PortRange is an inclusive range of ports; a single port has Lo == Hi.
type PortRange struct{ Lo, Hi uint16 }

func (r PortRange) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

// ReserveNodePortRange adds lo-hi to procSys/net/ipv4/ip_local_reserved_ports
// (procSys is normally /proc/sys), keeping every port already reserved, and
// writes only when that changes the set. It reports whether it wrote.
// Call it from the network namespace whose ports are to be reserved.
func ReserveNodePortRange(procSys string, lo, hi uint16) (changed bool, err error) {
	if lo == 0 || lo > hi {
		return false, fmt.Errorf("sysctl: invalid NodePort range %d-%d: want 1 <= lo <= hi", lo, hi)
	}
	path := filepath.Join(procSys, ReservedPortsPath)
	old, err := os.ReadFile(path)
	if err != nil {
		return false, fmt.Errorf("sysctl: read reserved ports: %w", err)
	}
	have, err := ParsePorts(string(old))
	if err != nil {
		return false, fmt.Errorf("sysctl: %s: %w", path, err)
	}
	merged, changed := MergePorts(have, PortRange{lo, hi})
	if !changed {
		return false, nil
	}
	// O_TRUNC is harmless on procfs and needed for a regular file (tests).
	if err := os.WriteFile(path, []byte(FormatPorts(merged)+"\n"), 0o644); err != nil {
		return false, fmt.Errorf("sysctl: reserve NodePort range %d-%d in %s (needs root in the node's network namespace): %w", lo, hi, path, err)
	}
	return true, nil
}

// ParsePorts parses the kernel's list: ports and ranges separated by commas
// ("8080,30000-32767"), blanks and a trailing newline allowed, empty for
// none. The result is normalized (see Normalize).
func ParsePorts(s string) ([]PortRange, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var out []PortRange
	for _, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		lo, hi, isRange := strings.Cut(item, "-")
		l, err := parsePort(lo)
		if err != nil {
			return nil, fmt.Errorf("bad port list entry %q: %w", item, err)
		}
		h := l
		if isRange {
			if h, err = parsePort(hi); err != nil {
				return nil, fmt.Errorf("bad port list entry %q: %w", item, err)
			}
			if h < l {
				return nil, fmt.Errorf("bad port list entry %q: range ends before it starts", item)
			}
		}
		out = append(out, PortRange{l, h})
	}
	return Normalize(out), nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil {
		return 0, errors.New("not a port (0-65535)")
	}
	return uint16(n), nil
}

// Normalize sorts ranges and merges those that overlap or touch.
func Normalize(rs []PortRange) []PortRange {
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(a, b PortRange) int { return cmp.Or(cmp.Compare(a.Lo, b.Lo), cmp.Compare(a.Hi, b.Hi)) })
	var out []PortRange
	for _, r := range rs {
		if n := len(out); n > 0 && uint32(r.Lo) <= uint32(out[n-1].Hi)+1 {
			out[n-1].Hi = max(out[n-1].Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}

// MergePorts returns have with add included, normalized, and whether add
// reserved a port that have did not.
func MergePorts(have []PortRange, add PortRange) ([]PortRange, bool) {
	have = Normalize(have)
	for _, r := range have {
		if r.Lo <= add.Lo && add.Hi <= r.Hi {
			return have, false
		}
	}
	return Normalize(append(have, add)), true
}

// FormatPorts writes ranges as the kernel does: "8080,30000-32767".
func FormatPorts(rs []PortRange) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, ",")
}
