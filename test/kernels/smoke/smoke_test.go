//go:build linux

package smoke

// Smoke tests for the kernel matrix: hand-assembled programs (no clang, no
// generated objects) for the two attach points kpfree's datapath relies on:
//
//   - cgroup/connect4 at the cgroup2 root, through bpf_link (link.AttachCgroup,
//     what cilium/ebpf picks on >= 5.7) and through BPF_PROG_ATTACH
//     (link.RawAttachProgram, the only way on 4.19) with each attach flag;
//   - sched_cls on lo through clsact + cls_bpf (netlink), and tcx where the
//     kernel has it (>= 6.6).
//
// They attach at the cgroup2 root, which on a real machine rewrites every
// process's connections, so they run only inside a kernel-matrix VM
// (KPFREE_IN_VM=1, set by test/kernels/vmrun).

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The ClusterIP the connect4 program rewrites.
var vip = netip4{10, 96, 0, 1}

const vipPort = 80

type netip4 [4]byte

func (a netip4) String() string { return net.IP(a[:]).String() }

// be32 is the value a 32-bit load of the address's network-order bytes gives
// on this (little-endian) machine: what the program compares and stores.
func (a netip4) be32() int32 { return int32(binary.LittleEndian.Uint32(a[:])) }

// bePort: bpf_sock_addr.user_port holds the port in network byte order in its
// low 16 bits.
func bePort(p int) int32 {
	return int32(binary.LittleEndian.Uint16([]byte{byte(p >> 8), byte(p)}))
}

var memlockOnce sync.Once

// inVM skips unless the test runs inside a kernel-matrix VM, and lifts the
// memlock limit (needed on kernels < 5.11, where BPF memory is charged to
// RLIMIT_MEMLOCK; a no-op on newer ones).
func inVM(t *testing.T) {
	t.Helper()
	if os.Getenv("KPFREE_IN_VM") != "1" {
		t.Skip("not in a kernel-matrix VM (KPFREE_IN_VM=1 unset): these tests attach BPF at the cgroup2 root, " +
			"which would rewrite the whole host's connections; run them with `make test-kernels`")
	}
	var err error
	memlockOnce.Do(func() { err = rlimit.RemoveMemlock() })
	if err != nil {
		t.Fatalf("rlimit.RemoveMemlock: %v", err)
	}
	t.Logf("kernel %s (KPFREE_VM_KERNEL=%s)", uname(), os.Getenv("KPFREE_VM_KERNEL"))
}

func uname() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "?"
	}
	return unix.ByteSliceToString(u.Release[:])
}

func cgroupRoot() string {
	if p := os.Getenv("KPFREE_VM_CGROUP2"); p != "" {
		return p
	}
	return "/sys/fs/cgroup"
}

// Offsets in struct bpf_sock_addr (include/uapi/linux/bpf.h).
const (
	offUserIP4  = 4
	offUserPort = 24
)

