package preflight

import (
	"slices"
	"strings"
	"testing"

	"github.com/kpfree/kpfree/internal/inventory"
)

func evaluate(t *testing.T, s spec, role inventory.Role, opts Options) (*Facts, map[string]Finding) {
	t.Helper()
	f, err := ParseFacts([]byte(s.render()))
	if err != nil {
		t.Fatalf("ParseFacts: %v", err)
	}
	fs := Evaluate("h1", role, f, opts.withDefaults())
	m := map[string]Finding{}
	for _, fd := range fs {
		if _, dup := m[fd.Check]; dup {
			t.Errorf("check %s reported twice", fd.Check)
		}
		if fd.Host != "h1" {
			t.Errorf("%s: host %q", fd.Check, fd.Host)
		}
		if fd.Status == Pass && fd.Remedy != "" {
			t.Errorf("%s: pass with a remedy %q", fd.Check, fd.Remedy)
		}
		if fd.Status != Pass && fd.Remedy == "" && fd.Check != CheckTCX {
			t.Errorf("%s: %s without a remedy (seen %q)", fd.Check, fd.Status, fd.Seen)
		}
		if fd.Seen == "" {
			t.Errorf("%s: empty Seen", fd.Check)
		}
		m[fd.Check] = fd
	}
	if !slices.IsSortedFunc(fs, func(a, b Finding) int { return checkRank(a.Check) - checkRank(b.Check) }) {
		t.Errorf("findings not in check order")
	}
	return f, m
}

// want asserts statuses of the named checks.
func want(t *testing.T, got map[string]Finding, w map[string]Status) {
	t.Helper()
	for check, st := range w {
		fd, ok := got[check]
		if !ok {
			t.Errorf("%s: no finding", check)
			continue
		}
		if fd.Status != st {
			t.Errorf("%s: status %s, want %s (seen %q)", check, fd.Status, st, fd.Seen)
		}
	}
}

func allPass(t *testing.T, got map[string]Finding) {
	t.Helper()
	for _, fd := range got {
		if fd.Status != Pass {
			t.Errorf("%s: %s, want pass (seen %q)", fd.Check, fd.Status, fd.Seen)
		}
	}
}

func seenContains(t *testing.T, got map[string]Finding, check string, subs ...string) {
	t.Helper()
	for _, s := range subs {
		if !strings.Contains(got[check].Seen, s) {
			t.Errorf("%s: Seen %q lacks %q", check, got[check].Seen, s)
		}
	}
}

