package preflight

import (
	"fmt"
	"slices"
	"strings"
)

// The kernel features kpfree-agent uses, when each reached mainline, and the
// config option behind it. Judgements prefer, in order: probes of the running
// kernel (Local as root), the kernel config plus version, traces in /proc and
// /sys, and the version alone (which never fails a check that depends on an
// unreadable config option: it warns).

var (
	minKernel         = ver(4, 19, 0)
	recommendedKernel = ver(5, 3, 0)
)

// Probe keys, set by Local's probes of the running kernel.
const (
	ProbeProgCgroupSockAddr = "prog-cgroup-sock-addr"
	ProbeProgSchedCLS       = "prog-sched-cls"
	ProbeConnect4           = "connect4"
	ProbeConnect6           = "connect6"
	ProbeSendmsg4           = "sendmsg4"
	ProbeSendmsg6           = "sendmsg6"
	ProbeRecvmsg4           = "recvmsg4"
	ProbeRecvmsg6           = "recvmsg6"
	ProbeGetpeername4       = "getpeername4"
	ProbeGetpeername6       = "getpeername6"
	ProbeTCX                = "tcx"
)

// ProbeReport is what Local learned by asking the running kernel.
type ProbeReport struct {
	Ran     bool                   `json:"ran"`            // false: not root, or not Linux
	Note    string                 `json:"note,omitempty"` // why probes did not run
	Results map[string]ProbeResult `json:"results,omitempty"`
}

// ProbeResult is one probe's answer. Err set means inconclusive.
type ProbeResult struct {
	Supported bool   `json:"supported"`
	Err       string `json:"error,omitempty"`
}

// probed reports whether every key has a conclusive answer and whether all are
// supported; missing names the unsupported ones.
func (f *Facts) probed(keys ...string) (conclusive, all bool, missing []string) {
	if f.Probe == nil || !f.Probe.Ran || len(keys) == 0 {
		return false, false, nil
	}
	all = true
	for _, k := range keys {
		r, ok := f.Probe.Results[k]
		if !ok || r.Err != "" {
			return false, false, nil
		}
		if !r.Supported {
			all = false
			missing = append(missing, k)
		}
	}
	return true, all, missing
}

type optState int

const (
	optUnknown optState = iota
	optNo
	optYes
	optModule
)

// kconfig says whether a config option is set and how we know. Without a
// config file it falls back to what /proc and /sys show.
func (f *Facts) kconfig(name string) (optState, string, Evidence) {
	if f.ConfigSource != "" {
		switch v := f.Config[name]; v {
		case "":
			return optNo, name + " is not set", EvidenceConfig
		case "m":
			return optModule, name + "=m (module)", EvidenceConfig
		default:
			return optYes, name + "=" + v, EvidenceConfig
		}
	}
	switch name {
	case "CONFIG_BPF_SYSCALL":
		if len(f.Filesystems) > 0 {
			if slices.Contains(f.Filesystems, "bpf") {
				return optYes, "bpf filesystem registered (/proc/filesystems)", EvidenceHost
			}
			return optNo, "no bpf filesystem in /proc/filesystems", EvidenceHost
		}
	case "CONFIG_BPF_JIT":
		if f.BPFJITEnable != "" {
			return optYes, "net.core.bpf_jit_enable exists", EvidenceHost
		}
		return optNo, "no net.core.bpf_jit_enable sysctl", EvidenceHost
	case "CONFIG_DEBUG_INFO_BTF":
		if f.BTF {
			return optYes, "/sys/kernel/btf/vmlinux exists", EvidenceHost
		}
	case "CONFIG_NET_SCH_INGRESS", "CONFIG_NET_CLS_BPF":
		mod := moduleFor[name]
		switch f.Modules[mod] {
		case "builtin":
			return optYes, mod + " built in (modules.builtin)", EvidenceHost
		case "loaded":
			return optModule, mod + " module loaded", EvidenceHost
		case "available":
			return optModule, mod + " module installed", EvidenceHost
		case "none":
			return optNo, "no " + mod + " in modules.builtin or modules.dep", EvidenceHost
		}
	}
	return optUnknown, "kernel config not readable", EvidenceVersion
}

var moduleFor = map[string]string{
	"CONFIG_NET_SCH_INGRESS": "sch_ingress",
	"CONFIG_NET_CLS_BPF":     "cls_bpf",
}