// connect4Prog rewrites connect(vip:80) to 127.0.0.1:backendPort.
func connect4Prog(t *testing.T, backendPort int) *ebpf.Program {
	t.Helper()
	insns := asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, offUserIP4, asm.Word),
		asm.JNE.Imm(asm.R2, vip.be32(), "out"),
		asm.LoadMem(asm.R2, asm.R1, offUserPort, asm.Word),
		asm.JNE.Imm(asm.R2, bePort(vipPort), "out"),
		// ctx stores must be 32-bit register stores (BPF_ST into ctx is refused).
		asm.Mov.Imm(asm.R2, netip4{127, 0, 0, 1}.be32()),
		asm.StoreMem(asm.R1, offUserIP4, asm.R2, asm.Word),
		asm.Mov.Imm(asm.R2, bePort(backendPort)),
		asm.StoreMem(asm.R1, offUserPort, asm.R2, asm.Word),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("out"), // 1 = allow
		asm.Return(),
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "kpfree_smoke_c4",
		Type:         ebpf.CGroupSockAddr,
		AttachType:   ebpf.AttachCGroupInet4Connect,
		Instructions: insns,
		License:      "Dual BSD/GPL",
	})
	if err != nil {
		t.Fatalf("load cgroup/connect4: %+v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

// echoListener accepts connections on 127.0.0.1 and echoes one line back,
// reporting each accepted peer.
func echoListener(t *testing.T) (port int, peers <-chan string) {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ch <- c.RemoteAddr().String()
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				buf := make([]byte, 64)
				n, _ := c.Read(buf)
				_, _ = c.Write(buf[:n])
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, ch
}

// dialVIP connects to vip:80 and exchanges a message. It returns the error of
// the connect (nil when the program redirected it).
func dialVIP(t *testing.T, peers <-chan string) error {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.Dial("tcp4", net.JoinHostPort(vip.String(), strconv.Itoa(vipPort)))
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := "kpfree-smoke\n"
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write through the VIP: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo through the VIP: %q, %v", buf, err)
	}
	select {
	case p := <-peers:
		if p != c.LocalAddr().String() {
			t.Fatalf("listener saw peer %s, client is %s", p, c.LocalAddr())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("listener accepted nothing")
	}
	t.Logf("connect(%s:%d) reached the listener; socket reports remote %s (no getpeername4 here)", vip, vipPort, c.RemoteAddr())
	return nil
}

// requireUnreachable checks that, without a program, the VIP goes nowhere:
// the VM has only lo, so connect fails at once.
func requireUnreachable(t *testing.T, when string) {
	t.Helper()
	d := net.Dialer{Timeout: 3 * time.Second}
	c, err := d.Dial("tcp4", net.JoinHostPort(vip.String(), strconv.Itoa(vipPort)))
	if err == nil {
		c.Close()
		t.Fatalf("%s: connect(%s:%d) succeeded without a program attached", when, vip, vipPort)
	}
	if !errors.Is(err, syscall.ENETUNREACH) {
		t.Logf("%s: connect failed with %v (expected ENETUNREACH)", when, err)
	}
}

func TestConnect4Link(t *testing.T) {
	inVM(t)
	port, peers := echoListener(t)
	prog := connect4Prog(t, port)
	requireUnreachable(t, "before attach")

	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupRoot(), Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
	if err != nil {
		t.Fatalf("link.AttachCgroup(%s): %v", cgroupRoot(), err)
	}
	// *link.linkCgroup = bpf_link (>= 5.7); *link.progAttachCgroup = the
	// BPF_PROG_ATTACH emulation cilium/ebpf falls back to.
	t.Logf("attached at %s via %T", cgroupRoot(), l)
	if err := dialVIP(t, peers); err != nil {
		l.Close()
		t.Fatalf("connect through the VIP: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("detach: %v", err)
	}
	requireUnreachable(t, "after detach")
}

// TestConnect4ProgAttach uses BPF_PROG_ATTACH directly, as the agent must on
// kernels without bpf_link for cgroups (4.19 .. 5.6), once per attach flag.
func TestConnect4ProgAttach(t *testing.T) {
	inVM(t)
	for _, tc := range []struct {
		name  string
		flags uint32
	}{
		{"none", 0},
		{"allow_override", unix.BPF_F_ALLOW_OVERRIDE},
		{"allow_multi", unix.BPF_F_ALLOW_MULTI},
	} {
		t.Run(tc.name, func(t *testing.T) {
			port, peers := echoListener(t)
			prog := connect4Prog(t, port)
			requireUnreachable(t, "before attach")
			cg, err := os.Open(cgroupRoot())
			if err != nil {
				t.Fatal(err)
			}
			defer cg.Close()
			opts := link.RawAttachProgramOptions{
				Target:  int(cg.Fd()),
				Program: prog,
				Attach:  ebpf.AttachCGroupInet4Connect,
				Flags:   tc.flags,
			}
			if err := link.RawAttachProgram(opts); err != nil {
				t.Fatalf("BPF_PROG_ATTACH flags=%#x: %v", tc.flags, err)
			}
			attached := true
			detach := func() error {
				if !attached {
					return nil
				}
				attached = false
				return link.RawDetachProgram(link.RawDetachProgramOptions{
					Target: int(cg.Fd()), Program: prog, Attach: ebpf.AttachCGroupInet4Connect,
				})
			}
			defer func() { _ = detach() }()
			if err := dialVIP(t, peers); err != nil {
				t.Fatalf("connect through the VIP: %v", err)
			}
			if err := detach(); err != nil {
				t.Fatalf("BPF_PROG_DETACH: %v", err)
			}
			requireUnreachable(t, "after detach")
		})
	}
}

// counterProg is a sched_cls program that counts packets in slot key of an
// array map and lets them pass.
func counterProg(t *testing.T, m *ebpf.Map, key int32) *ebpf.Program {
	t.Helper()
	insns := asm.Instructions{
		asm.StoreImm(asm.RFP, -4, int64(key), asm.Word),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, m.FD()),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, 0).WithSymbol("out"), // TC_ACT_OK
		asm.Return(),
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         fmt.Sprintf("kpfree_smoke_tc%d", key),
		Type:         ebpf.SchedCLS,
		Instructions: insns,
		License:      "Dual BSD/GPL",
	})
	if err != nil {
		t.Fatalf("load sched_cls: %+v", err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog
}

func counterMap(t *testing.T) *ebpf.Map {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "kpfree_smoke_ct", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 2})
	if err != nil {
		t.Fatalf("create array map: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func count(t *testing.T, m *ebpf.Map, key uint32) uint64 {
	t.Helper()
	var v uint64
	if err := m.Lookup(key, &v); err != nil {
		t.Fatalf("lookup %d: %v", key, err)
	}
	return v
}

// udpRoundTrip sends a few datagrams over lo.
func udpRoundTrip(t *testing.T) {
	t.Helper()
	srv, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	c, err := net.Dial("udp4", srv.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	for range 3 {
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, _, err := srv.ReadFrom(buf); err != nil {
			t.Fatalf("udp over lo: %v", err)
		}
	}
}

func TestSchedClsClsactLo(t *testing.T) {
	inVM(t)
	m := counterMap(t)
	ingress, egress := counterProg(t, m, 0), counterProg(t, m, 1)

	// BPF_PROG_TEST_RUN on a tc program.
	ret, err := ingress.Run(&ebpf.RunOptions{Data: make([]byte, 64)})
	if err != nil {
		t.Fatalf("BPF_PROG_TEST_RUN: %v", err)
	}
	if ret != 0 || count(t, m, 0) != 1 {
		t.Fatalf("BPF_PROG_TEST_RUN: ret %d, counter %d; want 0, 1", ret, count(t, m, 0))
	}
	if err := m.Put(uint32(0), uint64(0)); err != nil {
		t.Fatal(err)
	}

	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	qdisc := &netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
		LinkIndex: lo.Attrs().Index,
		Handle:    netlink.MakeHandle(0xffff, 0),
		Parent:    netlink.HANDLE_CLSACT,
	}}
	if err := netlink.QdiscAdd(qdisc); err != nil {
		t.Fatalf("add clsact qdisc on lo (sch_ingress): %v", err)
	}
	t.Cleanup(func() {
		if err := netlink.QdiscDel(qdisc); err != nil {
			t.Errorf("delete clsact: %v", err)
		}
	})
	for _, f := range []struct {
		parent uint32
		prog   *ebpf.Program
		name   string
	}{
		{netlink.HANDLE_MIN_INGRESS, ingress, "ingress"},
		{netlink.HANDLE_MIN_EGRESS, egress, "egress"},
	} {
		filter := &netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{
				LinkIndex: lo.Attrs().Index,
				Parent:    f.parent,
				Handle:    netlink.MakeHandle(0, 1),
				Protocol:  unix.ETH_P_ALL,
				Priority:  1,
			},
			Fd:           f.prog.FD(),
			Name:         "kpfree_smoke_" + f.name,
			DirectAction: true,
		}
		if err := netlink.FilterAdd(filter); err != nil {
			t.Fatalf("add cls_bpf filter at %s of lo: %v", f.name, err)
		}
		filters, err := netlink.FilterList(lo, f.parent)
		if err != nil {
			t.Fatalf("list filters: %v", err)
		}
		var found []string
		for _, x := range filters {
			if b, ok := x.(*netlink.BpfFilter); ok {
				found = append(found, fmt.Sprintf("%s(id %d, direct-action %v)", b.Name, b.Id, b.DirectAction))
			}
		}
		if len(found) != 1 || !strings.Contains(found[0], "direct-action true") {
			t.Fatalf("%s filters on lo: %v", f.name, found)
		}
		t.Logf("%s of lo: cls_bpf %v", f.name, found)
	}

	udpRoundTrip(t)
	in, eg := count(t, m, 0), count(t, m, 1)
	t.Logf("packets seen on lo: ingress %d, egress %d", in, eg)
	if in < 3 || eg < 3 {
		t.Fatalf("sched_cls counters: ingress %d, egress %d; want >= 3 each", in, eg)
	}
}

// TestTCX attaches through tcx links where the kernel has them (6.6+) and
// skips, saying so, where it does not.
func TestTCX(t *testing.T) {
	inVM(t)
	m := counterMap(t)
	prog := counterProg(t, m, 0)
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: lo.Attrs().Index, Program: prog, Attach: ebpf.AttachTCXIngress})
	if errors.Is(err, ebpf.ErrNotSupported) {
		t.Skipf("tcx is not supported by kernel %s (needs 6.6+): %v", uname(), err)
	}
	if err != nil {
		t.Fatalf("link.AttachTCX: %v", err)
	}
	defer l.Close()
	udpRoundTrip(t)
	if n := count(t, m, 0); n < 3 {
		t.Fatalf("tcx ingress counter %d, want >= 3", n)
	}
}
