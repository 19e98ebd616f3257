#!/usr/bin/env bash
# make demo: the main job on a local default. Brings up lab nodes on this
# machine (network namespaces running OpenSSH, bridge 198.18.0.1/24), then
# runs kpfree against them. The lab stays up for you to explore; remove it
# with `bin/kpfree lab down`.
set -euo pipefail
cd "$(dirname "$0")/.."
KPFREE=${KPFREE:-bin/kpfree}
NODES=${NODES:-3}

if [[ $(id -u) != 0 ]]; then
  echo "demo: needs root (network namespaces, sshd)" >&2
  exit 1
fi

$KPFREE lab up --nodes "$NODES"
inv=$($KPFREE lab up --nodes "$NODES" -o json 2>/dev/null | sed -n 's/.*"inventory": "\(.*\)".*/\1/p')
echo
echo "== kpfree preflight --nodes $inv"
# Lab nodes start with ip_forward=0 in their own network namespaces, like a
# fresh host: preflight says so and how to fix it.
$KPFREE preflight --nodes "$inv" || true
echo
echo "== fixing what preflight found (ip_forward, inside each node) and checking again"
for ns in $($KPFREE lab up --nodes "$NODES" -o json 2>/dev/null | sed -n 's/.*"netns": "\(.*\)".*/\1/p'); do
  nsenter --net="$ns" sysctl -qw net.ipv4.ip_forward=1
done
$KPFREE preflight --nodes "$inv"
echo
echo "The lab is still up: ssh into it with the line above, or remove it: $KPFREE lab down"
