# kpfree preflight: print facts about this host. Read-only: it reads files
# under /proc, /sys, /boot, /etc and /lib/modules and runs uname, id, date,
# iptables --version and `command -v`; it changes nothing.
#
# Portable POSIX sh (dash, bash, busybox ash); no bashisms, no functions with
# `local`, nothing that needs GNU options.
#
# Output, parsed by gather.go (keep the two in step):
#   key=value             one fact per line; an empty value means "absent",
#                         "?" means "exists but could not be read"
#   @begin NAME ... @end NAME
#                         a section: raw lines of a file (filtered)
# Everything before kpfree.begin=1 (e.g. noise from shell rc files) is ignored,
# and a missing kpfree.end=1 means the output was cut short.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/bin:$PATH
LC_ALL=C
export PATH LC_ALL

kv() { printf '%s=%s\n' "$1" "$2"; }

# sysctl KEY FILE: the file's first line, "?" if unreadable, "" if absent.
sysctl_kv() {
	if [ -e "$2" ]; then
		v=$(head -n 1 "$2" 2>/dev/null) || v='?'
		kv "$1" "${v:-?}"
	else
		kv "$1" ''
	fi
}

section() { printf '@begin %s\n' "$1"; }
endsection() { printf '@end %s\n' "$1"; }

echo 'kpfree.begin=1'
# The clock first: the caller brackets the whole command with its own clock.
# busybox date without nanosecond support prints a literal %N.
kv time.now "$(date +%s.%N 2>/dev/null)"

r=$(uname -r)
kv kernel.release "$r"
kv kernel.build "$(uname -v 2>/dev/null)"
kv kernel.machine "$(uname -m 2>/dev/null)"
kv kernel.signature "$(head -n 1 /proc/version_signature 2>/dev/null)"
kv host.name "$(uname -n 2>/dev/null)"
kv host.uid "$(id -u 2>/dev/null)"
kv host.machine-id "$(head -n 1 /etc/machine-id 2>/dev/null)"
kv host.product-uuid "$(head -n 1 /sys/class/dmi/id/product_uuid 2>/dev/null)"
if [ -r /etc/os-release ]; then
	grep -E '^(ID|VERSION_ID|PRETTY_NAME)=' /etc/os-release | sed 's/^/os./'
fi

# Kernel config: /proc/config.gz (CONFIG_IKCONFIG_PROC), else the file the
# distribution installs next to the kernel. Only the options preflight reads.
cfgre='^CONFIG_(BPF|BPF_SYSCALL|BPF_JIT|BPF_JIT_ALWAYS_ON|HAVE_EBPF_JIT|CGROUPS|CGROUP_BPF|NET_SCH_INGRESS|NET_CLS_BPF|NET_CLS_ACT|NET_XGRESS|DEBUG_INFO_BTF|MODULES|IPV6|IP_VS|NF_CONNTRACK)='
dec=zcat
command -v zcat >/dev/null 2>&1 || dec='gzip -dc'
cfg=
if [ -r /proc/config.gz ] && $dec /proc/config.gz >/dev/null 2>&1; then
	cfg=/proc/config.gz
elif [ -r "/boot/config-$r" ]; then
	cfg="/boot/config-$r"
elif [ -r "/lib/modules/$r/config" ]; then
	cfg="/lib/modules/$r/config"
fi
kv kernel.config "$cfg"
if [ -n "$cfg" ]; then
	section kconfig
	case $cfg in
	*.gz) $dec "$cfg" 2>/dev/null | grep -E "$cfgre" ;;
	*) grep -E "$cfgre" "$cfg" ;;
	esac
	endsection kconfig
fi

# Modules for tc, as evidence when the config cannot be read:
# builtin | loaded | available | none ("" = no module index to look in).
for m in sch_ingress cls_bpf; do
	s=
	if [ -r "/lib/modules/$r/modules.builtin" ] && grep -qE "/$m\.ko\$" "/lib/modules/$r/modules.builtin"; then
		s=builtin
	elif grep -qE "^$m " /proc/modules 2>/dev/null; then
		s=loaded
	elif [ -r "/lib/modules/$r/modules.dep" ]; then
		if grep -qE "/$m\.ko(\.[a-z0-9]+)?:" "/lib/modules/$r/modules.dep"; then
			s=available
		else
			s=none
		fi
	fi
	kv "module.$m" "$s"
done

section filesystems
cat /proc/filesystems 2>/dev/null
endsection filesystems

section mounts
grep -E '^[^ ]+ [^ ]+ (cgroup2|cgroup|bpf) ' /proc/mounts 2>/dev/null
endsection mounts

if [ -e /sys/kernel/btf/vmlinux ]; then kv kernel.btf /sys/kernel/btf/vmlinux; else kv kernel.btf ''; fi
sysctl_kv sysctl.net.core.bpf_jit_enable /proc/sys/net/core/bpf_jit_enable
sysctl_kv sysctl.net.ipv4.ip_forward /proc/sys/net/ipv4/ip_forward

section swaps
cat /proc/swaps 2>/dev/null
endsection swaps

for b in kubeadm kubelet kubectl crictl iptables ip6tables nft conntrack; do
	kv "bin.$b" "$(command -v "$b" 2>/dev/null)"
done
if command -v iptables >/dev/null 2>&1; then
	kv iptables.version "$(iptables --version 2>/dev/null | head -n 1)"
fi

socks=
for s in /run/containerd/containerd.sock /var/run/containerd/containerd.sock \
	/run/crio/crio.sock /var/run/crio/crio.sock \
	/run/cri-dockerd.sock /var/run/cri-dockerd.sock; do
	if [ -S "$s" ]; then socks="$socks $s"; fi
done
kv runtime.sockets "${socks# }"

# Listening TCP sockets only (st 0A); gather.go parses the lines.
section tcp
grep ' 0A ' /proc/net/tcp 2>/dev/null
endsection tcp
section tcp6
grep ' 0A ' /proc/net/tcp6 2>/dev/null
endsection tcp6

echo 'kpfree.end=1'
exit 0
