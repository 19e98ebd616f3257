//go:build linux

package bpf_test

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/bpf"
)

var (
	vip4 = netip.MustParseAddrPort("10.96.0.10:80")
	vip6 = netip.MustParseAddrPort("[fd00:96::10]:80")
)

// load loads the datapath into the env's bpffs and cgroup; the env's cleanup
// uninstalls everything (once, whatever the test reloaded).
func (e *env) load(opts bpf.Options) *bpf.Datapath {
	e.t.Helper()
	opts.PinDir, opts.CgroupPath, opts.AllowRootCgroup = e.pinDir, e.cgroup, e.atRoot
	dp, err := bpf.Load(opts)
	if err != nil {
		e.t.Fatalf("load: %v", err)
	}
	e.t.Cleanup(func() { dp.Close() })
	if !e.uninstallSet {
		e.uninstallSet = true
		e.t.Cleanup(func() {
			if err := bpf.Uninstall(e.pinDir, e.cgroup); err != nil {
				e.t.Errorf("uninstall: %v", err)
			}
		})
	}
	for _, w := range dp.Warnings {
		e.t.Logf("load warning: %s", w)
	}
	return dp
}

// probe runs bpf.Probe; the tests derive what to expect from it, not from
// the kernel version.
func probe(t *testing.T) bpf.Report {
	t.Helper()
	r, err := bpf.Probe()
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// requireAsProbed checks that the loader did what the probe (or opts.Report)
// implies: the same report; bpf_link mode unless forced or unavailable; every
// degraded feature either emulated (a helper) or the reason of a skipped
// program, and nothing else emulated or skipped. It returns the report.
func requireAsProbed(t *testing.T, dp *bpf.Datapath, opts bpf.Options) bpf.Report {
	t.Helper()
	var r bpf.Report
	if opts.Report != nil {
		r = *opts.Report
	} else {
		r = probe(t)
	}
	if !slices.Equal(dp.Report.Features, r.Features) {
		t.Fatalf("loader's report differs from the probe:\n%s\nvs\n%s", dp.Report, r)
	}
	wantMode := bpf.AttachLink
	if opts.ForceProgAttach || !r.Has(bpf.FeatCgroupLink) {
		wantMode = bpf.AttachProgAttach
	}
	if dp.Mode != wantMode {
		t.Fatalf("attach mode %s, want %s", dp.Mode, wantMode)
	}
	accounted := map[bpf.Feature]bool{}
	for _, f := range dp.Emulated {
		accounted[f] = true
	}
	for prog, why := range dp.Skipped {
		found := false
		for _, f := range r.Degraded() {
			if strings.HasPrefix(why, string(f.Feature)+" ") {
				accounted[f.Feature], found = true, true
			}
		}
		if !found {
			t.Fatalf("%s skipped for no degraded feature: %s", prog, why)
		}
	}
	for f := range accounted {
		if r.Has(f) {
			t.Fatalf("%s emulated or skipped although the probe found it", f)
		}
	}
	for _, f := range r.Degraded() {
		if f.Feature != bpf.FeatCgroupLink && !accounted[f.Feature] {
			t.Fatalf("degraded %s neither emulated nor skipped", f.Feature)
		}
	}
	if len(dp.Attached)+len(dp.Skipped) != len(bpf.ProgramNames()) {
		t.Fatalf("attached %v + skipped %v != %v", dp.Attached, dp.Skipped, bpf.ProgramNames())
	}
	t.Logf("as probed: mode %s, emulated %v, skipped %v", dp.Mode, dp.Emulated, dp.Skipped)
	return r
}

// requirePins checks the pins of the attach mode: prog-attach pins each
// attached program under progs/ and no link; bpf_link the reverse.
func (e *env) requirePins(dp *bpf.Datapath) {
	e.t.Helper()
	dir := filepath.Join(e.pinDir, bpf.PinVersion)
	progs, _ := readDirNames(filepath.Join(dir, "progs"))
	links, _ := readDirNames(filepath.Join(dir, "links"))
	want, none := &progs, links
	if dp.Mode == bpf.AttachLink {
		want, none = &links, progs
	}
	slices.Sort(*want)
	attached := slices.Sorted(slices.Values(dp.Attached))
	if !slices.Equal(*want, attached) || len(none) != 0 {
		e.t.Fatalf("%s mode: pinned progs %v, links %v; attached %v", dp.Mode, progs, links, dp.Attached)
	}
}

// attachModes: the default (bpf_link where the kernel has it, 5.7+) and the
// BPF_PROG_ATTACH path 4.19 needs, forced, so every kernel of the matrix
// translates real connections through both.
var attachModes = []struct {
	name  string
	force bool
}{{"default", false}, {"force_prog_attach", true}}

func forEachAttachMode(t *testing.T, fn func(t *testing.T, opts bpf.Options)) {
	for _, m := range attachModes {
		t.Run(m.name, func(t *testing.T) { fn(t, bpf.Options{ForceProgAttach: m.force}) })
	}
}

func mustMaps(t *testing.T, dp *bpf.Datapath) *lbmap.Table {
	t.Helper()
	m, err := lbmap.New(dp.Maps)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func svc(vip netip.AddrPort, p lbmap.Proto, backends ...netip.AddrPort) lbmap.Service {
	s := lbmap.Service{Frontend: lbmap.Frontend{Addr: vip.Addr(), Port: vip.Port(), Proto: p}, Backends: []lbmap.Backend{}}
	for _, b := range backends {
		s.Backends = append(s.Backends, lbmap.Backend{Addr: b.Addr(), Port: b.Port()})
	}
	return s
}

func upsert(t *testing.T, m lbmap.Maps, svcs ...lbmap.Service) {
	t.Helper()
	for _, s := range svcs {
		if err := m.Upsert(s); err != nil {
			t.Fatal(err)
		}
	}
}

func requireBoth(t *testing.T, as []attempt, names ...string) {
	t.Helper()
	got := replies(as)
	for _, n := range names {
		if got[n] == 0 {
			t.Fatalf("backend %s got no traffic: %v", n, got)
		}
	}
}

func requirePeer(t *testing.T, as []attempt, want string) {
	t.Helper()
	for i, a := range as {
		if a.Peer != want {
			t.Fatalf("attempt %d: peer %q, want %q (%+v)", i, a.Peer, want, a)
		}
	}
}

// requirePeerVIP checks the peer a translated socket reports: the VIP, where
// the getpeername hook of the socket's family is attached (5.8+), else the
// backend (documented). For unconnected UDP ("udp") it is the reply's source,
// which recvmsg (mandatory) always rewrites to the VIP.
func requirePeerVIP(t *testing.T, dp *bpf.Datapath, op string, as []attempt, vip string) {
	t.Helper()
	hook := "kpf_getpeer4"
	if op == "tcp6raw" || netip.MustParseAddrPort(vip).Addr().Is6() {
		hook = "kpf_getpeer6"
	}
	if op == "udp" || slices.Contains(dp.Attached, hook) {
		requirePeer(t, as, vip)
		return
	}
	for i, a := range as {
		if a.Peer == vip || a.Peer == "" {
			t.Fatalf("attempt %d: peer %q, want a backend (%s not attached)", i, a.Peer, hook)
		}
	}
}

func requireFastErrno(t *testing.T, as []attempt, errno string) {
	t.Helper()
	worst := 0.0
	defer func() { t.Logf("%d x %s, slowest after %.3f ms", len(as), errno, worst) }()
	for i, a := range as {
		worst = max(worst, a.Millis)
		if a.Errno != errno {
			t.Fatalf("attempt %d: %+v, want %s", i, a, errno)
		}
		if a.Millis >= 100 {
			t.Fatalf("attempt %d: failed after %.1f ms, want < 100 ms", i, a.Millis)
		}
	}
}

func TestIntegrationTCPv4(t *testing.T) {
	forEachAttachMode(t, func(t *testing.T, opts bpf.Options) {
		e := newEnv(t)
		a := e.tcpServer("A", "127.0.0.1:0")
		b := e.tcpServer("B", "127.0.0.2:0")
		dp := e.load(opts)
		requireAsProbed(t, dp, opts)
		e.requirePins(dp)
		m := mustMaps(t, dp)
		upsert(t, m, svc(vip4, lbmap.TCP, a, b))

		as := e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 40}, true)
		requireAllOK(t, as)
		requireBoth(t, as, "A", "B")
		requirePeerVIP(t, dp, "tcp", as, vip4.String()) // getpeername reports the VIP

		// A process outside the cgroup is not translated: in this netns the
		// VIP has no route.
		out := e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 3}, false)
		requireFastErrno(t, out, "ENETUNREACH")
		// ...while the backends themselves stay reachable for it.
		requireAllOK(t, e.run(clientReq{Op: "tcp", Addr: a.String(), N: 1}, false))

		// Another port on the VIP is not a Service: left alone.
		requireFastErrno(t, e.run(clientReq{Op: "tcp", Addr: "10.96.0.10:81", N: 1}, true), "ENETUNREACH")
	})
}

