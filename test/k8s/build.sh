#!/usr/bin/env bash
# Builds pinned Kubernetes, etcd and CoreDNS binaries from the Go module proxy
# into ${KPFREE_CACHE:-$HOME/.cache/kpfree}/k8s/<k8s version>/bin.
#
#   test/k8s/build.sh              build what is missing or stale (warm: no-op)
#   test/k8s/build.sh --print-dir  print the bin directory and exit (no build)
#   test/k8s/build.sh --force      rebuild everything
#
# Three tools modules pin the sources, each with a committed go.sum:
#   test/k8s/go.mod          k8s.io/kubernetes (+ staging modules) and agnhost
#   test/k8s/etcd/go.mod     etcd server and etcdctl
#   test/k8s/coredns/go.mod  CoreDNS
# To change a version: edit the version below AND the module's go.mod, then
# `make -C test/k8s tidy`.
#
# Module and build caches are Go's defaults (GOMODCACHE, GOCACHE), outside the
# repo. A cold build takes tens of minutes on 2 cores; the stamp file makes a
# warm run a no-op.
set -euo pipefail

K8S_VERSION=v1.34.4
# The module proxy does not carry the git commit of a k8s.io/kubernetes tag.
K8S_GIT_COMMIT=""
# Tag time of k8s.io/kubernetes v1.34.4 on the module proxy: a fixed build date
# keeps the binaries reproducible.
K8S_BUILD_DATE=2026-02-10T12:53:36Z
AGNHOST_VERSION=2.56 # test/images/agnhost/VERSION in k8s.io/kubernetes v1.34.4
ETCD_VERSION=v3.6.5
ETCD_GIT_SHA=a061450 # tag v3.6.5 (short, as etcd's own build prints it)
COREDNS_VERSION=v1.12.1
COREDNS_GIT_COMMIT=707c7c1 # tag v1.12.1

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${KPFREE_CACHE:-$HOME/.cache/kpfree}
topdir=$cache/k8s/$K8S_VERSION
bindir=$topdir/bin
stampfile=$bindir/.stamp

# name|module dir (relative to $here)|package|flavour
targets=(
	"kube-apiserver|.|k8s.io/kubernetes/cmd/kube-apiserver|k8s"
	"kube-controller-manager|.|k8s.io/kubernetes/cmd/kube-controller-manager|k8s"
	"kube-scheduler|.|k8s.io/kubernetes/cmd/kube-scheduler|k8s"
	"kube-proxy|.|k8s.io/kubernetes/cmd/kube-proxy|k8s"
	"kubelet|.|k8s.io/kubernetes/cmd/kubelet|k8s"
	"kubeadm|.|k8s.io/kubernetes/cmd/kubeadm|k8s"
	"kubectl|.|k8s.io/kubernetes/cmd/kubectl|k8s"
	"agnhost|.|k8s.io/kubernetes/test/images/agnhost|agnhost"
	"etcd|etcd|go.etcd.io/etcd/server/v3|etcd"
	"etcdctl|etcd|go.etcd.io/etcd/etcdctl/v3|etcd"
	"coredns|coredns|github.com/coredns/coredns|coredns"
)

die() {
	echo "build.sh: error: $*" >&2
	exit 1
}

force=0
case "${1:-}" in
--print-dir)
	echo "$bindir"
	exit 0
	;;
--force) force=1 ;;
"") ;;
-h | --help)
	sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
	exit 0
	;;
*) die "unknown argument '$1' (use --print-dir, --force or nothing)" ;;
esac

command -v go >/dev/null || die "'go' not found in PATH (Go >= 1.24 needed; the modules say go 1.26)"

# Everything that decides what the binaries are: versions, toolchain, this
# script (flags) and the three modules' go.mod/go.sum.
stamp() {
	{
		echo "k8s=$K8S_VERSION etcd=$ETCD_VERSION coredns=$COREDNS_VERSION"
		go env GOVERSION GOOS GOARCH
		sha256sum "$here/build.sh" \
			"$here/go.mod" "$here/go.sum" \
			"$here/etcd/go.mod" "$here/etcd/go.sum" \
			"$here/coredns/go.mod" "$here/coredns/go.sum" | awk '{print $1}'
	} | sha256sum | awk '{print $1}'
}

up_to_date() {
	[[ $force == 0 && -f $stampfile && "$(cat "$stampfile")" == "$want" ]] || return 1
	local t
	for t in "${targets[@]}"; do
		[[ -x $bindir/${t%%|*} ]] || return 1
	done
}

want=$(stamp)
if up_to_date; then
	echo "build.sh: $bindir is up to date"
	exit 0
