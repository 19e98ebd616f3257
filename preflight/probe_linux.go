//go:build linux

package preflight

import (
	"errors"
	"fmt"
	"math"
	"os"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
)

// probeKernel asks the running kernel for the features the agent uses. Every
// probe loads a trivial program (or, for tcx, tries to attach one to an
// interface that cannot exist) and closes it at once: nothing stays
// attached. RLIMIT_MEMLOCK is left alone: these programs are a page each,
// and kernels before 5.11 that charge them to it allow that much by default.
func probeKernel() *ProbeReport {
	if uid := os.Geteuid(); uid != 0 {
		return &ProbeReport{Note: fmt.Sprintf("not root (euid %d)", uid)}
	}
	res := map[string]ProbeResult{
		ProbeProgCgroupSockAddr: result(features.HaveProgramType(ebpf.CGroupSockAddr)),
		ProbeProgSchedCLS:       result(features.HaveProgramType(ebpf.SchedCLS)),
		ProbeTCX:                result(probeTCX()),
	}
	for key, at := range map[string]ebpf.AttachType{
		ProbeConnect4:     ebpf.AttachCGroupInet4Connect,
		ProbeConnect6:     ebpf.AttachCGroupInet6Connect,
		ProbeSendmsg4:     ebpf.AttachCGroupUDP4Sendmsg,
		ProbeSendmsg6:     ebpf.AttachCGroupUDP6Sendmsg,
		ProbeRecvmsg4:     ebpf.AttachCGroupUDP4Recvmsg,
		ProbeRecvmsg6:     ebpf.AttachCGroupUDP6Recvmsg,
		ProbeGetpeername4: ebpf.AttachCgroupInet4GetPeername,
		ProbeGetpeername6: ebpf.AttachCgroupInet6GetPeername,
	} {
		res[key] = result(probeSockAddr(at))
	}
	return &ProbeReport{Ran: true, Results: res}
}

func result(err error) ProbeResult {
	switch {
	case err == nil:
		return ProbeResult{Supported: true}
	case errors.Is(err, ebpf.ErrNotSupported):
		return ProbeResult{Supported: false}
	default:
		return ProbeResult{Err: err.Error()}
	}
}

// probeSockAddr loads a cgroup/sock_addr program for one attach type. The
// kernel checks expected_attach_type at load time and rejects one it does
// not know with EINVAL. The program returns 1 ("allow"), valid for every
// sock_addr hook (recvmsg and getpeername accept nothing else).
func probeSockAddr(at ebpf.AttachType) error {
	if err := features.HaveProgramType(ebpf.CGroupSockAddr); err != nil {
		return err
	}
	prog, err := ebpf.NewProgramWithOptions(&ebpf.ProgramSpec{
		Type:       ebpf.CGroupSockAddr,
		AttachType: at,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 1),
			asm.Return(),
		},
	}, ebpf.ProgramOptions{LogDisabled: true})
	if err == nil {
		return prog.Close()
	}
	if errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.E2BIG) {
		return fmt.Errorf("%s: %w", at, ebpf.ErrNotSupported)
	}
	return err
}

// probeTCX tries to attach a tcx program to an interface index that does not
// exist: a kernel with tcx answers ENODEV, one without it "not supported".
func probeTCX() error {
	prog, err := ebpf.NewProgramWithOptions(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	}, ebpf.ProgramOptions{LogDisabled: true})
	if err != nil {
		return err
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: prog, Attach: ebpf.AttachTCXIngress})
	switch {
	case err == nil: // cannot happen; do not leave it attached
		l.Close()
		return nil
	case errors.Is(err, syscall.ENODEV):
		return nil
	default:
		return err
	}
}
