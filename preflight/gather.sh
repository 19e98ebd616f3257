# kpfree preflight: print facts about this host. Read-only: it reads files
# under /proc, /sys, /boot, /etc and /lib/modules and runs date, uname -m,
# zcat/grep and iptables --version; it changes nothing.
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

# Builtins only where a file is small: every fork and exec costs a few
# milliseconds of CPU, and preflight runs this on every host at once.

# first VAR FILE: VAR = the file's first line ("" if absent or unreadable).
first() {
	_v=
	[ -r "$2" ] && IFS= read -r _v <"$2" 2>/dev/null
	eval "$1=\$_v"
}

# sysctl KEY FILE: the file's first line, "?" if unreadable, "" if absent.
sysctl_kv() {
	if [ -e "$2" ]; then
		first _s "$2"
		kv "$1" "${_s:-?}"
	else
		kv "$1" ''
	fi
}

# lines FILE [PATTERN]: print the file's lines (matching the case PATTERN).
lines() {
	[ -r "$1" ] || return 0
	while IFS= read -r _l; do
		case $_l in
		$2) printf '%s\n' "$_l" ;;
		esac
	done <"$1"
}

# which NAME: VAR _w = the first executable NAME on PATH ("" if none).
which_() {
	_w=
	_IFS=$IFS
	IFS=:
	for _d in $PATH; do
		if [ -f "$_d/$1" ] && [ -x "$_d/$1" ]; then
			_w=$_d/$1
			break
		fi
	done
	IFS=$_IFS
}

section() { printf '@begin %s\n' "$1"; }
endsection() { printf '@end %s\n' "$1"; }

echo 'kpfree.begin=1'
# The clock first: the caller brackets the whole command with its own clock.
# busybox date without nanosecond support prints a literal %N.
kv time.now "$(date +%s.%N 2>/dev/null)"

first r /proc/sys/kernel/osrelease
[ -n "$r" ] || r=$(uname -r)
kv kernel.release "$r"
first v /proc/sys/kernel/version
kv kernel.build "$v"
kv kernel.machine "$(uname -m 2>/dev/null)"
first v /proc/version_signature
kv kernel.signature "$v"
first v /proc/sys/kernel/hostname
[ -n "$v" ] || v=$(uname -n 2>/dev/null)
kv host.name "$v"
v=
if [ -r /proc/self/status ]; then
	while read -r _k _u _rest; do
		if [ "$_k" = "Uid:" ]; then v=$_u; break; fi
	done </proc/self/status
fi
[ -n "$v" ] || v=$(id -u 2>/dev/null)
kv host.uid "$v"
first v /etc/machine-id
kv host.machine-id "$v"
first v /sys/class/dmi/id/product_uuid
kv host.product-uuid "$v"
if [ -r /etc/os-release ]; then
	while IFS= read -r _l; do
		case $_l in
		ID=* | VERSION_ID=* | PRETTY_NAME=*) printf 'os.%s\n' "$_l" ;;
		esac
	done </etc/os-release
fi

# Kernel config: /proc/config.gz (CONFIG_IKCONFIG_PROC), else the file the
# distribution installs next to the kernel. Only the options preflight reads.
cfgre='^CONFIG_(BPF|BPF_SYSCALL|BPF_JIT|BPF_JIT_ALWAYS_ON|HAVE_EBPF_JIT|CGROUPS|CGROUP_BPF|NET_SCH_INGRESS|NET_CLS_BPF|NET_CLS_ACT|NET_XGRESS|DEBUG_INFO_BTF|MODULES|IPV6|IP_VS|NF_CONNTRACK)='
dec=zcat
which_ zcat
[ -n "$_w" ] || dec='gzip -dc'
cfg=
kc=
if [ -r /proc/config.gz ]; then
	# Every config has CONFIG_CGROUPS or CONFIG_MODULES lines; an empty result
	# means the file could not be decompressed.
	kc=$($dec /proc/config.gz 2>/dev/null | grep -E "$cfgre")
	[ -n "$kc" ] && cfg=/proc/config.gz
fi
if [ -z "$cfg" ]; then
	if [ -r "/boot/config-$r" ]; then
		cfg="/boot/config-$r"
	elif [ -r "/lib/modules/$r/config" ]; then
		cfg="/lib/modules/$r/config"
	fi
	[ -n "$cfg" ] && kc=$(grep -E "$cfgre" "$cfg")
fi
kv kernel.config "$cfg"
if [ -n "$cfg" ]; then
	section kconfig
	[ -n "$kc" ] && printf '%s\n' "$kc"
	endsection kconfig
fi

# Modules for tc, as evidence when the config cannot be read:
# builtin | loaded | available | none ("" = no module index to look in).
for m in sch_ingress cls_bpf; do
	s=
	if [ -r "/lib/modules/$r/modules.builtin" ] && grep -qE "/$m\.ko\$" "/lib/modules/$r/modules.builtin"; then
		s=builtin
	elif [ -n "$(lines /proc/modules "$m *")" ]; then
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
lines /proc/filesystems '*'
endsection filesystems

section mounts
while read -r _dev _mnt _fs _rest; do
	case $_fs in
	cgroup2 | cgroup | bpf) printf '%s %s %s %s\n' "$_dev" "$_mnt" "$_fs" "$_rest" ;;
	esac
done </proc/mounts
endsection mounts

if [ -e /sys/kernel/btf/vmlinux ]; then kv kernel.btf /sys/kernel/btf/vmlinux; else kv kernel.btf ''; fi
sysctl_kv sysctl.net.core.bpf_jit_enable /proc/sys/net/core/bpf_jit_enable
sysctl_kv sysctl.net.ipv4.ip_forward /proc/sys/net/ipv4/ip_forward

section swaps
lines /proc/swaps '*'
endsection swaps

for b in kubeadm kubelet kubectl crictl iptables ip6tables nft conntrack; do
	which_ "$b"
	kv "bin.$b" "$_w"
done
which_ iptables
if [ -n "$_w" ]; then
	v=$("$_w" --version 2>/dev/null)
	kv iptables.version "${v%%
*}"
fi

socks=
for s in /run/containerd/containerd.sock /var/run/containerd/containerd.sock \
	/run/crio/crio.sock /var/run/crio/crio.sock \
	/run/cri-dockerd.sock /var/run/cri-dockerd.sock; do
	if [ -S "$s" ]; then socks="$socks $s"; fi
done
kv runtime.sockets "${socks# }"

# Listening TCP sockets only (st 0A); gather.go parses the lines. grep, not
# a shell loop: a busy host has thousands of sockets.
section tcp
grep ' 0A ' /proc/net/tcp 2>/dev/null
endsection tcp
section tcp6
grep ' 0A ' /proc/net/tcp6 2>/dev/null
endsection tcp6

echo 'kpfree.end=1'
exit 0
