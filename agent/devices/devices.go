// Package devices picks the network devices that carry traffic entering the
// node (they get the tc programs) and the addresses NodePorts are served on,
// and follows both as devices and addresses come and go.
//
// Everything happens in one network namespace: the caller's at the time of
// the call (the agent runs in the host's). Linux only; elsewhere Select and
// Watch fail with ErrUnsupported.
package devices

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"path"
	"slices"
	"strings"
)

// Device is one selected network device.
type Device struct {
	Name  string
	Index int
	// Addrs are the device's global unicast addresses (IPv4 and IPv6, scope
	// global), sorted (IPv4 first).
	Addrs []netip.Addr
	// NodeIPs are the Addrs that are also node IPs (Node.status.addresses).
	NodeIPs []netip.Addr
	// Reason says why the device was selected, e.g. "holds node IP
	// 198.18.0.11", "carries the IPv4 default route", "matches eth*".
	Reason string
}

// ErrUnsupported is returned by Select and Watch on systems without netlink.
var ErrUnsupported = errors.New("devices: selecting network devices needs Linux netlink")

// Equal reports whether d and o describe the same device with the same
// addresses and reason.
func (d Device) Equal(o Device) bool {
	return d.Name == o.Name && d.Index == o.Index && d.Reason == o.Reason &&
		slices.Equal(d.Addrs, o.Addrs) && slices.Equal(d.NodeIPs, o.NodeIPs)
}

// Equal reports whether two selections are the same.
func Equal(a, b []Device) bool {
	return slices.EqualFunc(a, b, func(x, y Device) bool { return x.Equal(y) })
}

// NodeAddrs returns the addresses NodePorts are served on: every address of
// the selected devices, sorted and without duplicates.
func NodeAddrs(devs []Device) []netip.Addr {
	var all []netip.Addr
	for _, d := range devs {
		all = append(all, d.Addrs...)
	}
	slices.SortFunc(all, compareAddr)
	return slices.Compact(all)
}

// SNATAddrs returns the source addresses to use for traffic leaving through
// dev: of each family the first node IP, else the first address; an
// invalid (zero) Addr when dev has no address of that family.
func SNATAddrs(dev Device) (v4, v6 netip.Addr) {
	for _, list := range [][]netip.Addr{dev.NodeIPs, dev.Addrs} {
		for _, a := range list {
			switch {
			case a.Is4() && !v4.IsValid():
				v4 = a
			case a.Is6() && !v6.IsValid():
				v6 = a
			}
		}
	}
	return v4, v6
}

// link is what selection needs to know about one device; the Linux part
// fills it from netlink, tests can build it by hand.
type link struct {
	name     string
	index    int
	up       bool
	loopback bool
	// enslaved: a bridge port or bond member (its addresses, if any, are
	// not where traffic is received).
	enslaved     bool
	addrs        []netip.Addr // global unicast, scope global
	defaultRoute []string     // "IPv4", "IPv6": families whose default route leaves through it
}

// choose is the pure selection: spec empty = auto, else names and globs.
func choose(links []link, spec []string, nodeIPs []netip.Addr) ([]Device, error) {
	slices.SortFunc(links, func(a, b link) int { return cmp.Compare(a.name, b.name) })
	isNodeIP := map[netip.Addr]bool{}
	for _, ip := range nodeIPs {
		isNodeIP[ip.Unmap()] = true
	}
	mk := func(l link, reason string) Device {
		d := Device{Name: l.name, Index: l.index, Addrs: slices.Clone(l.addrs), Reason: reason}
		slices.SortFunc(d.Addrs, compareAddr)
		for _, a := range d.Addrs {
			if isNodeIP[a] {
				d.NodeIPs = append(d.NodeIPs, a)
			}
		}
		return d
	}

	var out []Device
	if len(spec) == 0 {
		for _, l := range links {
			if !l.up || l.loopback || l.enslaved || len(l.addrs) == 0 {
				continue
			}
			d := mk(l, "")
			switch {
			case len(d.NodeIPs) > 0:
				d.Reason = "holds node IP " + d.NodeIPs[0].String()
			case len(l.defaultRoute) > 0:
				d.Reason = "carries the " + strings.Join(l.defaultRoute, " and ") + " default route"
			default:
				continue
			}
			out = append(out, d)
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("devices: no device is up with a global address and holds a node IP %v or carries a default route; name the devices explicitly (existing: %s)",
				nodeIPs, names(links))
		}
		return out, nil
	}

	picked := map[string]bool{}
	var missing []string
	for _, pattern := range spec {
		if _, err := path.Match(pattern, ""); err != nil {
			return nil, fmt.Errorf("devices: bad device pattern %q: %v", pattern, err)
		}
		glob := strings.ContainsAny(pattern, `*?[\`)
		matched := false
		for _, l := range links {
			ok, _ := path.Match(pattern, l.name)
			if !ok {
				continue
			}
			// A glob takes what can receive traffic; a plain name is taken
			// as it is (the operator asked for it).
			if glob && (l.loopback || !l.up || l.enslaved) {
				continue
			}
			matched = true
			if picked[l.name] {
				continue
			}
			picked[l.name] = true
			reason := "named"
			if glob {
				reason = "matches " + pattern
			}
			out = append(out, mk(l, reason))
		}
		if !matched {
			missing = append(missing, pattern)
		}
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("devices: no device matches %s (globs take only devices that are up, not loopback, not enslaved); existing devices: %s",
			quoteAll(missing), names(links))
	}
	slices.SortFunc(out, func(a, b Device) int { return cmp.Compare(a.Name, b.Name) })
	return out, nil
}

func compareAddr(a, b netip.Addr) int { return a.Compare(b) }

func names(links []link) string {
	var n []string
	for _, l := range links {
		s := l.name
		if !l.up {
			s += " (down)"
		}
		n = append(n, s)
	}
	if len(n) == 0 {
		return "none"
	}
	return strings.Join(n, ", ")
}

func quoteAll(s []string) string {
	q := make([]string, len(s))
	for i, x := range s {
		q[i] = fmt.Sprintf("%q", x)
	}
	return strings.Join(q, ", ")
}
