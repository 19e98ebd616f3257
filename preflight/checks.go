package preflight

import (
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/kpfree/kpfree/internal/inventory"
)

// Evaluate judges one host's facts. It is pure: the same facts, role and
// options always give the same findings, in check order. Cross-host checks
// are CrossHost's.
func Evaluate(host string, role inventory.Role, f *Facts, opts Options) []Finding {
	out := evaluateKernel(f)
	out = append(out,
		checkSwap(f),
		checkIPForward(f),
		checkCgroupV2(f),
		checkPorts(f, role),
		checkBinary(f, CheckKubeadm, "kubeadm", opts.RequireKubeBinaries),
		checkBinary(f, CheckKubelet, "kubelet", opts.RequireKubeBinaries),
		checkCRISocket(f, opts.RequireKubeBinaries),
		checkIptables(f),
		checkConntrack(f),
		checkHostname(f),
		checkMachineID(f),
	)
	for i := range out {
		out[i].Host = host
		if out[i].Status == Pass {
			out[i].Remedy = ""
		}
	}
	sortFindings(out)
	return out
}

func sortFindings(fs []Finding) {
	slices.SortStableFunc(fs, func(a, b Finding) int { return checkRank(a.Check) - checkRank(b.Check) })
}

func checkSwap(f *Facts) Finding {
	fd := Finding{Check: CheckSwap}
	if len(f.Swaps) == 0 {
		fd.Status, fd.Seen = Pass, "no active swap"
		return fd
	}
	var s []string
	for _, sw := range f.Swaps {
		s = append(s, fmt.Sprintf("%s (%s, %d MiB, %d MiB used)", sw.Name, sw.Type, sw.SizeKiB/1024, sw.UsedKiB/1024))
	}
	fd.Status = Fail
	fd.Seen = "active swap: " + strings.Join(s, ", ") + "; kubelet refuses to start with swap on (failSwapOn defaults to true)"
	fd.Remedy = "swapoff -a, then remove the swap entries from /etc/fstab (and disable swap units or zram) so it stays off after a reboot"
	return fd
}

func checkIPForward(f *Facts) Finding {
	fd := Finding{Check: CheckIPForward}
	const remedy = "sysctl -w net.ipv4.ip_forward=1, and persist it: echo net.ipv4.ip_forward=1 > /etc/sysctl.d/99-kubernetes.conf"
	switch f.IPForward {
	case "1":
		fd.Status, fd.Seen = Pass, "net.ipv4.ip_forward=1"
	case "0":
		fd.Status, fd.Seen, fd.Remedy = Fail, "net.ipv4.ip_forward=0: pods' traffic is not routed; kubeadm's preflight refuses it", remedy
	default:
		fd.Status, fd.Seen, fd.Remedy = Warn, fmt.Sprintf("cannot read net.ipv4.ip_forward (%q)", f.IPForward), remedy
	}
	return fd
}

func checkCgroupV2(f *Facts) Finding {
	fd := Finding{Check: CheckCgroupV2}
	if f.cgroup2Path() == "/sys/fs/cgroup" {
		fd.Status, fd.Seen = Pass, "cgroup v2 (unified hierarchy at /sys/fs/cgroup)"
		return fd
	}
	layout := "cgroup v1"
	if p := f.cgroup2Path(); p != "" {
		layout = "hybrid (cgroup v1 at /sys/fs/cgroup, cgroup2 at " + p + ")"
	}
	fd.Status = Warn
	fd.Seen = layout + ": kubelet sees cgroup v1, which is in maintenance mode since Kubernetes 1.31 and refused by kubelet 1.35+ unless failCgroupV1: false"
	fd.Remedy = "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1), or set failCgroupV1: false in the kubelet configuration"
	return fd
}

type portUse struct {
	port uint16
	what string
}

var (
	controlPlanePorts = []portUse{
		{6443, "kube-apiserver"}, {2379, "etcd client"}, {2380, "etcd peer"},
		{10250, "kubelet"}, {10257, "kube-controller-manager"}, {10259, "kube-scheduler"},
	}
	workerPorts = []portUse{{10250, "kubelet"}}
)

func checkPorts(f *Facts, role inventory.Role) Finding {
	fd := Finding{Check: CheckPorts}
	want := workerPorts
	if role == inventory.RoleControlPlane {
		want = controlPlanePorts
	}
	var busy, free []string
	for _, p := range want {
		var by []string
		for _, l := range f.Listeners {
			if l.Local.Port() == p.port {
				by = append(by, l.Local.String())
			}
		}
		if len(by) > 0 {
			busy = append(busy, fmt.Sprintf("%d (%s) has a listener on %s", p.port, p.what, strings.Join(by, ", ")))
		} else {
			free = append(free, fmt.Sprint(p.port))
		}
	}
	if len(busy) == 0 {
		fd.Status, fd.Seen = Pass, fmt.Sprintf("%s ports free: %s", role, strings.Join(free, ", "))
		return fd
	}
	fd.Status = Fail
	fd.Seen = "in use: " + strings.Join(busy, "; ")
	fd.Remedy = "stop what listens there (find it with `ss -ltnp 'sport = :PORT'`); if Kubernetes already runs on this host, `kubeadm reset` it first"
	return fd
}