fi

# Catch a version bumped here but not in go.mod (or the reverse).
has_require() { # go.mod module version
	grep -Eq "^(require)?[[:space:]]*${2//./\\.} ${3//./\\.}( |\$)" "$1"
}
has_require "$here/go.mod" k8s.io/kubernetes "$K8S_VERSION" ||
	die "test/k8s/go.mod does not require k8s.io/kubernetes $K8S_VERSION"
has_require "$here/etcd/go.mod" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" ||
	die "test/k8s/etcd/go.mod does not require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
has_require "$here/coredns/go.mod" github.com/coredns/coredns "$COREDNS_VERSION" ||
	die "test/k8s/coredns/go.mod does not require github.com/coredns/coredns $COREDNS_VERSION"

mkdir -p "$bindir"
# One build at a time per cache (parallel test jobs may all call this).
exec 9>"$topdir/.lock"
flock 9
if up_to_date; then
	echo "build.sh: $bindir is up to date (built by another run)"
	exit 0
fi
rm -f "$stampfile"

export CGO_ENABLED=0
export GOWORK=off # a go.work above us must not pull these modules in

# As hack/lib/version.sh and hack/lib/golang.sh do for a release build.
k8s_minor=${K8S_VERSION#v1.}
k8s_minor=${k8s_minor%%.*}
k8s_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
	k8s_ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
	k8s_ldflags+=" -X $pkg.gitCommit=$K8S_GIT_COMMIT -X $pkg.gitTreeState=clean -X $pkg.buildDate=$K8S_BUILD_DATE"
done
k8s_tags=selinux,notest,grpcnotrace

timer=()
if [[ -x /usr/bin/time ]]; then
	timer=(/usr/bin/time -q -f "%e %M" -o "$topdir/.time")
fi

echo "build.sh: building into $bindir (go $(go env GOVERSION), -p ${KPFREE_GO_P:-2})"
total_start=$(date +%s.%N)
for t in "${targets[@]}"; do
	IFS='|' read -r name dir pkg flavour <<<"$t"
	case $flavour in
	k8s) flags=(-tags "$k8s_tags" -ldflags "$k8s_ldflags") ;;
	agnhost) flags=(-tags "$k8s_tags" -ldflags "$k8s_ldflags -X main.Version=$AGNHOST_VERSION") ;;
	etcd) flags=(-ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_GIT_SHA") ;;
	coredns) flags=(-ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_GIT_COMMIT") ;;
	esac
	printf 'build.sh: %-24s ' "$name"
	start=$(date +%s.%N)
	rm -f "$topdir/.time"
	# -mod=readonly: a missing go.sum line is an error, never a silent download
	# that a fresh clone would not reproduce.
	if ! (cd "$here/$dir" && "${timer[@]}" go build -mod=readonly -trimpath -p "${KPFREE_GO_P:-2}" \
		"${flags[@]}" -o "$bindir/.$name.tmp" "$pkg") >"$topdir/.build.log" 2>&1; then
		echo "FAILED"
		cat "$topdir/.build.log" >&2
		die "building $name ($pkg in test/k8s/$dir) failed; output above"
	fi
	mv -f "$bindir/.$name.tmp" "$bindir/$name"
	end=$(date +%s.%N)
	rss=""
	if [[ -s $topdir/.time ]]; then
		rss=$(awk 'END {printf "  peak RSS %.1f GiB", $2 / 1048576}' "$topdir/.time")
	fi
	awk -v s="$start" -v e="$end" -v r="$rss" 'BEGIN {printf "%6.1f s%s\n", e - s, r}'
done

# Something may have removed the cache while we built (seen: a shared
# ~/.cache/kpfree wiped mid-build); never stamp an incomplete directory.
for t in "${targets[@]}"; do
	[[ -x $bindir/${t%%|*} ]] || die "$bindir/${t%%|*} vanished during the build (cache removed?); run build.sh again"
done
# Cheap checks that the version stamping took.
got=$("$bindir/kubeadm" version -o short) || die "kubeadm version failed"
[[ $got == "$K8S_VERSION" ]] || die "kubeadm version -o short says '$got', want $K8S_VERSION"
got=$("$bindir/etcd" --version | awk '/^etcd Version:/ {print $3}') || die "etcd --version failed"
[[ v$got == "$ETCD_VERSION" ]] || die "etcd --version says '$got', want $ETCD_VERSION"

echo "$want" >"$stampfile"
awk -v s="$total_start" -v e="$(date +%s.%N)" 'BEGIN {printf "build.sh: all built in %.1f s\n", e - s}'
