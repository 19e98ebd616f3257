//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"strings"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// Feature names one kernel capability the datapath uses.
type Feature string

// The kernel features the socket load balancer needs or can use.
const (
	FeatProgSockAddr    Feature = "prog_type/cgroup_sock_addr"
	FeatConnect4        Feature = "attach/cgroup_inet4_connect"
	FeatConnect6        Feature = "attach/cgroup_inet6_connect"
	FeatSendmsg4        Feature = "attach/cgroup_udp4_sendmsg"
	FeatSendmsg6        Feature = "attach/cgroup_udp6_sendmsg"
	FeatRecvmsg4        Feature = "attach/cgroup_udp4_recvmsg"
	FeatRecvmsg6        Feature = "attach/cgroup_udp6_recvmsg"
	FeatGetpeername4    Feature = "attach/cgroup_inet4_getpeername"
	FeatGetpeername6    Feature = "attach/cgroup_inet6_getpeername"
	FeatMapHash         Feature = "map/hash"
	FeatMapLRUHash      Feature = "map/lru_hash"
	FeatHelperPrandom   Feature = "helper/bpf_get_prandom_u32"
	FeatHelperKtime     Feature = "helper/bpf_ktime_get_ns"
	FeatHelperSockCook  Feature = "helper/bpf_get_socket_cookie"
	FeatHelperNetnsCook Feature = "helper/bpf_get_netns_cookie"
	FeatHelperSetRetval Feature = "helper/bpf_set_retval"
	FeatCgroupLink      Feature = "link/cgroup"
	// Every map is created by Load, so the tc datapath's map types are
	// mandatory for the socket load balancer too.
	FeatMapLPMTrie     Feature = "map/lpm_trie"
	FeatMapPerCPUArray Feature = "map/percpu_array"
)

// The kernel features the tc datapath (NodePort, ExternalIPs, LoadBalancer;
// nodeport.c) needs or can use. They carry FeatureStatus.NodePort: a missing
// mandatory one refuses [Datapath.LoadNodePort] (Report.MissingForNodePort),
// not the socket load balancer.
const (
	FeatProgSchedCLS     Feature = "prog_type/sched_cls"
	FeatHelperLoadBytes  Feature = "helper/bpf_skb_load_bytes"
	FeatHelperStoreBytes Feature = "helper/bpf_skb_store_bytes"
	FeatHelperL3Csum     Feature = "helper/bpf_l3_csum_replace"
	FeatHelperL4Csum     Feature = "helper/bpf_l4_csum_replace"
	FeatHelperCsumDiff   Feature = "helper/bpf_csum_diff"
	FeatTCX              Feature = "link/tcx"
)

// FeatureStatus is the probe result for one feature.
type FeatureStatus struct {
	Feature   Feature
	Mandatory bool // the datapath cannot work without it
	// NodePort marks the features of the tc datapath only: Missing and
	// Degraded leave them out, MissingForNodePort and DegradedForNodePort
	// list them.
	NodePort  bool
	Kernel    string // first mainline kernel that has it
	Available bool
	// Effect says what changes when an optional feature is missing.
	Effect string
}

func (s FeatureStatus) String() string {
	state := "ok"
	switch {
	case !s.Available && s.Mandatory:
		state = "MISSING (needs Linux " + s.Kernel + ")"
	case !s.Available:
		state = "missing (Linux " + s.Kernel + "): " + s.Effect
	}
	return fmt.Sprintf("%-34s %s", s.Feature, state)
}

// Report is the outcome of [Probe].
type Report struct {
	Features []FeatureStatus
}

// Missing lists the unavailable mandatory features of the socket load
// balancer: [Load] refuses when this is not empty.
func (r Report) Missing() []FeatureStatus { return r.filter(false, true) }

// Degraded lists the socket load balancer's unavailable optional features,
// each with its effect.
func (r Report) Degraded() []FeatureStatus { return r.filter(false, false) }

// MissingForNodePort lists the unavailable mandatory features of the tc
// datapath: [Datapath.LoadNodePort] refuses when this is not empty. An agent
// that serves NodePorts in strict mode checks it beside Missing.
func (r Report) MissingForNodePort() []FeatureStatus { return r.filter(true, true) }

// DegradedForNodePort lists the tc datapath's unavailable optional features
// (tcx: clsact is used instead).
func (r Report) DegradedForNodePort() []FeatureStatus { return r.filter(true, false) }

func (r Report) filter(nodePort, mandatory bool) []FeatureStatus {
	var out []FeatureStatus
	for _, f := range r.Features {
		if f.NodePort == nodePort && f.Mandatory == mandatory && !f.Available {
			out = append(out, f)
		}
	}
	return out
}