func checkBinary(f *Facts, check, name string, required bool) Finding {
	fd := Finding{Check: check}
	if p := f.Binaries[name]; p != "" {
		fd.Status, fd.Seen = Pass, p
		return fd
	}
	fd.Status, fd.Seen = Warn, name+" not found in PATH: it will be needed to init or join"
	if required {
		fd.Status, fd.Seen = Fail, name+" not found in PATH"
	}
	fd.Remedy = "install " + name + " (pkgs.k8s.io packages or the release binary) in /usr/bin or /usr/local/bin"
	return fd
}

// knownCRISockets are the runtime sockets kubeadm looks for.
var knownCRISockets = []string{"/run/containerd/containerd.sock", "/run/crio/crio.sock", "/run/cri-dockerd.sock"}

func checkCRISocket(f *Facts, required bool) Finding {
	fd := Finding{Check: CheckCRISocket}
	switch len(f.RuntimeSockets) {
	case 0:
		fd.Status, fd.Seen = Warn, "no container runtime socket ("+strings.Join(knownCRISockets, ", ")+"): one will be needed to init or join"
		if required {
			fd.Status, fd.Seen = Fail, "no container runtime socket ("+strings.Join(knownCRISockets, ", ")+")"
		}
		fd.Remedy = "install and start a container runtime, e.g. containerd (systemctl enable --now containerd) or CRI-O"
	case 1:
		fd.Status, fd.Seen = Pass, f.RuntimeSockets[0]
	default:
		fd.Status = Warn
		fd.Seen = "several runtime sockets: " + strings.Join(f.RuntimeSockets, ", ") + "; kubeadm refuses to guess"
		fd.Remedy = "set nodeRegistration.criSocket to the one to use, or stop the others"
	}
	return fd
}

func checkIptables(f *Facts) Finding {
	fd := Finding{Check: CheckIptables}
	var have []string
	if p := f.Binaries["iptables"]; p != "" {
		s := p
		if f.IptablesVersion != "" {
			s += " (" + f.IptablesVersion + ")"
		}
		have = append(have, s)
	}
	if p := f.Binaries["nft"]; p != "" {
		have = append(have, p)
	}
	if len(have) > 0 {
		fd.Status, fd.Seen = Pass, strings.Join(have, ", ")
		return fd
	}
	fd.Status = Warn
	fd.Seen = "neither iptables nor nft found: CNI plugins (portmap, masquerade) and kpfree's kube-proxy scrub use them"
	fd.Remedy = "install iptables (or nftables)"
	return fd
}

func checkConntrack(f *Facts) Finding {
	fd := Finding{Check: CheckConntrack}
	if p := f.Binaries["conntrack"]; p != "" {
		fd.Status, fd.Seen = Pass, p
		return fd
	}
	fd.Status = Warn
	fd.Seen = "conntrack not found: stale conntrack entries (old kube-proxy DNATs) cannot be flushed after a migration"
	fd.Remedy = "install conntrack (Debian/Ubuntu: conntrack; RHEL-likes: conntrack-tools)"
	return fd
}

var dnsLabelRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// validDNSSubdomain checks RFC 1123 subdomain syntax, as Kubernetes does for node names.
func validDNSSubdomain(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(s, ".") {
		if len(l) > 63 || !dnsLabelRE.MatchString(l) {
			return false
		}
	}
	return true
}

func checkHostname(f *Facts) Finding {
	fd := Finding{Check: CheckHostname}
	h, lower := f.Hostname, strings.ToLower(f.Hostname)
	const remedy = "set a lowercase DNS name: hostnamectl set-hostname NAME"
	switch {
	case h == "":
		fd.Status, fd.Seen, fd.Remedy = Fail, "no hostname", remedy
	case !validDNSSubdomain(lower):
		fd.Status, fd.Remedy = Fail, remedy
		fd.Seen = fmt.Sprintf("%q is not a valid node name (RFC 1123: lowercase letters, digits, '-' and '.', labels up to 63)", h)
	case lower != h:
		fd.Status, fd.Remedy = Warn, remedy
		fd.Seen = fmt.Sprintf("%q has uppercase letters: kubeadm lowercases it, so the node will be %q", h, lower)
	case lower == "localhost" || strings.HasPrefix(lower, "localhost."):
		fd.Status, fd.Remedy = Warn, remedy
		fd.Seen = fmt.Sprintf("%q: every unconfigured host has this name", h)
	default:
		fd.Status, fd.Seen = Pass, h
	}
	return fd
}

var machineIDRE = regexp.MustCompile(`^[0-9a-f]{32}$`)

func checkMachineID(f *Facts) Finding {
	fd := Finding{Check: CheckMachineID}
	const remedy = "generate one: systemd-machine-id-setup (or dbus-uuidgen --ensure=/etc/machine-id)"
	switch id := f.MachineID; {
	case id == "":
		fd.Status, fd.Seen, fd.Remedy = Warn, "/etc/machine-id missing or empty: kubelet reports no machine ID", remedy
	case id == "uninitialized":
		fd.Status, fd.Seen, fd.Remedy = Warn, "/etc/machine-id is \"uninitialized\" (first boot not completed)", remedy
	case !machineIDRE.MatchString(id):
		fd.Status, fd.Seen, fd.Remedy = Warn, fmt.Sprintf("/etc/machine-id %q is not 32 hex digits", id), remedy
	default:
		fd.Status, fd.Seen = Pass, id
	}
	return fd
}