func (f *Facts) kernelDesc() string {
	var b strings.Builder
	b.WriteString(f.KernelRelease)
	if f.KernelParsed && !strings.HasPrefix(f.KernelRelease, f.Kernel.String()) {
		fmt.Fprintf(&b, " (upstream %s)", f.Kernel)
	}
	if f.OS != "" {
		fmt.Fprintf(&b, ", %s", f.OS)
	}
	return b.String()
}

// requiredProbes are the hooks without which the agent cannot run.
var requiredProbes = []string{ProbeConnect4, ProbeConnect6, ProbeSendmsg4, ProbeSendmsg6, ProbeRecvmsg4, ProbeRecvmsg6}

func checkKernelVersion(f *Facts) Finding {
	fd := Finding{Check: CheckKernelVersion}
	if !f.KernelParsed {
		fd.Status, fd.Seen = Fail, fmt.Sprintf("cannot read a version from uname -r %q", f.KernelRelease)
		fd.Remedy = "check the host's kernel: kpfree needs Linux 4.19 or newer"
		return fd
	}
	v, desc := f.Kernel, f.kernelDesc()
	switch {
	case !v.AtLeast(minKernel):
		if conclusive, all, _ := f.probed(requiredProbes...); conclusive && all {
			fd.Status = Warn
			fd.Seen = desc + ": older than 4.19, but the probes found every hook the agent needs (distribution backports)"
			fd.Remedy = "prefer a 5.10+ kernel: kpfree is not tested on kernels older than 4.19"
			return fd
		}
		fd.Status = Fail
		fd.Seen = desc + ": older than 4.19, the minimum (socket hooks: connect 4.17, sendmsg 4.18, recvmsg 4.19.57/5.2)"
		fd.Remedy = "upgrade to a 5.10 or newer kernel (e.g. the distribution's HWE or backports kernel); " +
			"distribution kernels that backport BPF (RHEL 8's 4.18) can be probed with `kpfree preflight --local` as root on the host"
	case !v.AtLeast(recommendedKernel):
		fd.Status = Warn
		fd.Seen = desc + ": at least 4.19, but below the recommended 5.3: UDP recvmsg hooks are mainline only " +
			"from 5.2 (4.19 has them from 4.19.57), the verifier gains the 1M-instruction limit (5.2) and bounded loops (5.3), " +
			"and getpeername hooks need 5.8"
		fd.Remedy = "plan an upgrade to 5.10 or newer (Debian 11+, Ubuntu 22.04+, RHEL 9)"
	default:
		fd.Status, fd.Seen = Pass, desc
	}
	return fd
}

func checkKernelConfig(f *Facts) Finding {
	fd := Finding{Check: CheckKernelConfig}
	if f.ConfigSource != "" {
		fd.Status, fd.Seen = Pass, "read from "+f.ConfigSource
		return fd
	}
	r := f.KernelRelease
	fd.Seen = fmt.Sprintf("not readable: neither /proc/config.gz nor /boot/config-%s nor /lib/modules/%s/config exists; "+
		"BPF features are judged from the kernel version and what /proc and /sys show", r, r)
	if f.Probe != nil && f.Probe.Ran {
		fd.Status, fd.Seen = Pass, fd.Seen+", and probed"
		return fd
	}
	fd.Status = Warn
	fd.Remedy = "install the config file that came with the kernel, or `modprobe configs` for /proc/config.gz " +
		"(CONFIG_IKCONFIG=m); or run `kpfree preflight --local` as root on the host, which probes the kernel"
	return fd
}

