#!/usr/bin/env bash
# Installs the Debian packages kpfree's build and tests need, when missing.
# Idempotent and quick when everything is there. Run as root.
set -euo pipefail

pkgs=(
  # lab nodes and SSH
  openssh-server openssh-client sudo iproute2 util-linux procps
  # what kube-proxy and the scrubber touch
  iptables nftables conntrack
  # Kubernetes lab nodes (kpfree lab up --kubernetes): each node runs its own
  # containerd (CNI plugins in /usr/lib/cni)
  containerd runc containernetworking-plugins
  # load and smoke tests
  socat apache2-utils curl
  # BPF toolchain (bpf2go)
  clang llvm libbpf-dev bpftool
  # kernel matrix (make test-kernels)
  qemu-system-x86 busybox-static
  # misc
  git make ca-certificates time
)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "install-deps: missing packages: ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