// Has reports whether a feature is available.
func (r Report) Has(f Feature) bool {
	for _, s := range r.Features {
		if s.Feature == f {
			return s.Available
		}
	}
	return false
}

// Without returns a copy of the report in which the given features are
// unavailable: it makes the loader behave as on an older kernel (tests, and
// an operator's way to avoid a feature).
func (r Report) Without(fs ...Feature) Report {
	out := Report{Features: make([]FeatureStatus, len(r.Features))}
	copy(out.Features, r.Features)
	for i := range out.Features {
		for _, f := range fs {
			if out.Features[i].Feature == f {
				out.Features[i].Available = false
			}
		}
	}
	return out
}

func (r Report) String() string {
	var b strings.Builder
	for _, f := range r.Features {
		b.WriteString(f.String())
		b.WriteByte('\n')
	}
	return b.String()
}

// MissingError is returned by [Load] when a mandatory feature is missing.
type MissingError struct {
	Missing []FeatureStatus
}

func (e *MissingError) Error() string {
	names := make([]string, len(e.Missing))
	for i, f := range e.Missing {
		names[i] = fmt.Sprintf("%s (Linux %s)", f.Feature, f.Kernel)
	}
	return "kernel lacks mandatory BPF features: " + strings.Join(names, ", ")
}

func (e *MissingError) Is(target error) bool { return target == ebpf.ErrNotSupported }

type featureDef struct {
	feature   Feature
	mandatory bool
	nodePort  bool
	kernel    string
	effect    string
	probe     func() error
}

var featureDefs = []featureDef{
	{FeatProgSockAddr, true, false, "4.17", "", func() error { return features.HaveProgramType(ebpf.CGroupSockAddr) }},
	{FeatConnect4, true, false, "4.17", "", probeAttach(ebpf.AttachCGroupInet4Connect)},
	{FeatConnect6, true, false, "4.17", "", probeAttach(ebpf.AttachCGroupInet6Connect)},
	{FeatSendmsg4, true, false, "4.18", "", probeAttach(ebpf.AttachCGroupUDP4Sendmsg)},
	{FeatSendmsg6, true, false, "4.18", "", probeAttach(ebpf.AttachCGroupUDP6Sendmsg)},
	{FeatRecvmsg4, true, false, "5.2 or 4.19.57", "", probeAttach(ebpf.AttachCGroupUDP4Recvmsg)},
	{FeatRecvmsg6, true, false, "5.2 or 4.19.57", "", probeAttach(ebpf.AttachCGroupUDP6Recvmsg)},
	{FeatMapHash, true, false, "3.19", "", func() error { return features.HaveMapType(ebpf.Hash) }},
	{FeatMapLRUHash, true, false, "4.10", "", func() error { return features.HaveMapType(ebpf.LRUHash) }},
	{FeatHelperPrandom, true, false, "4.17", "", probeHelper(asm.FnGetPrandomU32)},
	{FeatHelperKtime, true, false, "4.17", "", probeHelper(asm.FnKtimeGetNs)},
	{FeatGetpeername4, false, false, "5.8",
		"getpeername() on a translated IPv4 socket reports the backend, not the VIP",
		probeAttach(ebpf.AttachCgroupInet4GetPeername)},
	{FeatGetpeername6, false, false, "5.8",
		"getpeername() on a translated IPv6 socket reports the backend, not the VIP",
		probeAttach(ebpf.AttachCgroupInet6GetPeername)},
	{FeatHelperSockCook, false, false, "4.19",
		"reverse translation is keyed by backend address only, shared by all sockets",
		probeHelper(asm.FnGetSocketCookie)},
	{FeatHelperNetnsCook, false, false, "5.7",
		"ClientIP affinity is shared by all clients of the node, not kept per network namespace",
		probeHelper(asm.FnGetNetnsCookie)},
	{FeatHelperSetRetval, false, false, "5.18",
		"a Service without backends refuses with EPERM instead of ECONNREFUSED",
		probeHelper(asm.FnSetRetval)},
	{FeatCgroupLink, false, false, "5.7",
		"programs are attached with BPF_PROG_ATTACH (ALLOW_MULTI) instead of pinned bpf_links",
		probeCgroupLink},
	{FeatProgSchedCLS, true, true, "4.1", "", func() error { return features.HaveProgramType(ebpf.SchedCLS) }},
	{FeatMapLPMTrie, true, false, "4.11", "", func() error { return features.HaveMapType(ebpf.LPMTrie) }},
	{FeatMapPerCPUArray, true, false, "4.6", "", func() error { return features.HaveMapType(ebpf.PerCPUArray) }},
	{FeatHelperLoadBytes, true, true, "4.5", "", probeTCHelper(asm.FnSkbLoadBytes)},
	{FeatHelperStoreBytes, true, true, "4.1", "", probeTCHelper(asm.FnSkbStoreBytes)},
	{FeatHelperL3Csum, true, true, "4.1", "", probeTCHelper(asm.FnL3CsumReplace)},
	{FeatHelperL4Csum, true, true, "4.1", "", probeTCHelper(asm.FnL4CsumReplace)},
	{FeatHelperCsumDiff, true, true, "4.6", "", probeTCHelper(asm.FnCsumDiff)},
	{FeatTCX, false, true, "6.6",
		"tc programs are attached as cls_bpf filters on a clsact qdisc instead of pinned tcx links",
		probeTCX},
}

