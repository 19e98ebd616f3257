package preflight

import (
	"context"
	"crypto/md5"
	"fmt"
	"io/fs"
	"maps"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/kpfree/kpfree/internal/ssh"
)

// spec describes a host as the gather script would print it.
type spec struct {
	release, build, signature, os    string
	hostname, machineID, productUUID string
	configSource                     string
	config                           []string
	modules                          map[string]string
	filesystems, mounts, swaps       []string
	btf                              bool
	jit, ipForward                   string
	bins                             map[string]string
	iptablesVersion                  string
	sockets                          []string
	tcp, tcp6                        []string
	clockOffset                      time.Duration // added to time.Now() at render time
	noNanos                          bool          // busybox date: literal %N
}

var (
	cfgModern = []string{
		"CONFIG_BPF=y", "CONFIG_HAVE_EBPF_JIT=y", "CONFIG_BPF_SYSCALL=y", "CONFIG_BPF_JIT=y",
		"CONFIG_BPF_JIT_ALWAYS_ON=y", "CONFIG_CGROUPS=y", "CONFIG_CGROUP_BPF=y", "CONFIG_IPV6=y",
		"CONFIG_NET_SCH_INGRESS=m", "CONFIG_NET_CLS_BPF=m", "CONFIG_NET_CLS_ACT=y",
		"CONFIG_DEBUG_INFO_BTF=y", "CONFIG_MODULES=y", "CONFIG_NF_CONNTRACK=m",
	}
	cfgNoBTF = slices.DeleteFunc(slices.Clone(cfgModern), func(s string) bool { return strings.HasPrefix(s, "CONFIG_DEBUG_INFO_BTF=") })
	cfg618   = append(slices.Clone(cfgModern), "CONFIG_NET_XGRESS=y")
)

const (
	sshdTCP  = "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 18940 1 0000000000000000 100 0 0 10 0"
	sshdTCP6 = "   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 18951 1 0000000000000000 100 0 0 10 0"
)

// goodHost is a Debian 12 host ready for kubeadm.
func goodHost(name string) spec {
	return spec{
		release:      "6.1.0-28-cloud-amd64",
		build:        "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)",
		os:           "Debian GNU/Linux 12 (bookworm)",
		hostname:     name,
		machineID:    fmt.Sprintf("%x", md5.Sum([]byte(name))),
		productUUID:  fmt.Sprintf("%x", md5.Sum([]byte("uuid-"+name))),
		configSource: "/boot/config-6.1.0-28-cloud-amd64",
		config:       cfgModern,
		modules:      map[string]string{"sch_ingress": "available", "cls_bpf": "available"},
		filesystems:  []string{"nodev\tsysfs", "nodev\tcgroup", "nodev\tcgroup2", "nodev\tbpf", "\text4"},
		mounts: []string{
			"cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0",
			"bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0",
		},
		swaps:     []string{"Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority"},
		btf:       true,
		jit:       "1",
		ipForward: "1",
		bins: map[string]string{
			"kubeadm": "/usr/bin/kubeadm", "kubelet": "/usr/bin/kubelet", "kubectl": "/usr/bin/kubectl",
			"crictl": "/usr/bin/crictl", "iptables": "/usr/sbin/iptables", "ip6tables": "/usr/sbin/ip6tables",
			"nft": "/usr/sbin/nft", "conntrack": "/usr/sbin/conntrack",
		},
		iptablesVersion: "iptables v1.8.9 (nf_tables)",
		sockets:         []string{"/run/containerd/containerd.sock"},
		tcp:             []string{sshdTCP},
		tcp6:            []string{sshdTCP6},
	}
}

func (s spec) withKernel(release, build, signature string, cfg []string) spec {
	s.release, s.build, s.signature, s.config = release, build, signature, cfg
	if s.configSource != "" {
		s.configSource = "/boot/config-" + release
	}
	return s
}

func (s spec) render() string {
	var b strings.Builder
	kv := func(k, v string) { fmt.Fprintf(&b, "%s=%s\n", k, v) }
	sec := func(name string, lines []string) {
		fmt.Fprintf(&b, "@begin %s\n", name)
		for _, l := range lines {
			b.WriteString(l + "\n")
		}
		fmt.Fprintf(&b, "@end %s\n", name)
	}
	b.WriteString("Welcome to a noisy .bashrc\n") // ignored: before kpfree.begin
	kv("kpfree.begin", "1")
	now := time.Now().Add(s.clockOffset)
	if s.noNanos {
		kv("time.now", fmt.Sprintf("%d.%%N", now.Unix()))
	} else {
		kv("time.now", fmt.Sprintf("%d.%09d", now.Unix(), now.Nanosecond()))
	}
	kv("kernel.release", s.release)
	kv("kernel.build", s.build)
	kv("kernel.machine", "x86_64")
	kv("kernel.signature", s.signature)
	kv("host.name", s.hostname)
	kv("host.uid", "0")
	kv("host.machine-id", s.machineID)
	kv("host.product-uuid", s.productUUID)
	kv("os.PRETTY_NAME", `"`+s.os+`"`)
	kv("kernel.config", s.configSource)
	if s.configSource != "" {
		sec("kconfig", s.config)
	}
	for _, m := range []string{"sch_ingress", "cls_bpf"} {
		kv("module."+m, s.modules[m])
	}
	sec("filesystems", s.filesystems)
	sec("mounts", s.mounts)
	if s.btf {
		kv("kernel.btf", "/sys/kernel/btf/vmlinux")
	} else {
		kv("kernel.btf", "")
	}
	kv("sysctl.net.core.bpf_jit_enable", s.jit)
	kv("sysctl.net.ipv4.ip_forward", s.ipForward)
	sec("swaps", s.swaps)
	for _, n := range slices.Sorted(maps.Keys(s.bins)) {
		kv("bin."+n, s.bins[n])
	}
	if s.iptablesVersion != "" {
		kv("iptables.version", s.iptablesVersion)
	}
	kv("runtime.sockets", strings.Join(s.sockets, " "))
	sec("tcp", s.tcp)
	sec("tcp6", s.tcp6)
	kv("kpfree.end", "1")
	return b.String()
}

// fakeExec answers every command with a rendered spec (or an error).
type fakeExec struct {
	name   string
	spec   spec
	output string // used instead of spec when set
	exit   int
	stderr string
	err    error
	delay  time.Duration

	running, peak *atomic.Int32 // concurrency accounting, optional
	calls         atomic.Int32
}

func (f *fakeExec) Name() string { return f.name }

func (f *fakeExec) Run(ctx context.Context, cmd string) (ssh.Result, error) {
	f.calls.Add(1)
	if cmd != Script {
		return ssh.Result{}, fmt.Errorf("fake: unexpected command %.40q", cmd)
	}
	if f.running != nil {
		n := f.running.Add(1)
		defer f.running.Add(-1)
		for {
			p := f.peak.Load()
			if n <= p || f.peak.CompareAndSwap(p, n) {
				break
			}
		}
	}
	if f.delay > 0 {
		select {
		case <-time.After(f.delay):
		case <-ctx.Done():
			return ssh.Result{}, ctx.Err()
		}
	}
	if f.err != nil {
		return ssh.Result{}, f.err
	}
	out := f.output
	if out == "" {
		out = f.spec.render()
	}
	return ssh.Result{Stdout: []byte(out), Stderr: []byte(f.stderr), ExitCode: f.exit}, nil
}

func (f *fakeExec) Upload(context.Context, []byte, string, fs.FileMode) error {
	return fmt.Errorf("fake: preflight must not upload")
}

func (f *fakeExec) Close() error { return nil }