func TestIntegrationUDPv4(t *testing.T) {
	forEachAttachMode(t, func(t *testing.T, opts bpf.Options) {
		e := newEnv(t)
		a := e.udpServer("A", "127.0.0.1:0")
		b := e.udpServer("B", "127.0.0.2:0")
		dp := e.load(opts)
		requireAsProbed(t, dp, opts)
		e.requirePins(dp)
		m := mustMaps(t, dp)
		dns := netip.MustParseAddrPort("10.96.0.10:53")
		upsert(t, m, svc(dns, lbmap.UDP, a, b))

		// Unconnected: sendmsg4 translates, recvmsg4 makes the reply come from the VIP.
		as := e.run(clientReq{Op: "udp", Addr: dns.String(), N: 30}, true)
		requireAllOK(t, as)
		requireBoth(t, as, "A", "B")
		requirePeerVIP(t, dp, "udp", as, dns.String())

		// Connected: connect4 translates, getpeername4 reports the VIP.
		cs := e.run(clientReq{Op: "udpconn", Addr: dns.String(), N: 30}, true)
		requireAllOK(t, cs)
		requireBoth(t, cs, "A", "B")
		requirePeerVIP(t, dp, "udpconn", cs, dns.String())

		// The TCP port of the same address is another Service (none here).
		requireFastErrno(t, e.run(clientReq{Op: "tcp", Addr: "10.96.0.10:53", N: 1}, true), "ENETUNREACH")
	})
}

