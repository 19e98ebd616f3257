#!/usr/bin/env bash
# make demo (init): a two-node Kubernetes lab on this machine, then
#   kpfree init    kubeadm without kube-proxy, pod networking, kpfree-agent
#   kpfree verify  no kube-proxy anywhere; ClusterIP and NodePort from every node
# The lab stays up for you to explore (the kubeconfig path is printed);
# remove it with `bin/kpfree lab down`.
#
# Lab nodes are not real hosts: test/e2e/labinit writes what they need from
# kpfree init (kubelet with cgroupfs, each node's cgroupRoot as a kubeadm
# patch, the agent attached to the node's own cgroup2 subtree) and imports a
# kpfree-agent image built from this tree into every node.
set -euo pipefail
cd "$(dirname "$0")/.."
KPFREE=${KPFREE:-bin/kpfree}
NODES=${NODES:-2}
LAB_DIR=${KPFREE_LAB_DIR:-/var/lib/kpfree-lab}
# A second lab beside yours: LAB_PREFIX=kpd LAB_SUBNET=198.18.5.0/24.
LAB_FLAGS=(${LAB_PREFIX:+--prefix "$LAB_PREFIX"} ${LAB_SUBNET:+--subnet "$LAB_SUBNET"})
WORK=${WORK:-$LAB_DIR/init}

if [[ $(id -u) != 0 ]]; then
  echo "demo-init: needs root (network namespaces, containerd, kubelet)" >&2
  exit 1
fi
[[ -x $KPFREE ]] || go build -o "$KPFREE" ./cmd/kpfree

echo "== kpfree lab up --kubernetes --nodes $NODES"
$KPFREE lab up --kubernetes --nodes "$NODES" --dir "$LAB_DIR" "${LAB_FLAGS[@]}"
inv=$LAB_DIR/hosts.yaml

echo
echo "== preparing the lab nodes for kpfree init (test/e2e/labinit)"
mkdir -p "$WORK"
mapfile -t flags < <(go run ./test/e2e/labinit/prepare -lab-dir "$LAB_DIR" -out "$WORK")

echo
echo "== kpfree init --nodes $inv"
# Go on when a check fails (the demo shows everything); exit with the worst.
rc=0
$KPFREE init --nodes "$inv" --kubeconfig-out "$WORK/kubeconfig" "${flags[@]}" || rc=$?

echo
echo "== kpfree verify --nodes $inv"
# agnhost as lab up imports it (test/images tags it 2.53 too).
$KPFREE verify --nodes "$inv" --kubeconfig "$WORK/kubeconfig" --image registry.k8s.io/e2e-test-images/agnhost:2.53 || rc=$?

echo
echo "== a second kpfree init changes nothing"
$KPFREE init --nodes "$inv" --kubeconfig-out "$WORK/kubeconfig" "${flags[@]}" --no-verify || rc=$?

echo
echo "The cluster is up: export KUBECONFIG=$WORK/kubeconfig; remove it with: $KPFREE lab down --dir $LAB_DIR"
exit $rc
