//go:build linux

package podnet

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Apply makes this node (the caller's network namespace and file system)
// match the plan: it writes the configuration file when its content differs
// (atomically: a temporary file renamed over it), replaces the plan's routes
// and deletes the routes of RouteProtocol the plan does not hold. It returns
// what it changed. It needs CAP_NET_ADMIN and write access to the
// configuration directory.
func Apply(p Plan) ([]string, error) {
	var changed []string
	if len(p.ConfList) == 0 || p.ConfPath == "" {
		return nil, errors.New("podnet: plan has no configuration")
	}
	old, err := os.ReadFile(p.ConfPath)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if !bytes.Equal(old, p.ConfList) {
		if err := writeFile(p.ConfPath, p.ConfList); err != nil {
			return changed, err
		}
		changed = append(changed, "wrote "+p.ConfPath)
	}

	var errs []error
	want := map[netip.Prefix]bool{}
	for _, r := range p.Routes {
		want[r.Dst] = true
		cur, err := existing(r.Dst)
		if err == nil && cur == r.Via {
			continue
		}
		nr := &netlink.Route{Dst: ipNet(r.Dst), Gw: net.IP(r.Via.AsSlice()), Protocol: RouteProtocol}
		if err := netlink.RouteReplace(nr); err != nil {
			errs = append(errs, fmt.Errorf("route %s: %w", r, err))
			continue
		}
		changed = append(changed, "route "+r.String())
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, fmt.Errorf("list routes: %w", err))
			continue
		}
		for _, rt := range routes {
			dst, ok := prefixOf(rt.Dst)
			if !ok || want[dst] {
				continue
			}
			if err := netlink.RouteDel(&rt); err != nil {
				errs = append(errs, fmt.Errorf("delete stale route %s: %w", dst, err))
				continue
			}
			changed = append(changed, "deleted stale route "+dst.String())
		}
	}
	// Addresses of an earlier pod CIDR on the bridge make the bridge plugin
	// refuse new pods.
	if p.Bridge != "" {
		if link, err := netlink.LinkByName(p.Bridge); err == nil {
			addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
			if err != nil {
				errs = append(errs, fmt.Errorf("list the addresses of %s: %w", p.Bridge, err))
			}
			for _, a := range addrs {
				pfx, ok := prefixOf(a.IPNet)
				if !ok || a.Scope != unix.RT_SCOPE_UNIVERSE || slices.Contains(p.BridgeAddrs, pfx) {
					continue
				}
				if err := netlink.AddrDel(link, &a); err != nil {
					errs = append(errs, fmt.Errorf("delete stale address %s of %s: %w", pfx, p.Bridge, err))
					continue
				}
				changed = append(changed, fmt.Sprintf("deleted stale address %s of %s", pfx, p.Bridge))
			}
		}
	}
	return changed, errors.Join(errs...)
}

// existing returns the gateway of this package's route to dst, if any.
func existing(dst netip.Prefix) (netip.Addr, error) {
	fam := netlink.FAMILY_V4
	if dst.Addr().Is6() {
		fam = netlink.FAMILY_V6
	}
	routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Dst: ipNet(dst), Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_DST|netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil || len(routes) == 0 {
		return netip.Addr{}, errors.New("none")
	}
	gw, ok := netip.AddrFromSlice(routes[0].Gw)
	if !ok {
		return netip.Addr{}, errors.New("no gateway")
	}
	return gw.Unmap(), nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

func writeFile(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