func TestKernels(t *testing.T) {
	base := goodHost("h1")
	tests := []struct {
		name    string
		spec    spec
		version string // upstream version preflight should derive
		allPass bool
		want    map[string]Status
	}{
		{
			name: "4.14 Amazon Linux 2",
			spec: func() spec {
				s := base.withKernel("4.14.355-275.582.amzn2.x86_64", "#1 SMP Wed Oct 23 20:53:45 UTC 2024", "", cfgNoBTF)
				s.btf, s.os = false, "Amazon Linux 2"
				return s
			}(),
			version: "4.14.355",
			want: map[string]Status{
				CheckKernelVersion: Fail, CheckConnect: Fail, CheckSendmsg: Fail, CheckRecvmsg: Fail,
				CheckGetpeername: Warn, CheckBTF: Warn, CheckTCX: Pass, CheckBPFSyscall: Pass, CheckCgroupBPF: Pass,
				CheckClsact: Pass, CheckClsBPF: Pass,
			},
		},
		{
			name: "4.19 Debian 10 (4.19.316 behind 4.19.0-27)",
			spec: func() spec {
				s := base.withKernel("4.19.0-27-amd64", "#1 SMP Debian 4.19.316-1 (2024-06-25)", "", cfgNoBTF)
				s.btf = false
				return s
			}(),
			version: "4.19.316",
			want: map[string]Status{
				CheckKernelVersion: Warn, CheckConnect: Pass, CheckSendmsg: Pass, CheckRecvmsg: Pass,
				CheckGetpeername: Warn, CheckBTF: Warn, CheckTCX: Pass,
			},
		},
		{
			name: "4.19.0 without the recvmsg backport",
			spec: func() spec {
				s := base.withKernel("4.19.0-custom", "#1 SMP PREEMPT", "", cfgNoBTF)
				s.btf = false
				return s
			}(),
			version: "4.19.0",
			want:    map[string]Status{CheckKernelVersion: Warn, CheckConnect: Pass, CheckSendmsg: Pass, CheckRecvmsg: Fail},
		},
		{
			name: "5.4 Ubuntu 20.04 (5.4.166 behind 5.4.0-100)",
			spec: func() spec {
				s := base.withKernel("5.4.0-100-generic", "#113-Ubuntu SMP Thu Feb 3 18:43:29 UTC 2022",
					"Ubuntu 5.4.0-100.113-generic 5.4.166", cfgNoBTF)
				s.btf, s.os = false, "Ubuntu 20.04.6 LTS"
				return s
			}(),
			version: "5.4.166",
			want: map[string]Status{
				CheckKernelVersion: Pass, CheckConnect: Pass, CheckSendmsg: Pass, CheckRecvmsg: Pass,
				CheckGetpeername: Warn, CheckBTF: Warn, CheckTCX: Pass,
			},
		},
		{
			name:    "5.10 Debian 11",
			spec:    base.withKernel("5.10.0-30-amd64", "#1 SMP Debian 5.10.218-1 (2024-06-01)", "", cfgModern),
			version: "5.10.218",
			allPass: true,
		},
		{
			name:    "6.1 Debian 12",
			spec:    base,
			version: "6.1.119",
			allPass: true,
		},
		{
			name:    "6.18 with tcx",
			spec:    base.withKernel("6.18.44-fc-v782", "#1 SMP PREEMPT_DYNAMIC @0", "", cfg618),
			version: "6.18.44",
			allPass: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f, got := evaluate(t, tc.spec, inventory.RoleControlPlane, Options{})
			if f.Kernel.String() != tc.version {
				t.Errorf("kernel version %s, want %s", f.Kernel, tc.version)
			}
			if tc.allPass {
				allPass(t, got)
			}
			want(t, got, tc.want)
			for _, c := range []string{CheckConnect, CheckRecvmsg, CheckClsact} {
				if got[c].Evidence != EvidenceConfig {
					t.Errorf("%s: evidence %q, want config", c, got[c].Evidence)
				}
			}
			if _, ok := got[CheckProbe]; ok {
				t.Errorf("bpf.probe reported without probes")
			}
		})
	}

	t.Run("tcx seen", func(t *testing.T) {
		_, got := evaluate(t, base.withKernel("6.18.44-fc-v782", "", "", cfg618), inventory.RoleWorker, Options{})
		seenContains(t, got, CheckTCX, "available", "CONFIG_NET_XGRESS=y")
		_, got = evaluate(t, base, inventory.RoleWorker, Options{})
		seenContains(t, got, CheckTCX, "not available", "clsact")
		seenContains(t, got, CheckClsBPF, "CONFIG_NET_CLS_BPF=m (module)")
	})
}

func TestConfigMissing(t *testing.T) {
	s := goodHost("h1")
	s.configSource = ""
	_, got := evaluate(t, s, inventory.RoleControlPlane, Options{})
	want(t, got, map[string]Status{
		CheckKernelConfig: Warn,
		CheckBPFSyscall:   Pass, // bpf in /proc/filesystems
		CheckBPFJIT:       Pass,
		CheckCgroupBPF:    Warn,
		CheckConnect:      Warn, CheckSendmsg: Warn, CheckRecvmsg: Warn, CheckGetpeername: Warn,
		CheckClsact: Pass, CheckClsBPF: Pass, // modules installed
		CheckTCX: Pass, CheckBTF: Pass,
	})
	seenContains(t, got, CheckKernelConfig, "/proc/config.gz", "/boot/config-6.1.0-28-cloud-amd64")
	seenContains(t, got, CheckConnect, "not readable")
	if e := got[CheckConnect].Evidence; e != EvidenceVersion {
		t.Errorf("connect evidence %q, want version", e)
	}
	if e := got[CheckBPFSyscall].Evidence; e != EvidenceHost {
		t.Errorf("syscall evidence %q, want host", e)
	}
	for _, fd := range got {
		if fd.Status == Fail {
			t.Errorf("%s fails on a 6.1 host without config: %q", fd.Check, fd.Seen)
		}
	}

	t.Run("no module index", func(t *testing.T) {
		s := s
		s.modules = nil
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckClsact: Warn, CheckClsBPF: Warn})
	})
	t.Run("6.18: tcx covers tc", func(t *testing.T) {
		s := s.withKernel("6.18.44-fc-v782", "", "", nil)
		s.modules = nil
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckClsact: Pass, CheckClsBPF: Pass, CheckTCX: Pass})
		seenContains(t, got, CheckClsact, "not needed, tcx")
	})
	t.Run("old version still fails", func(t *testing.T) {
		s := s.withKernel("4.14.355-275.582.amzn2.x86_64", "", "", nil)
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckKernelVersion: Fail, CheckConnect: Fail})
	})
}

