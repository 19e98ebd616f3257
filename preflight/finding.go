package preflight

import "github.com/kpfree/kpfree/internal/inventory"

// Status is the verdict of one check.
type Status string

const (
	Pass Status = "pass"
	Warn Status = "warn"
	Fail Status = "fail"
)

func (s Status) rank() int {
	switch s {
	case Pass:
		return 0
	case Warn:
		return 1
	default: // Fail, and anything unknown counts as a failure.
		return 2
	}
}

// Evidence says what a kernel-feature verdict rests on.
type Evidence string

const (
	// EvidenceProbed: the running kernel was asked (cilium/ebpf probes, --local as root).
	EvidenceProbed Evidence = "probed"
	// EvidenceConfig: the kernel config file (and, for hooks, the kernel version).
	EvidenceConfig Evidence = "config"
	// EvidenceHost: what /proc and /sys show (mounts, sysctls, registered filesystems, modules).
	EvidenceHost Evidence = "host"
	// EvidenceVersion: the kernel version alone; the config could not be read.
	EvidenceVersion Evidence = "version"
)

// Finding is the result of one check on one host.
type Finding struct {
	Host   string `json:"host"`
	Check  string `json:"check"` // stable id, see CheckIDs
	Status Status `json:"status"`
	Seen   string `json:"seen"`             // what was observed
	Remedy string `json:"remedy,omitempty"` // what to do; empty on pass
	// Evidence is set on kernel-feature checks only.
	Evidence Evidence `json:"evidence,omitempty"`
}

// Counts is how many findings have each status.
type Counts struct {
	Pass int `json:"pass"`
	Warn int `json:"warn"`
	Fail int `json:"fail"`
}

// Count tallies findings by status.
func Count(fs []Finding) Counts {
	var c Counts
	for _, f := range fs {
		switch f.Status.rank() {
		case 0:
			c.Pass++
		case 1:
			c.Warn++
		default:
			c.Fail++
		}
	}
	return c
}

// Worst is the worst status among findings (Pass when there are none).
func Worst(fs []Finding) Status {
	w := Pass
	for _, f := range fs {
		if f.Status.rank() > w.rank() {
			w = f.Status
			if w.rank() == 2 {
				return Fail
			}
		}
	}
	return w
}

// HostSummary is one host's outcome.
type HostSummary struct {
	Host   string         `json:"host"`
	Role   inventory.Role `json:"role"`
	Kernel string         `json:"kernel,omitempty"` // uname -r
	OS     string         `json:"os,omitempty"`
	// Error is set when the facts could not be gathered.
	Error string `json:"error,omitempty"`
	Counts
	Worst Status `json:"worst"`
	// Facts is what the gather script (and, in Local, the probes) found;
	// nil when gathering failed.
	Facts *Facts `json:"facts,omitempty"`
}

// Report is the outcome of a preflight run.
type Report struct {
	// Findings in host order (as given to Run), then check order (CheckIDs).
	Findings []Finding     `json:"findings"`
	Hosts    []HostSummary `json:"hosts"`
}

// Failed reports whether any check failed.
func (r Report) Failed() bool { return Worst(r.Findings) == Fail }

// Counts tallies all findings.
func (r Report) Counts() Counts { return Count(r.Findings) }

// Worst is the worst status of all findings.
func (r Report) Worst() Status { return Worst(r.Findings) }

// For returns the findings of one host.
func (r Report) For(host string) []Finding {
	var out []Finding
	for _, f := range r.Findings {
		if f.Host == host {
			out = append(out, f)
		}
	}
	return out
}

// Check ids, in report order.
const (
	CheckSSHReachable      = "ssh.reachable"
	CheckGather            = "host.gather"
	CheckKernelVersion     = "kernel.version"
	CheckKernelConfig      = "kernel.config"
	CheckProbe             = "bpf.probe"
	CheckBPFSyscall        = "bpf.syscall"
	CheckBPFJIT            = "bpf.jit"
	CheckCgroupBPF         = "bpf.cgroup"
	CheckCgroup2           = "bpf.cgroup2"
	CheckBPFFS             = "bpf.fs"
	CheckConnect           = "bpf.cgroup-connect"
	CheckSendmsg           = "bpf.cgroup-sendmsg"
	CheckRecvmsg           = "bpf.cgroup-recvmsg"
	CheckGetpeername       = "bpf.cgroup-getpeername"
	CheckClsact            = "tc.clsact"
	CheckClsBPF            = "tc.cls-bpf"
	CheckTCX               = "tc.tcx"
	CheckBTF               = "bpf.btf"
	CheckSwap              = "kubeadm.swap"
	CheckIPForward         = "kubeadm.ip-forward"
	CheckCgroupV2          = "kubeadm.cgroup-v2"
	CheckPorts             = "kubeadm.ports"
	CheckKubeadm           = "kubeadm.bin-kubeadm"
	CheckKubelet           = "kubeadm.bin-kubelet"
	CheckCRISocket         = "kubeadm.cri-socket"
	CheckIptables          = "kubeadm.bin-iptables"
	CheckConntrack         = "kubeadm.bin-conntrack"
	CheckHostname          = "host.hostname"
	CheckMachineID         = "host.machine-id"
	CheckHostnameUnique    = "cluster.hostname-unique"
	CheckMachineIDUnique   = "cluster.machine-id-unique"
	CheckProductUUIDUnique = "cluster.product-uuid-unique"
	CheckClockSkew         = "cluster.clock-skew"
)

var checkOrder = []string{
	CheckSSHReachable, CheckGather,
	CheckKernelVersion, CheckKernelConfig, CheckProbe,
	CheckBPFSyscall, CheckBPFJIT, CheckCgroupBPF, CheckCgroup2, CheckBPFFS,
	CheckConnect, CheckSendmsg, CheckRecvmsg, CheckGetpeername,
	CheckClsact, CheckClsBPF, CheckTCX, CheckBTF,
	CheckSwap, CheckIPForward, CheckCgroupV2, CheckPorts,
	CheckKubeadm, CheckKubelet, CheckCRISocket, CheckIptables, CheckConntrack,
	CheckHostname, CheckMachineID,
	CheckHostnameUnique, CheckMachineIDUnique, CheckProductUUIDUnique, CheckClockSkew,
}

var checkIndex = func() map[string]int {
	m := make(map[string]int, len(checkOrder))
	for i, c := range checkOrder {
		m[c] = i
	}
	return m
}()

// CheckIDs lists every check id in report order.
func CheckIDs() []string { return append([]string(nil), checkOrder...) }

func checkRank(id string) int {
	if i, ok := checkIndex[id]; ok {
		return i
	}
	return len(checkOrder)
}