func TestIntegrationIPv6(t *testing.T) {
	forEachAttachMode(t, func(t *testing.T, opts bpf.Options) {
		e := newEnv(t)
		a := e.tcpServer("A", "[::1]:0")
		b := e.tcpServer("B", "[::1]:0")
		ua := e.udpServer("A", "[::1]:0")
		ub := e.udpServer("B", "[::1]:0")
		a4 := e.tcpServer("A4", "127.0.0.1:0")
		b4 := e.tcpServer("B4", "127.0.0.2:0")
		dp := e.load(opts)
		requireAsProbed(t, dp, opts)
		m := mustMaps(t, dp)
		dns6 := netip.AddrPortFrom(vip6.Addr(), 53)
		upsert(t, m, svc(vip6, lbmap.TCP, a, b), svc(dns6, lbmap.UDP, ua, ub), svc(vip4, lbmap.TCP, a4, b4))

		as := e.run(clientReq{Op: "tcp", Addr: vip6.String(), N: 40}, true)
		requireAllOK(t, as)
		requireBoth(t, as, "A", "B")
		requirePeerVIP(t, dp, "tcp", as, vip6.String())

		us := e.run(clientReq{Op: "udp", Addr: dns6.String(), N: 30}, true)
		requireAllOK(t, us)
		requireBoth(t, us, "A", "B")
		requirePeerVIP(t, dp, "udp", us, dns6.String())

		cs := e.run(clientReq{Op: "udpconn", Addr: dns6.String(), N: 10}, true)
		requireAllOK(t, cs)
		requirePeerVIP(t, dp, "udpconn", cs, dns6.String())

		// An AF_INET6 socket connecting to the IPv4-mapped VIP goes through
		// connect6 and reaches the IPv4 Service.
		mapped := "[::ffff:10.96.0.10]:80"
		ms := e.run(clientReq{Op: "tcp6raw", Addr: mapped, N: 30}, true)
		requireAllOK(t, ms)
		requireBoth(t, ms, "A4", "B4")
		requirePeerVIP(t, dp, "tcp6raw", ms, mapped)

		requireFastErrno(t, e.run(clientReq{Op: "tcp", Addr: vip6.String(), N: 1}, false), "ENETUNREACH")
	})
}

