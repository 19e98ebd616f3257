#!/usr/bin/env bash
# Runs Go test binaries inside Debian kernels under qemu (TCG).
#
# Usage: test/kernels/run.sh KERNELS [vmrun flags] TEST-BINARY... [-- TESTFLAG...]
#   KERNELS: 5.10 | 6.1 | 6.12 | 5.10,6.1 | default (= 5.10,6.1) | all (= 5.10,6.1,6.12)
#   Fetches missing kernels (test/kernels/fetch.sh; a no-op when cached),
#   builds test/kernels/vmrun, and runs it. Binaries must be static:
#   CGO_ENABLED=0 go test -c -o DIR/ ./pkg/...
#   vmrun flags: -timeout 5m -mem 1024 -j 1 -env K=V -log-dir DIR -keep (see vmrun -h).
# Example:
#   CGO_ENABLED=0 go test -c -o /tmp/t/ ./test/kernels/smoke
#   test/kernels/run.sh default /tmp/t/smoke.test -- -test.count=1
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
CACHE=${KPFREE_CACHE:-$HOME/.cache/kpfree}
export KPFREE_CACHE=$CACHE

if (($# < 2)); then
  sed -n '2,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//' >&2
  exit 2
fi
spec=$1
shift
case $spec in
default) kernels=(5.10 6.1) ;;
all) kernels=(5.10 6.1 6.12) ;;
*) IFS=, read -r -a kernels <<<"$spec" ;;
esac

"$here/fetch.sh" "${kernels[@]}"

for tool in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static; do
  bin=${tool%%:*} pkg=${tool#*:}
  if ! command -v "$bin" >/dev/null || { [[ $bin == busybox ]] && ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; }; then
    if [[ $(id -u) != 0 ]]; then
      echo "run-kernels: $pkg missing: apt-get install --no-install-recommends $pkg" >&2
      exit 1
    fi
    echo "run-kernels: installing $pkg" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  fi
done

vmrun=$CACHE/bin/vmrun
mkdir -p "$CACHE/bin"
(cd "$root" && CGO_ENABLED=0 go build -o "$vmrun" ./test/kernels/vmrun)
joined=$(IFS=,; echo "${kernels[*]}")
exec "$vmrun" -kernel "$joined" "$@"
