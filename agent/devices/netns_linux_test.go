package devices

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// requireRoot skips the tests that need a network namespace of their own.
func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root (creates a network namespace)")
	}
}

// newNetns creates an anonymous network namespace (nothing appears in
// `ip netns list`; it goes away with its last reference) and returns a
// handle to it.
func newNetns(t *testing.T) *os.File {
	t.Helper()
	type result struct {
		f   *os.File
		err error
	}
	c := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			c <- result{err: err}
			return
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
		c <- result{f, err}
	}()
	r := <-c
	if r.err != nil {
		t.Fatalf("create a network namespace: %v", r.err)
	}
	t.Cleanup(func() { r.f.Close() })
	return r.f
}

// inNetns runs fn on a thread moved into ns; the thread is never unlocked,
// so the runtime discards it afterwards.
func inNetns(ns *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// lab builds, inside ns:
//
//	eth0  up, 198.18.5.2/24 + 2001:db8:5::2/64, IPv4 default route   (peer0 up, no address)
//	eth1  up, 198.18.6.2/24 (the node IP)                           (peer1 up, no address)
//	eth2  down, 198.18.7.2/24, IPv4 route to 10.7.0.0/16           (peer2)
//	ll0   up, link-local only, IPv6 default route via fe80::1      (peerll up)
//	br0   bridge, up, 10.244.0.1/24 (a pod gateway)
func lab(t *testing.T, ns *os.File) {
	t.Helper()
	err := inNetns(ns, func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		for _, p := range [][2]string{{"eth0", "peer0"}, {"eth1", "peer1"}, {"eth2", "peer2"}, {"ll0", "peerll"}} {
			if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: p[0]}, PeerName: p[1]}); err != nil {
				return fmt.Errorf("add veth %s: %w", p[0], err)
			}
		}
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}); err != nil {
			return fmt.Errorf("add bridge: %w", err)
		}
		for dev, as := range map[string][]string{
			"eth0": {"198.18.5.2/24", "2001:db8:5::2/64"},
			"eth1": {"198.18.6.2/24"},
			"eth2": {"198.18.7.2/24"},
			"br0":  {"10.244.0.1/24"},
		} {
			for _, a := range as {
				if err := addAddr(dev, a); err != nil {
					return err
				}
			}
		}
		for _, n := range []string{"eth0", "peer0", "eth1", "peer1", "ll0", "peerll", "br0"} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return fmt.Errorf("set %s up: %w", n, err)
			}
		}
		eth0, _ := netlink.LinkByName("eth0")
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("198.18.5.1")}); err != nil {
			return fmt.Errorf("add IPv4 default route: %w", err)
		}
		ll0, _ := netlink.LinkByName("ll0")
		_, v6all, _ := net.ParseCIDR("::/0")
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: ll0.Attrs().Index, Dst: v6all, Gw: net.ParseIP("fe80::1")}); err != nil {
			return fmt.Errorf("add IPv6 default route: %w", err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("build the test namespace: %v", err)
	}
}

func addAddr(dev, cidr string) error {
	l, err := netlink.LinkByName(dev)
	if err != nil {
		return err
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	a.Flags = unix.IFA_F_NODAD
	if err := netlink.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add %s to %s: %w", cidr, dev, err)
	}
	return nil
}

func summary(devs []Device) string {
	var n []string
	for _, d := range devs {
		n = append(n, d.Name+"="+fmt.Sprint(d.Addrs))
	}
	return strings.Join(n, " ")
}