// refusalErrno is what a Service without backends gives: ECONNREFUSED where
// the programs can set it (bpf_set_retval, 5.18+), else the kernel's EPERM.
func refusalErrno(r bpf.Report) string {
	if r.Has(bpf.FeatHelperSetRetval) {
		return "ECONNREFUSED"
	}
	return "EPERM"
}

// requireRefused runs req in the cgroup: every attempt must fail with errno
// at once (< 100 ms) and nothing may leave: no SYN, no datagram.
func (e *env) requireRefused(req clientReq, errno string) {
	e.t.Helper()
	before := e.sent()
	as := e.run(req, true)
	after := e.sent()
	requireFastErrno(e.t, as, errno)
	if after != before {
		e.t.Fatalf("%s %s refused, yet sent: %+v before, %+v after", req.Op, req.Addr, before, after)
	}
}

// A Service with no backends refuses at once, inside the syscall; a deleted
// Service is no longer translated (and here, without a route, fails at once
// as well).
func TestIntegrationNoBackendsRefuses(t *testing.T) {
	e := newEnv(t)
	a := e.tcpServer("A", "127.0.0.1:0")
	ua := e.udpServer("UA", "127.0.0.1:0")
	dp := e.load(bpf.Options{})
	r := requireAsProbed(t, dp, bpf.Options{})
	m := mustMaps(t, dp)
	dns := netip.MustParseAddrPort("10.96.0.10:53")
	upsert(t, m, svc(vip4, lbmap.TCP), svc(dns, lbmap.UDP), svc(vip6, lbmap.TCP))

	refuseAll := func(errno string) {
		t.Helper()
		for _, req := range []clientReq{
			{Op: "tcp", Addr: vip4.String(), N: 5},
			{Op: "tcp", Addr: vip6.String(), N: 5},
			{Op: "udp", Addr: dns.String(), N: 5},
			{Op: "udpconn", Addr: dns.String(), N: 5},
		} {
			e.requireRefused(req, errno)
		}
	}
	want := refusalErrno(r)
	t.Logf("bpf_set_retval available: %v: refusal is %s", r.Has(bpf.FeatHelperSetRetval), want)
	refuseAll(want)

	// Backends appear: served. The counters see what was sent, so their
	// standing still above means something.
	before := e.sent()
	upsert(t, m, svc(vip4, lbmap.TCP, a), svc(dns, lbmap.UDP, ua))
	requireAllOK(t, e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 3}, true))
	requireAllOK(t, e.run(clientReq{Op: "udp", Addr: dns.String(), N: 3}, true))
	if after := e.sent(); after.SYNs < before.SYNs+3 || after.UDP4 < before.UDP4+3 {
		t.Fatalf("3 connections and 3 datagrams served, counters %+v -> %+v", before, after)
	}

	// Deleted: not translated any more.
	if err := m.Delete(svc(vip4, lbmap.TCP).Frontend); err != nil {
		t.Fatal(err)
	}
	requireFastErrno(t, e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 5}, true), "ENETUNREACH")

	// Without bpf_set_retval (< 5.18, emulated here on newer kernels): the
	// same refusal is EPERM. Reloading over the pins also exercises the link
	// update path.
	old := r.Without(bpf.FeatHelperSetRetval)
	dp.Close()
	dp = e.load(bpf.Options{Report: &old})
	requireAsProbed(t, dp, bpf.Options{Report: &old})
	if !slices.Contains(dp.Emulated, bpf.FeatHelperSetRetval) {
		t.Fatalf("emulated %v", dp.Emulated)
	}
	upsert(t, mustMaps(t, dp), svc(vip4, lbmap.TCP), svc(dns, lbmap.UDP))
	refuseAll("EPERM")
}

func monotonicNow(t *testing.T) uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return uint64(ts.Nano())
}

