#!/usr/bin/env bash
# Fetches the Debian kernels of the kernel matrix into a cache outside the
# repository and reduces each to what the VM runner needs:
#
#   ${KPFREE_CACHE:-$HOME/.cache/kpfree}/kernels/<name>/
#     vmlinuz        the kernel
#     config         its build configuration (grep CONFIG_... to check a feature)
#     release        its `uname -r`
#     source         the Debian package and version it came from
#     modules/*.ko   the wanted modules and their dependencies, decompressed
#     modules.load   module file names in load order (dependencies first)
#     builtin        wanted modules the kernel has built in (informational)
#     .complete      written last: a directory without it is refetched
#
# Kernels: 6.1 (bookworm, via the host's apt), 5.10 (bullseye) and 6.12
# (trixie), both via a private apt configuration under the cache, so the
# host's sources and lists stay as they are.
#
# Usage: test/kernels/fetch.sh [--refresh] [5.10|6.1|6.12|all|default]...
#   default (no argument) = 5.10 6.1; all = 5.10 6.1 6.12.
#   A kernel already in the cache is not looked up again (no network) unless
#   --refresh is given, which re-resolves the newest version.
# Env: KPFREE_CACHE (cache root), KPFREE_KERNEL_MODULES (modules to keep,
#   default "sch_ingress cls_bpf veth").
set -euo pipefail

CACHE=${KPFREE_CACHE:-$HOME/.cache/kpfree}
KDIR=$CACHE/kernels
WANT_MODULES=${KPFREE_KERNEL_MODULES:-sch_ingress cls_bpf veth}
refresh=0
WORKDIRS=()
trap 'rm -rf "${WORKDIRS[@]}"' EXIT