func TestKernelConfigVariants(t *testing.T) {
	without := func(cfg []string, opt string) []string {
		return slices.DeleteFunc(slices.Clone(cfg), func(s string) bool { return strings.HasPrefix(s, opt+"=") })
	}
	t.Run("no CONFIG_CGROUP_BPF", func(t *testing.T) {
		s := goodHost("h1")
		s.config = without(cfgModern, "CONFIG_CGROUP_BPF")
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckCgroupBPF: Fail, CheckConnect: Fail, CheckRecvmsg: Fail, CheckGetpeername: Warn})
		seenContains(t, got, CheckConnect, "CONFIG_CGROUP_BPF is not set")
	})
	t.Run("no cls_bpf", func(t *testing.T) {
		s := goodHost("h1")
		s.config = without(cfgModern, "CONFIG_NET_CLS_BPF")
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckClsBPF: Fail, CheckClsact: Pass})
	})
	t.Run("cls_bpf=m but module not installed", func(t *testing.T) {
		s := goodHost("h1")
		s.modules = map[string]string{"sch_ingress": "available", "cls_bpf": "none"}
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckClsBPF: Warn, CheckClsact: Pass})
		seenContains(t, got, CheckClsBPF, "cls_bpf.ko is not installed")
	})
	t.Run("no BPF syscall", func(t *testing.T) {
		s := goodHost("h1")
		s.config = without(cfgModern, "CONFIG_BPF_SYSCALL")
		s.filesystems = []string{"nodev\tcgroup2", "\text4"}
		s.mounts = s.mounts[:1]
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckBPFSyscall: Fail, CheckBPFFS: Fail})
	})
	t.Run("JIT off", func(t *testing.T) {
		s := goodHost("h1")
		s.config = without(cfgModern, "CONFIG_BPF_JIT_ALWAYS_ON")
		s.jit = "0"
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckBPFJIT: Warn})
		s.jit = ""
		_, got = evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckBPFJIT: Warn})
	})
	t.Run("hybrid cgroups", func(t *testing.T) {
		s := goodHost("h1")
		s.mounts = []string{
			"tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0",
			"cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0",
			"cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0",
		}
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckCgroup2: Pass, CheckCgroupV2: Warn, CheckBPFFS: Pass})
		seenContains(t, got, CheckCgroup2, "/sys/fs/cgroup/unified", "hybrid")
		seenContains(t, got, CheckBPFFS, "not mounted yet")
	})
	t.Run("no cgroup2 mounted", func(t *testing.T) {
		s := goodHost("h1")
		s.mounts = []string{"cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0"}
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckCgroup2: Fail, CheckCgroupV2: Warn})
	})
}