func affinityEntries(t *testing.T, m *ebpf.Map) map[bpf.AffKey]bpf.AffVal {
	t.Helper()
	out := map[bpf.AffKey]bpf.AffVal{}
	var k bpf.AffKey
	var v bpf.AffVal
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func onlyEntry(t *testing.T, m *ebpf.Map) (bpf.AffKey, bpf.AffVal) {
	t.Helper()
	es := affinityEntries(t, m)
	if len(es) != 1 {
		t.Fatalf("%d affinity entries, want 1: %+v", len(es), es)
	}
	for k, v := range es {
		return k, v
	}
	panic("unreachable")
}

func TestIntegrationAffinity(t *testing.T) {
	e := newEnv(t)
	a := e.tcpServer("A", "127.0.0.1:0")
	b := e.tcpServer("B", "127.0.0.2:0")
	dp := e.load(bpf.Options{})
	m := mustMaps(t, dp)
	s := svc(vip4, lbmap.TCP, a, b)
	s.Affinity = 5 * time.Second
	upsert(t, m, s)

	as := e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 20}, true)
	requireAllOK(t, as)
	if r := replies(as); len(r) != 1 {
		t.Fatalf("affinity did not pin the client: %v", r)
	}
	pinned := as[0].Reply
	// Another process of the same netns (same client) sticks to it too.
	as2 := e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 10}, true)
	if r := replies(as2); len(r) != 1 || as2[0].Reply != pinned {
		t.Fatalf("second client: %v, want all %s", r, pinned)
	}
	key, val := onlyEntry(t, dp.Maps.Affinity)
	if hasCookie := dp.Report.Has(bpf.FeatHelperNetnsCook); (key.ClientCookie != 0) != hasCookie {
		t.Fatalf("affinity key %+v, netns cookie available: %v", key, hasCookie)
	}
	if now := monotonicNow(t); now-val.LastUsed > uint64(5*time.Second) {
		t.Fatalf("last_used %d not recent (now %d)", val.LastUsed, now)
	}

	// Point the entry at the other backend: honoured while fresh...
	var other uint32
	var id uint32
	var bv bpf.BackendVal
	it := dp.Maps.Backends.Iterate()
	for it.Next(&id, &bv) {
		if id != val.BackendId {
			other = id
		}
	}
	otherName := map[string]string{"A": "B", "B": "A"}[pinned]
	if err := dp.Maps.Affinity.Put(&key, &bpf.AffVal{BackendId: other, LastUsed: monotonicNow(t)}); err != nil {
		t.Fatal(err)
	}
	if r := replies(e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 10}, true)); r[otherName] != 10 {
		t.Fatalf("fresh affinity entry not honoured: %v", r)
	}
	// ...ignored once older than the timeout (5 s), and then renewed.
	if now := monotonicNow(t); now > uint64(20*time.Second) {
		expired := now - uint64(10*time.Second)
		if err := dp.Maps.Affinity.Put(&key, &bpf.AffVal{BackendId: other, LastUsed: expired}); err != nil {
			t.Fatal(err)
		}
		requireAllOK(t, e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 1}, true))
		if _, v := onlyEntry(t, dp.Maps.Affinity); v.LastUsed < now {
			t.Fatalf("expired entry not renewed: %+v", v)
		}
	} else {
		t.Log("expiry not checked: the machine booted less than 20 s ago")
	}

	// ...and ignored when the backend left the Service, even though the
	// backend still exists for another Service.
	s.Backends = s.Backends[:0]
	for _, x := range []netip.AddrPort{a, b} {
		if (x == a) == (pinned == "A") {
			s.Backends = append(s.Backends, lbmap.Backend{Addr: x.Addr(), Port: x.Port()})
		}
	}
	otherBackend := map[string]netip.AddrPort{"A": b, "B": a}[pinned]
	upsert(t, m, s, svc(netip.MustParseAddrPort("10.96.0.11:80"), lbmap.TCP, otherBackend))
	if err := dp.Maps.Affinity.Put(&key, &bpf.AffVal{BackendId: other, LastUsed: monotonicNow(t)}); err != nil {
		t.Fatal(err)
	}
	if r := replies(e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 10}, true)); r[pinned] != 10 {
		t.Fatalf("affinity to a backend outside the Service honoured: %v", r)
	}

	// Without bpf_get_netns_cookie (< 5.7) affinity is per node: key 0.
	old := probe(t).Without(bpf.FeatHelperNetnsCook)
	dp.Close()
	dp = e.load(bpf.Options{Report: &old})
	s.Backends = []lbmap.Backend{{Addr: a.Addr(), Port: a.Port()}, {Addr: b.Addr(), Port: b.Port()}}
	upsert(t, mustMaps(t, dp), s)
	if err := dp.Maps.Affinity.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Fatal(err)
	}
	as3 := e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 20}, true)
	if r := replies(as3); len(r) != 1 {
		t.Fatalf("node-wide affinity did not pin: %v", r)
	}
	if k, _ := onlyEntry(t, dp.Maps.Affinity); k.ClientCookie != 0 {
		t.Fatalf("polyfilled netns cookie gave key %+v", k)
	}
}