log() { echo "fetch-kernels: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Host tools: dpkg-deb and apt-get are always on Debian; xz/zstd only if a
# kernel ships compressed modules (checked when they are met).
need_tool() {
  local tool=$1 pkg=$2
  command -v "$tool" >/dev/null && return 0
  if [[ $(id -u) != 0 ]]; then die "$tool missing: apt-get install --no-install-recommends $pkg"; fi
  log "installing $pkg (for $tool)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null; }
}

# Newest linux-image-<series>.*-cloud-amd64 that apt can actually download
# (has a candidate), by version order of the package name.
newest_image() { # apt-args... -- series
  local -a aptargs=()
  while [[ $1 != -- ]]; do aptargs+=("$1"); shift; done
  shift
  local series=$1 pkg
  # bullseye/bookworm: linux-image-6.1.0-56-cloud-amd64;
  # trixie on: linux-image-6.12.118+deb13-cloud-amd64.
  local re="^linux-image-${series//./[.]}[.][0-9]+(-[0-9]+|[+]deb[0-9.]+)-cloud-amd64\$" list policy
  list=$(apt-cache "${aptargs[@]}" search --names-only "^linux-image-${series}" | awk '{print $1}' | grep -E "$re" | sort -V -r || true)
  for pkg in $list; do
    policy=$(apt-cache "${aptargs[@]}" policy "$pkg")
    if [[ $policy == *"Candidate: "[0-9]* ]]; then
      echo "$pkg"
      return 0
    fi
  done
}

# Private apt configuration for another Debian release: own sources.list,
# state, cache and lists under $CACHE/apt/<suite>.
private_apt_args() { # suite
  local suite=$1 d=$CACHE/apt/$1
  echo "-o Dir::State=$d/state -o Dir::State::status=$d/state/status -o Dir::Cache=$d/cache"
  echo "-o Dir::Etc::SourceList=$d/sources.list -o Dir::Etc::SourceParts=/dev/null"
  echo "-o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null"
  echo "-o Acquire::Check-Valid-Until=false -o APT::Sandbox::User=root -o Acquire::Languages=none"
  echo "-o APT::Architecture=amd64"
}

private_apt_setup() { # suite sources-lines...
  local suite=$1 d=$CACHE/apt/$1
  shift
  mkdir -p "$d/state/lists/partial" "$d/cache/archives/partial"
  [[ -f $d/state/status ]] || : >"$d/state/status"
  printf '%s\n' "$@" >"$d/sources.list"
  # shellcheck disable=SC2046
  apt-get $(private_apt_args "$suite") -qq update >&2 || die "apt-get update for $suite failed"
}

fetch_one() { # name
  local name=$1 dest=$KDIR/$1
  if [[ -f $dest/.complete && $refresh == 0 ]]; then
    log "$name: cached ($(cat "$dest/source")) in $dest"
    return 0
  fi
  local -a aptargs=()
  local series=$name
  case $name in
  6.1)
    # The host is bookworm: its own apt lists have 6.1. Update them only if
    # they know no cloud kernel at all (fresh machine).
    if [[ -z $(newest_image -- 6.1) ]]; then apt-get update -qq >&2; fi
    ;;
  5.10)
    private_apt_setup bullseye \
      "deb [trusted=yes] http://deb.debian.org/debian bullseye main" \
      "deb [trusted=yes] http://deb.debian.org/debian-security bullseye-security main"
    read -r -a aptargs <<<"$(private_apt_args bullseye | tr '\n' ' ')"
    ;;
  6.12)
    private_apt_setup trixie \
      "deb [trusted=yes] http://deb.debian.org/debian trixie main" \
      "deb [trusted=yes] http://deb.debian.org/debian-security trixie-security main"
    read -r -a aptargs <<<"$(private_apt_args trixie | tr '\n' ' ')"
    ;;
  *) die "unknown kernel '$name' (known: 5.10 6.1 6.12)" ;;
  esac

  local pkg
  pkg=$(newest_image "${aptargs[@]}" -- "$series")
  [[ -n $pkg ]] || die "$name: no linux-image-$series.*-cloud-amd64 found"
  local ver
  ver=$(apt-cache "${aptargs[@]}" policy "$pkg" | awk '/Candidate:/{print $2}')
  log "$name: $pkg $ver"

  local work
  work=$(mktemp -d "$KDIR/.work-$name.XXXXXX")
  WORKDIRS+=("$work")
  (cd "$work" && apt-get "${aptargs[@]}" -o APT::Sandbox::User=root -qq download "$pkg=$ver" >&2) ||
    die "$name: apt-get download $pkg=$ver failed"
  local deb
  deb=$(ls "$work"/*.deb)
  mkdir -p "$work/x"
  dpkg-deb -x "$deb" "$work/x"

  local release
  release=${pkg#linux-image-}
  local vmlinuz=$work/x/boot/vmlinuz-$release
  local moddir=$work/x/lib/modules/$release
  [[ -d $moddir ]] || moddir=$work/x/usr/lib/modules/$release
  [[ -f $vmlinuz ]] || die "$name: $deb has no boot/vmlinuz-$release"
  [[ -f $moddir/modules.builtin ]] || die "$name: $deb has no modules.builtin"

  local out=$work/out
  mkdir -p "$out/modules"
  cp "$vmlinuz" "$out/vmlinuz"
  if [[ -f $work/x/boot/config-$release ]]; then cp "$work/x/boot/config-$release" "$out/config"; fi
  echo "$release" >"$out/release"
  echo "$pkg $ver" >"$out/source"
  : >"$out/modules.load"
  : >"$out/builtin"

  # Debian's package has no modules.dep (depmod runs at install time), and the
  # host may lack kmod: read each module's dependencies from the "depends="
  # string of its .modinfo section and load dependencies first.
  local -A seen=()
  add_module() { # module name
    local m=$1 f base plain deps d
    local alt=${m//_/-}
    [[ -n ${seen[$m]:-} ]] && return 0
    seen[$m]=1
    if grep -Eq "(^|/)($m|$alt)\.ko$" "$moddir/modules.builtin"; then
      echo "$m" >>"$out/builtin"
      return 0
    fi
    f=$(find "$moddir/kernel" -type f \( -name "$m.ko*" -o -name "$alt.ko*" \) | head -n1)
    [[ -n $f ]] || die "$name: module $m is neither a module nor built in"
    base=${f##*/}
    case $base in
    *.ko.xz) need_tool xz xz-utils; plain=${base%.xz}; xz -dc "$f" >"$out/modules/$plain" ;;
    *.ko.zst) need_tool zstd zstd; plain=${base%.zst}; zstd -qdc "$f" >"$out/modules/$plain" ;;
    *.ko.gz) plain=${base%.gz}; gzip -dc "$f" >"$out/modules/$plain" ;;
    *.ko) plain=$base; cp "$f" "$out/modules/$plain" ;;
    *) die "$name: unexpected module file $f" ;;
    esac
    deps=$(tr '\0' '\n' <"$out/modules/$plain" | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do add_module "$d"; done
    echo "$plain" >>"$out/modules.load"
  }
  local m
  for m in $WANT_MODULES; do add_module "$m"; done

  rm -rf "$dest"
  mv "$out" "$dest"
  touch "$dest/.complete"
  rm -rf "$work"
  log "$name: $release -> $dest (modules: $(tr '\n' ' ' <"$dest/modules.load")builtin: $(tr '\n' ' ' <"$dest/builtin"))"
}

main() {
  local -a names=()
  for a in "$@"; do
    case $a in
    --refresh) refresh=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d;s/^# \{0,1\}//'; exit 0 ;;
    all) names+=(5.10 6.1 6.12) ;;
    default) names+=(5.10 6.1) ;;
    *) names+=("$a") ;;
    esac
  done
  ((${#names[@]})) || names=(5.10 6.1)
  command -v dpkg-deb >/dev/null || die "dpkg-deb missing (not Debian?)"
  command -v apt-get >/dev/null || die "apt-get missing (not Debian?)"
  mkdir -p "$KDIR"
  for n in "${names[@]}"; do fetch_one "$n"; done
}

main "$@"