func checkProbe(f *Facts) Finding {
	fd := Finding{Check: CheckProbe, Evidence: EvidenceProbed}
	if f.Probe.Ran {
		keys := make([]string, 0, len(f.Probe.Results))
		for k := range f.Probe.Results {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		var yes, no, unsure []string
		for _, k := range keys {
			switch r := f.Probe.Results[k]; {
			case r.Err != "":
				unsure = append(unsure, k+" ("+r.Err+")")
			case r.Supported:
				yes = append(yes, k)
			default:
				no = append(no, k)
			}
		}
		fd.Status = Pass
		fd.Seen = "probed the running kernel: supported " + listOrNone(yes) + "; not supported " + listOrNone(no)
		if len(unsure) > 0 {
			fd.Status = Warn
			fd.Seen += "; inconclusive " + strings.Join(unsure, ", ")
			fd.Remedy = "inconclusive probes fall back to the kernel config and version; check the errors (lockdown? seccomp?)"
		}
		return fd
	}
	fd.Status = Warn
	fd.Seen = "not probed: " + f.Probe.Note + "; BPF features judged from the kernel config and version"
	fd.Remedy = "run as root for authoritative answers: sudo kpfree preflight --local"
	return fd
}

func listOrNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

// kfeature is a kernel feature that hangs on one config option.
type kfeature struct {
	check   string
	what    string
	option  string
	since   Version
	missing Status
	impact  string // what the agent loses without it
	remedy  string
	probes  []string // probes that prove it present (never absent: see eval)
	module  string   // module that provides it when =m
}

var (
	featBPFSyscall = kfeature{
		check: CheckBPFSyscall, what: "the bpf() syscall", option: "CONFIG_BPF_SYSCALL", since: ver(3, 18, 0),
		missing: Fail, impact: "the agent cannot load any program",
		remedy: "use a kernel built with CONFIG_BPF_SYSCALL=y (every major distribution kernel is)",
		probes: []string{ProbeProgSchedCLS},
	}
	featCgroupBPF = kfeature{
		check: CheckCgroupBPF, what: "cgroup BPF", option: "CONFIG_CGROUP_BPF", since: ver(4, 10, 0),
		missing: Fail, impact: "no cgroup socket hooks, so no socket load balancing",
		remedy: "use a kernel built with CONFIG_CGROUP_BPF=y",
		probes: []string{ProbeProgCgroupSockAddr},
	}
	featClsact = kfeature{
		check: CheckClsact, what: "the clsact qdisc", option: "CONFIG_NET_SCH_INGRESS", since: ver(4, 5, 0),
		missing: Fail, impact: "NodePort programs cannot attach to interfaces (no tcx below 6.6)",
		remedy: "use a kernel with CONFIG_NET_SCH_INGRESS=y or =m", module: "sch_ingress",
	}
	featClsBPF = kfeature{
		check: CheckClsBPF, what: "the cls_bpf classifier", option: "CONFIG_NET_CLS_BPF", since: ver(4, 4, 0),
		missing: Fail, impact: "NodePort programs cannot attach to clsact (no tcx below 6.6)",
		remedy: "use a kernel with CONFIG_NET_CLS_BPF=y or =m", module: "cls_bpf",
	}
)

func (k kfeature) eval(f *Facts) Finding {
	fd := Finding{Check: k.check}
	// Probes here only prove presence: a program type that loads needs the
	// option, but one that does not load may fail for other reasons.
	if conclusive, all, _ := f.probed(k.probes...); conclusive && all {
		fd.Status, fd.Seen, fd.Evidence = Pass, k.what+": probed, present", EvidenceProbed
		return fd
	}
	if f.KernelParsed && !f.Kernel.AtLeast(k.since) {
		fd.Status, fd.Evidence = k.missing, EvidenceVersion
		fd.Seen = fmt.Sprintf("kernel %s is older than %s, which brought %s: %s", f.Kernel.Short(), k.since.Short(), k.what, k.impact)
		fd.Remedy = "upgrade the kernel"
		return fd
	}
	st, seen, ev := f.kconfig(k.option)
	fd.Evidence = ev
	switch st {
	case optYes:
		fd.Status, fd.Seen = Pass, seen
	case optModule:
		fd.Status, fd.Seen = Pass, seen+", loaded on demand"
		if k.module != "" && f.Modules[k.module] == "none" {
			fd.Status = Warn
			fd.Seen = fmt.Sprintf("%s, but %s.ko is not installed under /lib/modules/%s: %s", seen, k.module, f.KernelRelease, k.impact)
			fd.Remedy = "install the kernel's module package (Ubuntu: linux-modules-extra-$(uname -r))"
		}
	case optNo:
		fd.Status, fd.Seen, fd.Remedy = k.missing, seen+": "+k.impact, k.remedy
	default:
		fd.Status = Warn
		fd.Seen = fmt.Sprintf("kernel config not readable: cannot confirm %s (%s); kernel %s normally has it", k.option, k.what, f.Kernel.Short())
		fd.Remedy = "confirm with the kernel config, or run `kpfree preflight --local` as root on the host to probe"
	}
	return fd
}

// tcxAvailable says whether tcx links work: 6.6+ with CONFIG_NET_XGRESS.
func (f *Facts) tcxAvailable() (bool, string, Evidence) {
	if conclusive, all, _ := f.probed(ProbeTCX); conclusive {
		if all {
			return true, "available (probed)", EvidenceProbed
		}
		return false, "not available (probed)", EvidenceProbed
	}
	if !f.KernelParsed || !f.Kernel.AtLeast(ver(6, 6, 0)) {
		return false, fmt.Sprintf("not available (kernel %s, tcx needs 6.6)", f.Kernel.Short()), EvidenceVersion
	}
	if f.ConfigSource != "" {
		if f.Config["CONFIG_NET_XGRESS"] == "" {
			return false, "not available: CONFIG_NET_XGRESS is not set", EvidenceConfig
		}
		return true, "available (kernel " + f.Kernel.Short() + ", CONFIG_NET_XGRESS=y)", EvidenceConfig
	}
	return true, "available (kernel " + f.Kernel.Short() + " >= 6.6)", EvidenceVersion
}

func checkTC(f *Facts, k kfeature) Finding {
	fd := k.eval(f)
	if fd.Status != Pass {
		if ok, seen, ev := f.tcxAvailable(); ok {
			return Finding{Check: k.check, Status: Pass, Evidence: ev,
				Seen: fmt.Sprintf("not needed, tcx is %s; %s", seen, fd.Seen)}
		}
	}
	return fd
}

func checkTCX(f *Facts) Finding {
	ok, seen, ev := f.tcxAvailable()
	if !ok {
		seen += ": the agent falls back to clsact + cls_bpf"
	}
	// Optional: the fallback is complete, so its absence is not a warning.
	return Finding{Check: CheckTCX, Status: Pass, Seen: seen, Evidence: ev}
}

// hook is a cgroup sock_addr attach point pair (IPv4 and IPv6).
type hook struct {
	check     string
	names     string
	probes    []string
	since     Version
	backports []Version
	missing   Status
	impact    string
	remedy    string
}

var hooks = []hook{
	{
		check: CheckConnect, names: "connect4/connect6", probes: []string{ProbeConnect4, ProbeConnect6},
		since: ver(4, 17, 0), missing: Fail,
		impact: "TCP and connected-UDP ClusterIP translation needs them",
		remedy: "upgrade to 4.19 or newer (5.10+ recommended)",
	},
	{
		check: CheckSendmsg, names: "sendmsg4/sendmsg6", probes: []string{ProbeSendmsg4, ProbeSendmsg6},
		since: ver(4, 18, 0), missing: Fail,
		impact: "unconnected UDP (DNS) to ClusterIPs needs them",
		remedy: "upgrade to 4.19 or newer (5.10+ recommended)",
	},
	{
		check: CheckRecvmsg, names: "recvmsg4/recvmsg6", probes: []string{ProbeRecvmsg4, ProbeRecvmsg6},
		since: ver(5, 2, 0), backports: []Version{ver(4, 19, 57), ver(5, 1, 16)}, missing: Fail,
		impact: "without them UDP replies come from the backend address and resolvers drop them (strict mode needs them)",
		remedy: "upgrade to 5.2 or newer (on 4.19: 4.19.57 or newer)",
	},
	{
		check: CheckGetpeername, names: "getpeername4/getpeername6", probes: []string{ProbeGetpeername4, ProbeGetpeername6},
		since: ver(5, 8, 0), missing: Warn,
		impact: "getpeername() on Service connections returns the backend instead of the ClusterIP; the agent runs without them",
		remedy: "upgrade to 5.8 or newer for ClusterIP-faithful getpeername()",
	},
}

func (h hook) sinceText() string {
	s := h.since.Short()
	if len(h.backports) > 0 {
		var b []string
		for _, v := range h.backports {
			b = append(b, v.String())
		}
		s += "; backported to " + strings.Join(b, " and ")
	}
	return s
}

func (h hook) eval(f *Facts) Finding {
	fd := Finding{Check: h.check}
	if conclusive, all, missing := f.probed(h.probes...); conclusive {
		fd.Evidence = EvidenceProbed
		if all {
			fd.Status, fd.Seen = Pass, h.names+" hooks: probed, present"
		} else {
			fd.Status, fd.Remedy = h.missing, h.remedy
			fd.Seen = fmt.Sprintf("%s hooks: probed, %s not supported: %s", h.names, strings.Join(missing, ", "), h.impact)
		}
		return fd
	}
	cg, cgSeen, ev := f.kconfig("CONFIG_CGROUP_BPF")
	if cg == optNo {
		fd.Status, fd.Evidence, fd.Remedy = h.missing, ev, featCgroupBPF.remedy
		fd.Seen = fmt.Sprintf("%s hooks: %s: %s", h.names, cgSeen, h.impact)
		return fd
	}
	if !f.KernelParsed || !since(f.Kernel, h.since, h.backports...) {
		fd.Status, fd.Evidence, fd.Remedy = h.missing, EvidenceVersion, h.remedy
		if cg != optUnknown {
			fd.Evidence = EvidenceConfig
		}
		fd.Seen = fmt.Sprintf("%s hooks: kernel %s predates them (%s): %s", h.names, f.Kernel, h.sinceText(), h.impact)
		return fd
	}
	if cg == optUnknown {
		fd.Status, fd.Evidence = Warn, EvidenceVersion
		fd.Seen = fmt.Sprintf("%s hooks: kernel %s has them (since %s) if built with CONFIG_CGROUP_BPF, but the kernel config is not readable",
			h.names, f.Kernel, h.sinceText())
		fd.Remedy = "confirm CONFIG_CGROUP_BPF=y, or run `kpfree preflight --local` as root on the host to probe"
		return fd
	}
	fd.Status, fd.Evidence = Pass, ev
	fd.Seen = fmt.Sprintf("%s hooks: kernel %s (since %s), %s", h.names, f.Kernel, h.sinceText(), cgSeen)
	return fd
}

func checkJIT(f *Facts) Finding {
	fd := Finding{Check: CheckBPFJIT, Evidence: EvidenceHost}
	always := ""
	if f.Config["CONFIG_BPF_JIT_ALWAYS_ON"] != "" {
		always = " (CONFIG_BPF_JIT_ALWAYS_ON=y)"
	}
	const persist = "sysctl -w net.core.bpf_jit_enable=1, and persist it in /etc/sysctl.d/"
	switch f.BPFJITEnable {
	case "1":
		fd.Status, fd.Seen = Pass, "net.core.bpf_jit_enable=1"+always
	case "2":
		fd.Status, fd.Seen = Warn, "net.core.bpf_jit_enable=2: JIT on, but every program is dumped to the kernel log (debug mode)"
		fd.Remedy = persist
	case "0":
		fd.Status, fd.Seen = Warn, "net.core.bpf_jit_enable=0: programs run in the interpreter, slower on every connect()"
		fd.Remedy = persist
	case "":
		// net.core.bpf_jit_enable exists only in the initial network
		// namespace: a host that is itself a netns or a container does not
		// see it, so the kernel config decides.
		if f.Config["CONFIG_BPF_JIT"] == "y" {
			fd.Evidence = EvidenceConfig
			if always != "" {
				fd.Status = Pass
				fd.Seen = "CONFIG_BPF_JIT=y" + always + "; net.core.bpf_jit_enable is not visible here (not the initial network namespace)"
				return fd
			}
			fd.Status = Warn
			fd.Seen = "CONFIG_BPF_JIT=y, but net.core.bpf_jit_enable is not visible here (not the initial network namespace), so whether the JIT is on cannot be read"
			fd.Remedy = "check `sysctl net.core.bpf_jit_enable` in the host's initial network namespace; it should be 1"
			return fd
		}
		st, seen, ev := f.kconfig("CONFIG_BPF_JIT")
		fd.Status, fd.Evidence = Warn, ev
		fd.Seen = "no net.core.bpf_jit_enable sysctl: kernel built without the JIT, programs run in the interpreter"
		if st == optNo && ev == EvidenceConfig {
			fd.Seen += " (" + seen + ")"
		}
		fd.Remedy = "use a kernel with CONFIG_BPF_JIT=y"
	default:
		fd.Status, fd.Seen = Warn, fmt.Sprintf("net.core.bpf_jit_enable=%q: cannot tell whether the JIT is on", f.BPFJITEnable)
		fd.Remedy = "check `sysctl net.core.bpf_jit_enable` as root; it should be 1"
	}
	return fd
}

func (f *Facts) mountsOf(fstype string) []Mount {
	var out []Mount
	for _, m := range f.Mounts {
		if m.FSType == fstype {
			out = append(out, m)
		}
	}
	return out
}

// cgroup2Path is where cgroup2 is mounted, preferring the standard places.
func (f *Facts) cgroup2Path() string {
	ms := f.mountsOf("cgroup2")
	for _, want := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		for _, m := range ms {
			if m.Path == want {
				return want
			}
		}
	}
	if len(ms) > 0 {
		return ms[0].Path
	}
	return ""
}