// attachedCounts counts the programs attached to the cgroup per attach type.
func attachedCounts(t *testing.T, cgroup string) map[ebpf.AttachType]int {
	t.Helper()
	f, err := openDir(cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(f)
	out := map[ebpf.AttachType]int{}
	for _, at := range []ebpf.AttachType{
		ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
		ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP6Sendmsg,
		ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg,
		ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername,
	} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: f, Attach: at})
		if err != nil {
			t.Fatal(err)
		}
		out[at] = len(res.Programs)
	}
	return out
}

func openDir(p string) (int, error) {
	return unix.Open(p, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
}

func requireAttached(t *testing.T, cgroup string, want int, skip ...ebpf.AttachType) {
	t.Helper()
	for at, n := range attachedCounts(t, cgroup) {
		w := want
		for _, s := range skip {
			if s == at {
				w = 0
			}
		}
		if n != w {
			t.Fatalf("%v: %d programs attached, want %d", at, n, w)
		}
	}
}

// restartUnderLoad keeps a client connecting to the VIP while the agent
// restarts: Close, Load from the pins, restore lbmap from the maps, Sync.
func restartUnderLoad(t *testing.T, modes []bool) {
	e := newEnv(t)
	a := e.tcpServer("A", "127.0.0.1:0")
	b := e.tcpServer("B", "127.0.0.2:0")
	desired := []lbmap.Service{svc(vip4, lbmap.TCP, a, b)}
	dp := e.load(bpf.Options{ForceProgAttach: modes[0]})
	if err := mustMaps(t, dp).Sync(desired); err != nil {
		t.Fatal(err)
	}

	p := e.startClient(clientReq{Op: "tcploop", Addr: vip4.String(), N: 200000, Timeout: time.Second}, true)
	time.Sleep(150 * time.Millisecond)
	for i, force := range modes[1:] {
		dp.Close()
		dp = e.load(bpf.Options{ForceProgAttach: force})
		m := mustMaps(t, dp)
		got, err := m.Dump()
		if err != nil {
			t.Fatal(err)
		}
		if lbmap.Format(got) != lbmap.Format(desired) {
			t.Fatalf("restart %d: maps not restored:\n%s", i+1, lbmap.Format(got))
		}
		if err := m.Sync(desired); err != nil {
			t.Fatal(err)
		}
		requireAttached(t, e.cgroup, 1)
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	res := p.wait(t)
	t.Logf("%d connections through %d restarts, %d failed", res.OK+res.Fail, len(modes)-1, res.Fail)
	if res.Fail != 0 {
		t.Fatalf("%d failed connections, first: %+v", res.Fail, res.Attempts)
	}
	if res.OK < 100 {
		t.Fatalf("only %d connections made", res.OK)
	}
}

func TestIntegrationRestartLinkUpdate(t *testing.T) {
	restartUnderLoad(t, []bool{false, false, false, false, false, false})
}

func TestIntegrationRestartForceProgAttach(t *testing.T) {
	restartUnderLoad(t, []bool{true, true, true, true, true, true})
}

func TestIntegrationRestartSwitchAttachMode(t *testing.T) {
	restartUnderLoad(t, []bool{false, true, false, true, true, false})
}

// Kernels before 5.8 have no getpeername hooks: skipped with a reason, and a
// restart that loses them detaches the ones attached before.
func TestIntegrationWithoutGetpeername(t *testing.T) {
	e := newEnv(t)
	a := e.tcpServer("A", "127.0.0.1:0")
	dp := e.load(bpf.Options{})
	upsert(t, mustMaps(t, dp), svc(vip4, lbmap.TCP, a))
	requirePeerVIP(t, dp, "tcp", e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 2}, true), vip4.String())

	old := probe(t).Without(bpf.FeatGetpeername4, bpf.FeatGetpeername6)
	dp.Close()
	dp = e.load(bpf.Options{Report: &old})
	if len(dp.Skipped) != 2 || dp.Skipped["kpf_getpeer4"] == "" {
		t.Fatalf("skipped: %v", dp.Skipped)
	}
	t.Logf("skipped: %v", dp.Skipped)
	requireAttached(t, e.cgroup, 1, ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername)
	as := e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 2}, true)
	requireAllOK(t, as)
	requirePeer(t, as, a.String()) // the backend, as documented

	dp.Close()
	dp = e.load(bpf.Options{ForceProgAttach: true})
	requireAttached(t, e.cgroup, 1)
	requirePeerVIP(t, dp, "tcp", e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 2}, true), vip4.String())
}

