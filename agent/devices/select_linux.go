package devices

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Select returns the devices that receive traffic entering the node, in the
// current network namespace, sorted by name.
//
// spec empty (auto): every device that is up, not loopback, not a bridge
// port or bond member, has a global unicast address, and either holds one of
// nodeIPs (the Node's InternalIP/ExternalIP addresses) or carries a default
// route (IPv4 or IPv6, main table). Pod-side veths and bridges without a
// node IP or default route are left out.
//
// spec not empty: device names and shell globs ("eth*"). A plain name is
// taken whatever its state; a glob takes only devices that are up, not
// loopback and not enslaved. A name or glob that matches nothing is an error
// that names it and lists the devices that exist.
func Select(spec []string, nodeIPs []netip.Addr) ([]Device, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("devices: open netlink: %w", err)
	}
	defer h.Close()
	return selectWith(h, spec, nodeIPs)
}

func selectWith(h *netlink.Handle, spec []string, nodeIPs []netip.Addr) ([]Device, error) {
	var links []link
	var err error
	// A dump interrupted by a concurrent change is retried a few times.
	for range 5 {
		if links, err = readLinks(h, len(spec) == 0); !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("devices: read devices: %w", err)
	}
	return choose(links, spec, nodeIPs)
}

func readLinks(h *netlink.Handle, withRoutes bool) ([]link, error) {
	nls, err := h.LinkList()
	if err != nil {
		return nil, err
	}
	byIndex := map[int]*link{}
	links := make([]link, len(nls))
	for i, l := range nls {
		a := l.Attrs()
		links[i] = link{
			name:     a.Name,
			index:    a.Index,
			up:       a.Flags&net.FlagUp != 0,
			loopback: a.Flags&net.FlagLoopback != 0,
			enslaved: a.MasterIndex != 0,
		}
		byIndex[a.Index] = &links[i]
	}
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		l := byIndex[a.LinkIndex]
		if l == nil || a.IPNet == nil || a.Scope != unix.RT_SCOPE_UNIVERSE ||
			a.Flags&(unix.IFA_F_DADFAILED) != 0 {
			continue
		}
		ip, ok := netip.AddrFromSlice(a.IP)
		if ip = ip.Unmap(); !ok || !ip.IsGlobalUnicast() {
			continue
		}
		l.addrs = append(l.addrs, ip)
	}
	if !withRoutes {
		return links, nil
	}
	for _, fam := range []struct {
		family int
		name   string
	}{{netlink.FAMILY_V4, "IPv4"}, {netlink.FAMILY_V6, "IPv6"}} {
		routes, err := h.RouteListFiltered(fam.family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, err
		}
		for _, r := range routes {
			if r.Dst != nil {
				if ones, _ := r.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			if r.Type != unix.RTN_UNICAST {
				continue
			}
			idx := []int{r.LinkIndex}
			for _, nh := range r.MultiPath {
				idx = append(idx, nh.LinkIndex)
			}
			for _, i := range idx {
				if l := byIndex[i]; l != nil && !slices.Contains(l.defaultRoute, fam.name) {
					l.defaultRoute = append(l.defaultRoute, fam.name)
				}
			}
		}
	}
	return links, nil
}