func checkCgroup2(f *Facts) Finding {
	fd := Finding{Check: CheckCgroup2, Evidence: EvidenceHost}
	switch p := f.cgroup2Path(); p {
	case "":
		fd.Status = Fail
		fd.Seen = "cgroup2 is not mounted: the agent attaches its socket hooks to a cgroup2 directory"
		if len(f.Filesystems) > 0 && !slices.Contains(f.Filesystems, "cgroup2") {
			fd.Seen = "the kernel has no cgroup2 filesystem (4.5+): the agent attaches its socket hooks to a cgroup2 directory"
		}
		fd.Remedy = "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1), or mount it: mount -t cgroup2 none /sys/fs/cgroup/unified"
	case "/sys/fs/cgroup":
		fd.Status, fd.Seen = Pass, "cgroup2 at /sys/fs/cgroup (unified hierarchy)"
	case "/sys/fs/cgroup/unified":
		fd.Status, fd.Seen = Pass, "cgroup2 at /sys/fs/cgroup/unified (hybrid: cgroup v1 controllers under /sys/fs/cgroup)"
	default:
		fd.Status, fd.Seen = Pass, "cgroup2 at "+p
	}
	return fd
}

func checkBPFFS(f *Facts) Finding {
	fd := Finding{Check: CheckBPFFS, Evidence: EvidenceHost}
	var at []string
	for _, m := range f.mountsOf("bpf") {
		at = append(at, m.Path)
	}
	switch {
	case slices.Contains(at, "/sys/fs/bpf"):
		fd.Status, fd.Seen = Pass, "bpffs mounted at /sys/fs/bpf"
	case len(at) > 0:
		fd.Status, fd.Seen = Pass, "bpffs mounted at "+strings.Join(at, ", ")+"; not at /sys/fs/bpf, where the agent mounts its own"
	case slices.Contains(f.Filesystems, "bpf"):
		fd.Status, fd.Seen = Pass, "bpffs available, not mounted yet (the agent mounts it at /sys/fs/bpf)"
	case len(f.Filesystems) > 0:
		fd.Status = Fail
		fd.Seen = "no bpf filesystem (CONFIG_BPF_SYSCALL): the agent pins its maps and links there to survive restarts"
		fd.Remedy = featBPFSyscall.remedy
	default:
		fd.Status, fd.Seen = Warn, "cannot read /proc/filesystems: bpffs availability unknown"
		fd.Remedy = "check that `grep bpf /proc/filesystems` shows it"
	}
	return fd
}