// Detach leaves nothing attached and no pins.
func TestIntegrationDetach(t *testing.T) {
	for _, force := range []bool{false, true} {
		e := newEnv(t)
		a := e.tcpServer("A", "127.0.0.1:0")
		dp := e.load(bpf.Options{ForceProgAttach: force})
		upsert(t, mustMaps(t, dp), svc(vip4, lbmap.TCP, a))
		requireAllOK(t, e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 1}, true))
		if err := dp.Detach(); err != nil {
			t.Fatal(err)
		}
		requireAttached(t, e.cgroup, 0)
		requireFastErrno(t, e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 1}, true), "ENETUNREACH")
		// maps.debug and progs.debug come with every bpffs mount (bpf_preload).
		entries, err := readDirNames(e.pinDir)
		if err != nil || slices.Contains(entries, bpf.PinVersion) {
			t.Fatalf("pins left after Detach (force=%v): %v %v", force, entries, err)
		}
	}
}

// The same pins loaded for another cgroup: the old cgroup's links are
// dropped, not updated in place.
func TestIntegrationMoveCgroup(t *testing.T) {
	e := newEnv(t)
	a := e.tcpServer("A", "127.0.0.1:0")
	first := e.cgroup
	dp := e.load(bpf.Options{})
	upsert(t, mustMaps(t, dp), svc(vip4, lbmap.TCP, a))
	dp.Close()

	second := first + "-b"
	if err := os.Mkdir(second, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(second) })
	dp, err := bpf.Load(bpf.Options{PinDir: e.pinDir, CgroupPath: second})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	if len(dp.Warnings) == 0 {
		t.Error("moving the links to another cgroup gave no warning")
	}
	requireAttached(t, first, 0)
	requireAttached(t, second, 1)
	if err := bpf.Uninstall(e.pinDir, second); err != nil {
		t.Fatal(err)
	}
	requireAttached(t, second, 0)
}