func TestSelectInNetns(t *testing.T) {
	requireRoot(t)
	ns := newNetns(t)
	lab(t, ns)
	nodeIP := addrs("198.18.6.2")

	var auto, globbed, named []Device
	var unknownErr error
	err := inNetns(ns, func() (err error) {
		if auto, err = Select(nil, nodeIP); err != nil {
			return err
		}
		if globbed, err = Select([]string{"eth*"}, nil); err != nil {
			return err
		}
		if named, err = Select([]string{"eth2", "ll0"}, nil); err != nil {
			return err
		}
		_, unknownErr = Select([]string{"eth0", "wlan0"}, nil)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []Device{
		{Name: "eth0", Addrs: addrs("198.18.5.2", "2001:db8:5::2"), Reason: "carries the IPv4 default route"},
		{Name: "eth1", Addrs: addrs("198.18.6.2"), NodeIPs: nodeIP, Reason: "holds node IP 198.18.6.2"},
	}
	ignoreIndex := cmp.Transformer("noIndex", func(d Device) Device { d.Index = 0; return d })
	if diff := cmp.Diff(want, auto, cmpAddr, ignoreIndex); diff != "" {
		t.Errorf("auto selection (-want +got):\n%s", diff)
	}
	for _, d := range auto {
		if d.Index <= 1 {
			t.Errorf("%s: index %d", d.Name, d.Index)
		}
	}
	if got := summary(globbed); got != "eth0=[198.18.5.2 2001:db8:5::2] eth1=[198.18.6.2]" {
		t.Errorf("eth* selected %s; want eth0 and eth1 (eth2 is down)", got)
	}
	if got := summary(named); got != "eth2=[198.18.7.2] ll0=[]" {
		t.Errorf("named selection %s", got)
	}
	if unknownErr == nil || !strings.Contains(unknownErr.Error(), `no device matches "wlan0"`) ||
		!strings.Contains(unknownErr.Error(), "br0, eth0, eth1, eth2 (down), ll0, lo, peer0") {
		t.Errorf("unknown device: err = %v", unknownErr)
	}
}

func TestWatchInNetns(t *testing.T) {
	requireRoot(t)
	ns := newNetns(t)
	lab(t, ns)

	var nodeIPs atomic.Pointer[[]netip.Addr]
	first := addrs("198.18.6.2")
	nodeIPs.Store(&first)
	changes := make(chan []Device, 16)
	var mu sync.Mutex
	var errs []error
	w := &Watcher{
		NodeIPs:  func() []netip.Addr { return *nodeIPs.Load() },
		OnChange: func(d []Device) { changes <- d },
		OnError:  func(err error) { mu.Lock(); errs = append(errs, err); mu.Unlock() },
		Debounce: 50 * time.Millisecond,
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inNetns(ns, func() error { return w.Run(ctx) }) }()
	defer func() {
		cancel()
		if err := <-done; err != context.Canceled {
			t.Errorf("Run returned %v, want context.Canceled", err)
		}
		mu.Lock()
		defer mu.Unlock()
		if len(errs) > 0 {
			t.Errorf("OnError got %v", errs)
		}
	}()

	next := func(what string) []Device {
		t.Helper()
		select {
		case d := <-changes:
			return d
		case err := <-done:
			t.Fatalf("%s: Run ended: %v", what, err)
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: no change reported in 5s", what)
		}
		return nil
	}
	quiet := func(what string) {
		t.Helper()
		select {
		case d := <-changes:
			t.Errorf("%s: unexpected change reported: %s", what, summary(d))
		case <-time.After(400 * time.Millisecond):
		}
	}
	run := func(fn func() error) {
		t.Helper()
		if err := inNetns(ns, fn); err != nil {
			t.Fatal(err)
		}
	}

	if got := summary(next("first selection")); got != "eth0=[198.18.5.2 2001:db8:5::2] eth1=[198.18.6.2]" {
		t.Fatalf("first selection: %s", got)
	}

	run(func() error { return addAddr("eth0", "198.18.5.3/24") })
	if got := summary(next("address added")); got != "eth0=[198.18.5.2 198.18.5.3 2001:db8:5::2] eth1=[198.18.6.2]" {
		t.Errorf("after adding 198.18.5.3 to eth0: %s", got)
	}

	// A change that does not alter the selection reports nothing.
	run(func() error { return addAddr("peer0", "198.18.9.2/24") })
	quiet("address on an unselected device")

	// The node IPs move to peer0: Trigger makes the watcher see it.
	moved := addrs("198.18.9.2")
	nodeIPs.Store(&moved)
	w.Trigger()
	if got := summary(next("node IPs changed")); got != "eth0=[198.18.5.2 198.18.5.3 2001:db8:5::2] peer0=[198.18.9.2]" {
		t.Errorf("after the node IP moved to peer0: %s", got)
	}

	// The default route's device goes down.
	run(func() error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return netlink.LinkSetDown(l)
	})
	if got := summary(next("link down")); got != "peer0=[198.18.9.2]" {
		t.Errorf("after eth0 went down: %s", got)
	}
}