func checkBTF(f *Facts) Finding {
	fd := Finding{Check: CheckBTF, Evidence: EvidenceHost}
	if f.BTF {
		fd.Status, fd.Seen = Pass, "/sys/kernel/btf/vmlinux present"
		return fd
	}
	why := "CONFIG_DEBUG_INFO_BTF"
	switch st, seen, ev := f.kconfig("CONFIG_DEBUG_INFO_BTF"); {
	case f.KernelParsed && !f.Kernel.AtLeast(ver(5, 4, 0)):
		why = "kernels before 5.4 do not export it"
	case ev == EvidenceConfig && st == optNo:
		why = seen
	}
	fd.Status = Warn
	fd.Seen = "no /sys/kernel/btf/vmlinux (" + why + "): bpftool and cilium/ebpf cannot read kernel types; " +
		"the agent's programs do not need CO-RE, but debugging and future CO-RE programs do"
	fd.Remedy = "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (5.4+; the default on Debian 11+, Ubuntu 20.10+, RHEL 8.2+)"
	return fd
}

func evaluateKernel(f *Facts) []Finding {
	out := []Finding{checkKernelVersion(f), checkKernelConfig(f)}
	if f.Probe != nil {
		out = append(out, checkProbe(f))
	}
	out = append(out,
		featBPFSyscall.eval(f),
		checkJIT(f),
		featCgroupBPF.eval(f),
		checkCgroup2(f),
		checkBPFFS(f),
	)
	for _, h := range hooks {
		out = append(out, h.eval(f))
	}
	out = append(out, checkTC(f, featClsact), checkTC(f, featClsBPF), checkTCX(f), checkBTF(f))
	return out
}
