package preflight

import (
	"fmt"
	"strings"
	"time"
)

// HostFacts is one host's name and gathered facts, for CrossHost.
type HostFacts struct {
	Name  string
	Facts *Facts
}

// CrossHost runs the checks that compare hosts: unique node names, machine
// IDs and product UUIDs, and clock skew. Every host gets one finding per
// check. It is pure.
func CrossHost(hosts []HostFacts, opts Options) []Finding {
	var out []Finding
	for _, fs := range crossHost(hosts, opts.withDefaults()) {
		out = append(out, fs...)
	}
	return out
}

// crossHost returns the findings per host, in the order of hosts.
func crossHost(hosts []HostFacts, opts Options) [][]Finding {
	out := make([][]Finding, len(hosts))
	unique := func(check, what string, key func(*Facts) string, dup Status, remedy string) {
		groups := map[string][]string{}
		for _, h := range hosts {
			if k := key(h.Facts); k != "" {
				groups[k] = append(groups[k], h.Name)
			}
		}
		for i, h := range hosts {
			fd := Finding{Host: h.Name, Check: check, Status: Pass}
			k := key(h.Facts)
			switch {
			case k == "":
				fd.Seen = "no " + what + " to compare"
			case len(hosts) == 1:
				fd.Seen = fmt.Sprintf("%s %q; no other host to compare", what, k)
			case len(groups[k]) > 1:
				var others []string
				for _, n := range groups[k] {
					if n != h.Name {
						others = append(others, n)
					}
				}
				fd.Status, fd.Remedy = dup, remedy
				fd.Seen = fmt.Sprintf("%s %q is also on %s", what, k, strings.Join(others, ", "))
			default:
				fd.Seen = fmt.Sprintf("%s %q is unique among %d hosts", what, k, len(hosts))
			}
			out[i] = append(out[i], fd)
		}
	}
	unique(CheckHostnameUnique, "node name", func(f *Facts) string { return strings.ToLower(f.Hostname) }, Fail,
		"give every host its own hostname (hostnamectl set-hostname NAME): node names must be unique")
	unique(CheckMachineIDUnique, "machine ID", func(f *Facts) string { return f.MachineID }, Fail,
		"the hosts were cloned: on each clone run `rm /etc/machine-id && systemd-machine-id-setup`, then reboot")
	unique(CheckProductUUIDUnique, "product_uuid", func(f *Facts) string { return f.ProductUUID }, Warn,
		"cloned VMs share a product_uuid, which kubeadm requires to be unique: give each VM its own UUID in the hypervisor")

	for i := range hosts {
		out[i] = append(out[i], clockSkew(hosts, i, opts))
	}
	return out
}

// clockSkew judges host i's clock against every other host's. Each clock is
// known only within an interval (the SSH round trip and date's resolution),
// so a pair fails only when even the smallest possible difference exceeds
// SkewFail, and passes only when even the largest is within SkewWarn. A bad
// pair shows on both hosts; the one that disagrees with every other host
// (of three or more) is named as the odd one out.
func clockSkew(hosts []HostFacts, i int, opts Options) Finding {
	h := hosts[i]
	fd := Finding{Host: h.Name, Check: CheckClockSkew}
	const remedy = "run time sync (chronyd or systemd-timesyncd, same servers) on every host: etcd, certificates and tokens need agreeing clocks"
	if !h.Facts.Clock.Valid {
		fd.Status = Warn
		fd.Seen = "could not read the host's clock (date +%s.%N)"
		fd.Remedy = "check that `date +%s` works on the host"
		return fd
	}
	loI, hiI := h.Facts.Clock.Offset()
	self := "offset to this machine " + fmtInterval(loI, hiI)

	fd.Status = Pass
	var bad []string
	others, largest, largestTo := 0, time.Duration(-1), ""
	for j, o := range hosts {
		if j == i || !o.Facts.Clock.Valid {
			continue
		}
		others++
		st, lo, hi := pairSkew(h.Facts.Clock, o.Facts.Clock, opts)
		if st.rank() > fd.Status.rank() {
			fd.Status = st
		}
		if st != Pass {
			bad = append(bad, fmt.Sprintf("%s by %s", o.Name, fmtInterval(lo, hi)))
		}
		if m := max(abs(lo), abs(hi)); m > largest {
			largest, largestTo = m, fmt.Sprintf("%s, %s", o.Name, fmtInterval(lo, hi))
		}
	}
	switch {
	case others == 0:
		fd.Seen = "no other host to compare; " + self
	case fd.Status == Pass:
		fd.Seen = fmt.Sprintf("within %s of every other host (largest: %s); %s", opts.SkewWarn, largestTo, self)
	default:
		fd.Remedy = remedy
		fd.Seen = fmt.Sprintf("clock differs from %s (warn above %s, fail above %s)", strings.Join(bad, ", "), opts.SkewWarn, opts.SkewFail)
		if others >= 2 && len(bad) == others {
			fd.Seen += "; this host disagrees with every other host"
		}
	}
	return fd
}

// pairSkew bounds clock a minus clock b to [lo, hi] and judges it.
func pairSkew(a, b Clock, opts Options) (st Status, lo, hi time.Duration) {
	loA, hiA := a.Offset()
	loB, hiB := b.Offset()
	lo, hi = loA-hiB, hiA-loB
	var minAbs time.Duration
	if lo > 0 || hi < 0 {
		minAbs = min(abs(lo), abs(hi))
	}
	switch {
	case minAbs > opts.SkewFail:
		return Fail, lo, hi
	case max(abs(lo), abs(hi)) > opts.SkewWarn:
		return Warn, lo, hi
	}
	return Pass, lo, hi
}

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// fmtInterval prints [lo, hi] as midpoint ± half-width, in seconds.
func fmtInterval(lo, hi time.Duration) string {
	mid, half := (lo+hi)/2, (hi-lo)/2
	return fmt.Sprintf("%+.3fs ±%.3fs", mid.Seconds(), half.Seconds())
}