func TestKubeadmPrerequisites(t *testing.T) {
	t.Run("swap on", func(t *testing.T) {
		s := goodHost("h1")
		s.swaps = append(s.swaps, "/swap.img                               file\t\t2097148\t\t1024\t\t-2")
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckSwap: Fail})
		seenContains(t, got, CheckSwap, "/swap.img", "2047 MiB")
		if !strings.Contains(got[CheckSwap].Remedy, "swapoff -a") || !strings.Contains(got[CheckSwap].Remedy, "fstab") {
			t.Errorf("swap remedy %q", got[CheckSwap].Remedy)
		}
	})
	t.Run("ip_forward", func(t *testing.T) {
		s := goodHost("h1")
		s.ipForward = "0"
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckIPForward: Fail})
		if !strings.Contains(got[CheckIPForward].Remedy, "sysctl") {
			t.Errorf("remedy %q", got[CheckIPForward].Remedy)
		}
		s.ipForward = "?"
		_, got = evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckIPForward: Warn})
	})
	t.Run("ports busy", func(t *testing.T) {
		s := goodHost("h1")
		s.tcp = append(s.tcp, "   1: 0100007F:094B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0")
		s.tcp6 = append(s.tcp6,
			"   1: 00000000000000000000000000000000:192B 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31338 1 0000000000000000 100 0 0 10 0",
			// An established connection to 10250 elsewhere is not a listener.
			"   2: 0000000000000000FFFF00000B0012C6:D0A2 0000000000000000FFFF00000C0012C6:280A 01 00000000:00000000 00:00000000 00000000     0        0 31339 1 0000000000000000 20 4 30 10 -1")
		_, got := evaluate(t, s, inventory.RoleControlPlane, Options{})
		want(t, got, map[string]Status{CheckPorts: Fail})
		seenContains(t, got, CheckPorts, "6443 (kube-apiserver) has a listener on [::]:6443", "2379 (etcd client) has a listener on 127.0.0.1:2379")
		if strings.Contains(got[CheckPorts].Seen, "10250") {
			t.Errorf("10250 reported busy: %q", got[CheckPorts].Seen)
		}
		// A worker only needs 10250.
		_, got = evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckPorts: Pass})
		seenContains(t, got, CheckPorts, "10250")
	})
	t.Run("kube binaries and runtime missing", func(t *testing.T) {
		s := goodHost("h1")
		s.bins = map[string]string{"iptables": "/usr/sbin/iptables"}
		s.sockets = nil
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckKubeadm: Warn, CheckKubelet: Warn, CheckCRISocket: Warn, CheckConntrack: Warn, CheckIptables: Pass})
		seenContains(t, got, CheckKubeadm, "will be needed")
		_, got = evaluate(t, s, inventory.RoleWorker, Options{RequireKubeBinaries: true})
		want(t, got, map[string]Status{CheckKubeadm: Fail, CheckKubelet: Fail, CheckCRISocket: Fail, CheckConntrack: Warn})
	})
	t.Run("no iptables nor nft", func(t *testing.T) {
		s := goodHost("h1")
		delete(s.bins, "iptables")
		delete(s.bins, "nft")
		s.iptablesVersion = ""
		_, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckIptables: Warn})
	})
	t.Run("several runtime sockets", func(t *testing.T) {
		s := goodHost("h1")
		s.sockets = []string{"/run/containerd/containerd.sock", "/var/run/containerd/containerd.sock", "/var/run/crio/crio.sock"}
		f, got := evaluate(t, s, inventory.RoleWorker, Options{})
		want(t, got, map[string]Status{CheckCRISocket: Warn})
		if w := []string{"/run/containerd/containerd.sock", "/run/crio/crio.sock"}; !slices.Equal(f.RuntimeSockets, w) {
			t.Errorf("sockets %q, want %q", f.RuntimeSockets, w)
		}
	})
	t.Run("hostnames", func(t *testing.T) {
		for name, st := range map[string]Status{
			"node-1": Pass, "node-1.example.com": Pass, "Node-1": Warn, "localhost": Warn,
			"node_1": Fail, "-node": Fail, "": Fail, strings.Repeat("a", 64): Fail,
		} {
			s := goodHost("h1")
			s.hostname = name
			_, got := evaluate(t, s, inventory.RoleWorker, Options{})
			if got[CheckHostname].Status != st {
				t.Errorf("hostname %q: %s, want %s (%q)", name, got[CheckHostname].Status, st, got[CheckHostname].Seen)
			}
		}
	})
	t.Run("machine-id", func(t *testing.T) {
		for id, st := range map[string]Status{
			"3d1219c7c4c5404aaa1f6d2a48adfda4": Pass, "": Warn, "uninitialized": Warn, "xyz": Warn,
		} {
			s := goodHost("h1")
			s.machineID = id
			_, got := evaluate(t, s, inventory.RoleWorker, Options{})
			if got[CheckMachineID].Status != st {
				t.Errorf("machine-id %q: %s, want %s", id, got[CheckMachineID].Status, st)
			}
		}
	})
}

