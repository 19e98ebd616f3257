package lab

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const netnsDir = "/run/netns"

// ensureBridge creates the lab bridge with the gateway address, or checks the
// one a previous Up made. It refuses to share the subnet with any other
// interface of the host.
func (s *State) ensureBridge() error {
	gw := netip.PrefixFrom(s.Gateway, s.Subnet.Bits())
	if err := s.checkSubnetFree(); err != nil {
		return err
	}
	link, err := netlink.LinkByName(s.Bridge)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		br := &netlink.Bridge{LinkAttrs: netlink.NewLinkAttrs()}
		br.Name = s.Bridge
		// A bridge without a MAC of its own takes its lowest port's, and
		// changes it as ports come and go, leaving stale ARP entries in
		// the nodes.
		br.HardwareAddr = labMAC(macBridge, s.Gateway)
		if err := netlink.LinkAdd(br); err != nil {
			return fmt.Errorf("create bridge %s: %w", s.Bridge, err)
		}
		if link, err = netlink.LinkByName(s.Bridge); err != nil {
			return err
		}
		s.log("bridge %s created", s.Bridge)
	case err != nil:
		return fmt.Errorf("bridge %s: %w", s.Bridge, err)
	case link.Type() != "bridge":
		return fmt.Errorf("%s exists and is a %s, not the lab bridge", s.Bridge, link.Type())
	}
	addr := &netlink.Addr{IPNet: prefixToIPNet(gw)}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("address %s on %s: %w", gw, s.Bridge, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring up %s: %w", s.Bridge, err)
	}
	return nil
}

// checkSubnetFree fails when an interface other than the lab bridge has an
// address in the lab subnet: the lab would then steal its route.
func (s *State) checkSubnetFree() error {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return fmt.Errorf("list addresses: %w", err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok {
			continue
		}
		ones, _ := a.Mask.Size()
		p := netip.PrefixFrom(ip, ones).Masked()
		if !p.Overlaps(s.Subnet) {
			continue
		}
		link, err := netlink.LinkByIndex(a.LinkIndex)
		if err == nil && link.Attrs().Name == s.Bridge {
			continue
		}
		name := fmt.Sprint(a.LinkIndex)
		if err == nil {
			name = link.Attrs().Name
		}
		return fmt.Errorf("lab subnet %s overlaps %s on interface %s: choose another subnet", s.Subnet, p, name)
	}
	return nil
}

// deleteBridge removes the lab bridge if it exists.
func (s *State) deleteBridge() error {
	link, err := netlink.LinkByName(s.Bridge)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if link.Type() != "bridge" {
		return fmt.Errorf("%s is a %s, not the lab bridge: left alone", s.Bridge, link.Type())
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("delete bridge %s: %w", s.Bridge, err)
	}
	return nil
}

// createNetNS creates the node's named network namespace with iproute2, so
// that /run/netns is set up the way `ip netns` expects (users may well run
// `ip netns exec kpfree-node1 ...`).
func (s *State) createNetNS(ctx context.Context, n *Node) error {
	if _, err := os.Stat(n.NetNS); err == nil {
		return fmt.Errorf("netns %s exists already: another lab with prefix %q runs? (lab down its dir, or pick another prefix)", filepath.Base(n.NetNS), s.Prefix)
	}
	return run(ctx, "ip", "netns", "add", filepath.Base(n.NetNS))
}

// deleteNetNS unmounts and removes the node's netns file, as `ip netns del`.
// The namespace itself goes away with its last process.
func deleteNetNS(path string) error {
	if _, err := os.Lstat(path); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// wireNode creates the node's veth (eth0 inside, Veth on the bridge) and sets
// up addresses and the default route inside the node.
func (s *State) wireNode(n *Node) error {
	br, err := netlink.LinkByName(s.Bridge)
	if err != nil {
		return fmt.Errorf("bridge %s: %w", s.Bridge, err)
	}
	if err := deleteLink(n.Veth); err != nil {
		return err
	}
	ns, err := netns.GetFromPath(n.NetNS)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", n.NetNS, err)
	}
	defer ns.Close()
	// Fixed MACs: a rebuilt node answers for its address with the MAC the
	// host and the other nodes have cached.
	veth := &netlink.Veth{LinkAttrs: netlink.NewLinkAttrs(), PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns)),
		PeerHardwareAddr: labMAC(macNode, n.Address)}
	veth.Name = n.Veth
	veth.HardwareAddr = labMAC(macVeth, n.Address)
	veth.MasterIndex = br.Attrs().Index
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth %s: %w", n.Veth, err)
	}
	host, err := netlink.LinkByName(n.Veth)
	if err != nil {
		return err
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("bring up %s: %w", n.Veth, err)
	}

	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", n.NetNS, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("%s: lo up: %w", n.Name, err)
	}
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		return err
	}
	addr := &netlink.Addr{IPNet: prefixToIPNet(netip.PrefixFrom(n.Address, s.Subnet.Bits()))}
	if err := h.AddrReplace(eth0, addr); err != nil {
		return fmt.Errorf("%s: address %s: %w", n.Name, n.Address, err)
	}
	if err := h.LinkSetUp(eth0); err != nil {
		return fmt.Errorf("%s: eth0 up: %w", n.Name, err)
	}
	route := &netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.IP(s.Gateway.AsSlice())}
	if err := h.RouteReplace(route); err != nil {
		return fmt.Errorf("%s: default route via %s: %w", n.Name, s.Gateway, err)
	}
	return nil
}

// deleteLink deletes a root-namespace link (both ends of a veth) if it exists.
func deleteLink(name string) error {
	link, err := netlink.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if err := netlink.LinkDel(link); err != nil {
		return fmt.Errorf("delete link %s: %w", name, err)
	}
	return nil
}

// linkExists reports whether a root-namespace link called name exists.
func linkExists(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

// linksWithPrefix lists root-namespace links whose names start with prefix.
func linksWithPrefix(prefix string) []string {
	links, err := netlink.LinkList()
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return nil
	}
	var names []string
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, prefix) {
			names = append(names, l.Attrs().Name)
		}
	}
	return names
}

// Kinds of lab MACs: locally administered unicast 02:6b:KIND:<last three
// bytes of the IPv4 address>.
const (
	macBridge = 0x00
	macNode   = 0x01
	macVeth   = 0x02
)

func labMAC(kind byte, a netip.Addr) net.HardwareAddr {
	b := a.As4()
	return net.HardwareAddr{0x02, 0x6b, kind, b[1], b[2], b[3]}
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	bits := 32
	if p.Addr().Is6() {
		bits = 128
	}
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), bits)}
}