// The BPF_PROG_ATTACH path (ForceProgAttach: what 4.19 needs) on every kernel,
// where a throwaway VM allows it: at the cgroup2 root when KPFREE_IN_VM=1
// (every process of the VM is translated), in a child cgroup anywhere else.
// TCP and UDP of both families, clients in the cgroup and in a descendant
// (BPF_F_ALLOW_MULTI programs apply to the subtree); Detach leaves it clean.
func TestIntegrationProgAttachRoot(t *testing.T) {
	e := newRootEnv(t)
	a := e.tcpServer("A", "127.0.0.1:0")
	b := e.tcpServer("B", "127.0.0.2:0")
	a6 := e.tcpServer("A6", "[::1]:0")
	ua := e.udpServer("UA", "127.0.0.1:0")
	ub := e.udpServer("UB", "127.0.0.2:0")
	ua6 := e.udpServer("UA6", "[::1]:0")
	ub6 := e.udpServer("UB6", "[::1]:0")
	opts := bpf.Options{ForceProgAttach: true}
	dp := e.load(opts)
	requireAsProbed(t, dp, opts)
	e.requirePins(dp)
	t.Logf("attached %v to %s (root: %v)", dp.Attached, e.cgroup, e.atRoot)

	dns := netip.MustParseAddrPort("10.96.0.10:53")
	dns6 := netip.AddrPortFrom(vip6.Addr(), 53)
	upsert(t, mustMaps(t, dp), svc(vip4, lbmap.TCP, a, b), svc(vip6, lbmap.TCP, a6),
		svc(dns, lbmap.UDP, ua, ub), svc(dns6, lbmap.UDP, ua6, ub6))

	for _, dir := range []string{e.cgroup, e.subCgroup()} {
		as := e.runIn(clientReq{Op: "tcp", Addr: vip4.String(), N: 20}, dir)
		requireAllOK(t, as)
		requireBoth(t, as, "A", "B")
		requirePeerVIP(t, dp, "tcp", as, vip4.String())

		as = e.runIn(clientReq{Op: "tcp", Addr: vip6.String(), N: 5}, dir)
		requireAllOK(t, as)
		requirePeerVIP(t, dp, "tcp", as, vip6.String())

		us := e.runIn(clientReq{Op: "udp", Addr: dns.String(), N: 20}, dir)
		requireAllOK(t, us)
		requireBoth(t, us, "UA", "UB")
		requirePeerVIP(t, dp, "udp", us, dns.String())

		us = e.runIn(clientReq{Op: "udpconn", Addr: dns.String(), N: 10}, dir)
		requireAllOK(t, us)
		requirePeerVIP(t, dp, "udpconn", us, dns.String())

		us = e.runIn(clientReq{Op: "udp", Addr: dns6.String(), N: 20}, dir)
		requireAllOK(t, us)
		requireBoth(t, us, "UA6", "UB6")
		requirePeerVIP(t, dp, "udp", us, dns6.String())
	}

	if err := dp.Detach(); err != nil {
		t.Fatal(err)
	}
	requireAttached(t, e.cgroup, 0)
	requireFastErrno(t, e.run(clientReq{Op: "tcp", Addr: vip4.String(), N: 1}, true), "ENETUNREACH")
}

// Every load path lifts RLIMIT_MEMLOCK itself where the kernel charges BPF
// memory to it (< 5.11): each one runs under the old 64 KiB default, whatever
// ran before it in this process.
func TestIntegrationMemlock(t *testing.T) {
	e := newEnv(t)
	var orig unix.Rlimit
	if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, nil, &orig); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, &orig, nil); err != nil {
			t.Errorf("restore memlock limit: %v", err)
		}
	})
	lower := func() {
		t.Helper()
		// The hard limit stays: raising it back needs CAP_SYS_RESOURCE.
		low := unix.Rlimit{Cur: min(64<<10, orig.Max), Max: orig.Max}
		if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, &low, nil); err != nil {
			t.Fatal(err)
		}
	}
	lifted := func() bool {
		t.Helper()
		var cur unix.Rlimit
		if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, nil, &cur); err != nil {
			t.Fatal(err)
		}
		return cur.Cur == unix.RLIM_INFINITY
	}
	lower()
	if err := bpf.RemoveMemlock(); err != nil {
		t.Fatal(err)
	}
	charged := lifted()
	_, kernel, err := bpf.KernelVersion()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s: BPF memory charged to RLIMIT_MEMLOCK (lifted): %v", kernel, charged)

	for _, p := range []struct {
		name string
		load func() error
	}{
		{"Probe", func() error { _, err := bpf.Probe(); return err }},
		{"NewMaps", func() error {
			m, err := bpf.NewMaps(bpf.MapSizes{})
			if err == nil {
				m.Close()
			}
			return err
		}},
		{"collection", func() error {
			spec, err := bpf.Spec(bpf.MapSizes{})
			if err != nil {
				return err
			}
			for _, m := range spec.Maps {
				m.Pinning = ebpf.PinNone
			}
			bpf.Polyfill(spec, probe(t))
			coll, err := bpf.NewCollection(spec, ebpf.CollectionOptions{})
			if err == nil {
				coll.Close()
			}
			return err
		}},
		{"Load", func() error {
			dp, err := bpf.Load(bpf.Options{PinDir: e.pinDir, CgroupPath: e.cgroup})
			if err != nil {
				return err
			}
			defer dp.Close()
			return dp.Detach()
		}},
	} {
		lower()
		if err := p.load(); err != nil {
			t.Errorf("%s under a 64 KiB memlock limit: %v", p.name, err)
		}
		if charged && !lifted() {
			t.Errorf("%s left the memlock limit at 64 KiB", p.name)
		}
	}
}