func TestProbesAreAuthoritative(t *testing.T) {
	probes := func(no ...string) *ProbeReport {
		r := &ProbeReport{Ran: true, Results: map[string]ProbeResult{}}
		for _, k := range []string{ProbeProgCgroupSockAddr, ProbeProgSchedCLS, ProbeConnect4, ProbeConnect6,
			ProbeSendmsg4, ProbeSendmsg6, ProbeRecvmsg4, ProbeRecvmsg6, ProbeGetpeername4, ProbeGetpeername6, ProbeTCX} {
			r.Results[k] = ProbeResult{Supported: !slices.Contains(no, k)}
		}
		return r
	}
	eval := func(s spec, p *ProbeReport) map[string]Finding {
		f, err := ParseFacts([]byte(s.render()))
		if err != nil {
			t.Fatal(err)
		}
		f.Probe = p
		m := map[string]Finding{}
		for _, fd := range Evaluate("h1", inventory.RoleWorker, f, Options{}.withDefaults()) {
			m[fd.Check] = fd
		}
		return m
	}

	t.Run("RHEL 8 backports", func(t *testing.T) {
		s := goodHost("h1").withKernel("4.18.0-513.24.1.el8_9.x86_64", "#1 SMP Thu Mar 14 14:20:09 EDT 2024", "", cfgModern)
		s.configSource = "" // probes stand in for it
		got := eval(s, probes(ProbeGetpeername4, ProbeGetpeername6, ProbeTCX))
		want(t, got, map[string]Status{
			CheckKernelVersion: Warn, CheckKernelConfig: Pass, CheckProbe: Pass,
			CheckConnect: Pass, CheckSendmsg: Pass, CheckRecvmsg: Pass, CheckGetpeername: Warn,
			CheckCgroupBPF: Pass, CheckBPFSyscall: Pass, CheckTCX: Pass,
		})
		for _, c := range []string{CheckConnect, CheckGetpeername, CheckCgroupBPF, CheckTCX} {
			if got[c].Evidence != EvidenceProbed {
				t.Errorf("%s: evidence %q, want probed", c, got[c].Evidence)
			}
		}
		seenContains(t, got, CheckGetpeername, "probed", "getpeername4, getpeername6 not supported")
		seenContains(t, got, CheckKernelVersion, "backports")
	})
	t.Run("probe beats version", func(t *testing.T) {
		// 6.1 by version has recvmsg; a probe that says no wins.
		got := eval(goodHost("h1"), probes(ProbeRecvmsg6))
		want(t, got, map[string]Status{CheckRecvmsg: Fail})
	})
	t.Run("inconclusive falls back", func(t *testing.T) {
		p := probes()
		p.Results[ProbeConnect4] = ProbeResult{Err: "operation not permitted"}
		got := eval(goodHost("h1"), p)
		want(t, got, map[string]Status{CheckConnect: Pass, CheckProbe: Warn})
		if got[CheckConnect].Evidence != EvidenceConfig {
			t.Errorf("connect evidence %q, want config", got[CheckConnect].Evidence)
		}
	})
	t.Run("not root", func(t *testing.T) {
		got := eval(goodHost("h1"), &ProbeReport{Note: "not root (euid 1000)"})
		want(t, got, map[string]Status{CheckProbe: Warn, CheckConnect: Pass})
		seenContains(t, got, CheckProbe, "not root")
	})
}

func TestKernelVersionParse(t *testing.T) {
	for _, tc := range []struct {
		release, build, sig, want string
	}{
		{"6.18.44-fc-v782", "#1 SMP PREEMPT_DYNAMIC @0", "", "6.18.44"},
		{"5.10.0-30-amd64", "#1 SMP Debian 5.10.218-1 (2024-06-01)", "", "5.10.218"},
		{"5.15.0-91-generic", "#101-Ubuntu SMP Tue Nov 14 13:30:08 UTC 2023", "Ubuntu 5.15.0-91.101-generic 5.15.131", "5.15.131"},
		{"4.18.0-513.el8.x86_64", "#1 SMP", "", "4.18.0"},
		{"6.6", "", "", "6.6.0"},
		// A refinement for another major.minor is ignored.
		{"6.1.0-28-amd64", "#1 SMP Debian 5.10.218-1", "", "6.1.0"},
	} {
		v, ok := KernelVersion(tc.release, tc.build, tc.sig)
		if !ok || v.String() != tc.want {
			t.Errorf("KernelVersion(%q, %q, %q) = %s, %v; want %s", tc.release, tc.build, tc.sig, v, ok, tc.want)
		}
	}
	if _, ok := KernelVersion("garbage", "", ""); ok {
		t.Error("parsed garbage")
	}
	if !since(ver(4, 19, 57), ver(5, 2, 0), ver(4, 19, 57)) || since(ver(4, 19, 56), ver(5, 2, 0), ver(4, 19, 57)) ||
		since(ver(5, 0, 99), ver(5, 2, 0), ver(4, 19, 57), ver(5, 1, 16)) || !since(ver(5, 1, 16), ver(5, 2, 0), ver(5, 1, 16)) {
		t.Error("since() backport logic")
	}
}