// Probe checks every program type, attach type, map type and helper the
// datapath uses. It needs the privileges to load BPF programs; an error means
// a probe was inconclusive (no privileges, say), not that a feature is missing.
func Probe() (Report, error) {
	var r Report
	var errs []error
	// Probes load programs and create maps: before 5.11 they count against
	// RLIMIT_MEMLOCK (per uid), and an EPERM there would be inconclusive.
	if err := RemoveMemlock(); err != nil {
		errs = append(errs, err)
	}
	for _, d := range featureDefs {
		err := d.probe()
		switch {
		case err == nil:
		case errors.Is(err, ebpf.ErrNotSupported):
		default:
			errs = append(errs, fmt.Errorf("probe %s: %w", d.feature, err))
		}
		r.Features = append(r.Features, FeatureStatus{
			Feature:   d.feature,
			Mandatory: d.mandatory,
			NodePort:  d.nodePort,
			Kernel:    d.kernel,
			Available: err == nil,
			Effect:    d.effect,
		})
	}
	return r, errors.Join(errs...)
}

// probeAttach loads a trivial program with the expected attach type: the
// kernel refuses an attach type it does not know with EINVAL.
func probeAttach(at ebpf.AttachType) func() error {
	return func() error {
		if err := features.HaveProgramType(ebpf.CGroupSockAddr); err != nil {
			return err
		}
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:       ebpf.CGroupSockAddr,
			AttachType: at,
			License:    "GPL",
			Instructions: asm.Instructions{
				asm.Mov.Imm(asm.R0, 1),
				asm.Return(),
			},
		})
		if err == nil {
			return prog.Close()
		}
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.E2BIG) {
			return fmt.Errorf("%w: %v", ebpf.ErrNotSupported, err)
		}
		return err
	}
}

// probeHelper checks a helper for cgroup sock_addr programs; cilium/ebpf
// probes that program type with the connect4 attach type, which is where
// bpf_set_retval is used (it is refused for recvmsg and getpeername).
func probeHelper(fn asm.BuiltinFunc) func() error {
	return func() error { return features.HaveProgramHelper(ebpf.CGroupSockAddr, fn) }
}

// probeCgroupLink issues BPF_LINK_CREATE with invalid descriptors: EBADF
// means the command exists (5.7+), EINVAL that it does not.
func probeCgroupLink() error {
	const bpfLinkCreate = 28
	attr := [8]uint32{^uint32(0), ^uint32(0), uint32(ebpf.AttachCGroupInet4Connect)}
	_, _, errno := unix.Syscall(unix.SYS_BPF, bpfLinkCreate, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	runtime.KeepAlive(&attr)
	switch errno {
	case unix.EBADF:
		return nil
	case unix.EINVAL:
		return ebpf.ErrNotSupported
	case 0:
		return errors.New("BPF_LINK_CREATE with invalid descriptors succeeded")
	default:
		return errno
	}
}

// probeTCHelper checks a helper for SCHED_CLS programs.
func probeTCHelper(fn asm.BuiltinFunc) func() error {
	return func() error { return features.HaveProgramHelper(ebpf.SchedCLS, fn) }
}

// probeTCX creates a tcx link on an interface index that cannot exist: ENODEV
// means BPF_LINK_CREATE knows tcx (6.6+). Nothing is attached anywhere.
func probeTCX() error {
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		return err
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: prog, Attach: ebpf.AttachTCXIngress})
	switch {
	case err == nil:
		l.Close()
		return errors.New("tcx attach to a missing interface succeeded")
	case errors.Is(err, unix.ENODEV):
		return nil
	}
	return err
}
