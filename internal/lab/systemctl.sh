#!/bin/sh
# systemctl for kpfree lab nodes, which run no systemd (written by "kpfree lab
# up --kubernetes" into the node's own /usr/local/bin).
#
# A small service supervisor with systemctl's command line and exit codes for
# the two units kubeadm and kpfree drive, containerd and kubelet:
#
#   systemctl start|stop|restart|try-restart|enable [--now]|disable [--now]|
#             is-active|is-enabled|status|daemon-reload|reset-failed [UNIT...]
#
# Each started unit gets a supervisor (this script with __supervise UNIT) that
# runs the unit's process and restarts it when it exits, like Restart=always
# with RestartSec (kubelet 10 s, containerd 5 s: kubelet exits until kubeadm
# has written its configuration). kubelet is started the way kubeadm's systemd
# drop-in (10-kubeadm.conf) starts it. Stopping a unit stops its main process
# only (KillMode=process): containers and shims keep running, as with systemd.
#
# State: /run/kpfree-lab/units/UNIT.pid (supervisor), UNIT.main (main process),
# /etc/kpfree-lab/units/UNIT.enabled; logs: /var/log/kpfree-lab/UNIT.log.
# POSIX sh: runs on dash.
set -u

# Tests only: a prefix for the state directories, and the services' PATH.
root=${KPFREE_SYSTEMCTL_ROOT:-}
path=${KPFREE_SYSTEMCTL_PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}
run=$root/run/kpfree-lab/units
etc=$root/etc/kpfree-lab/units
logdir=$root/var/log/kpfree-lab
case $0 in
/*) self=$0 ;;
*/*) self=$PWD/$0 ;;
*) self=$(command -v "$0") ;;
esac
prog=systemctl

known() {
	case $1 in
	containerd | kubelet) return 0 ;;
	esac
	return 1
}

description() {
	case $1 in
	containerd) echo "containerd container runtime" ;;
	kubelet) echo "kubelet: The Kubernetes Node Agent" ;;
	esac
}

restart_sec() {
	if [ -n "${KPFREE_SYSTEMCTL_RESTART_SEC:-}" ]; then
		echo "$KPFREE_SYSTEMCTL_RESTART_SEC"
		return
	fi
	case $1 in
	kubelet) echo 10 ;;
	*) echo 5 ;;
	esac
}

# exec_unit replaces the calling (sub)shell with the unit's main process.
exec_unit() {
	case $1 in
	containerd)
		exec containerd
		;;
	kubelet)
		# 10-kubeadm.conf: EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env,
		# EnvironmentFile=-/etc/default/kubelet, and ExecStart=/usr/bin/kubelet
		# $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS
		# $KUBELET_EXTRA_ARGS (unquoted: split on white space, as systemd does).
		KUBELET_KUBEADM_ARGS=
		KUBELET_EXTRA_ARGS=
		if [ -r "$root/var/lib/kubelet/kubeadm-flags.env" ]; then
			. "$root/var/lib/kubelet/kubeadm-flags.env"
		fi
		if [ -r "$root/etc/default/kubelet" ]; then
			. "$root/etc/default/kubelet"
		fi
		# shellcheck disable=SC2086
		exec kubelet --bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf \
			--kubeconfig=/etc/kubernetes/kubelet.conf \
			--config=/var/lib/kubelet/config.yaml \
			$KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
		;;
	esac
}

# pid_of UNIT KIND prints the pid recorded in $run/UNIT.KIND.
pid_of() {
	p=$(cat "$run/$1.$2" 2>/dev/null) || return 1
	case $p in
	'' | *[!0-9]*) return 1 ;;
	esac
	echo "$p"
}

# supervisor_pid UNIT prints the pid of UNIT's running supervisor: the
# recorded pid, checked by its command line (a recycled pid is not ours).
supervisor_pid() {
	p=$(pid_of "$1" pid) || return 1
	cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || return 1
	case $cmd in
	*" __supervise $1 ") echo "$p" ;;
	*) return 1 ;;
	esac
}

# main_pid UNIT prints the pid of UNIT's main process while it runs.
main_pid() {
	s=$(supervisor_pid "$1") || return 1
	p=$(pid_of "$1" main) || return 1
	# The main process is a child of the supervisor (ppid: field 4 of stat,
	# after the parenthesized command name).
	stat=$(cat "/proc/$p/stat" 2>/dev/null) || return 1
	rest=${stat##*) }
	set -- $rest
	[ "$1" != Z ] && [ "$2" = "$s" ] || return 1
	echo "$p"
}

now() { date '+%Y-%m-%d %H:%M:%S'; }

supervise() {
	u=$1
	echo $$ >"$run/$u.pid"
	date '+%s' >"$run/$u.since"
	stopping=
	child=
	trap 'stopping=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' TERM INT HUP
	while :; do
		(exec_unit "$u") &
		child=$!
		echo "$child" >"$run/$u.main"
		echo "$(now) $prog: started $u (pid $child)"
		wait "$child"
		st=$?
		# A trapped signal ends wait early: wait until the process is gone.
		while kill -0 "$child" 2>/dev/null; do
			wait "$child"
			st=$?
		done
		child=
		rm -f "$run/$u.main"
		[ -z "$stopping" ] || break
		sec=$(restart_sec "$u")
		echo "$(now) $prog: $u exited with status $st; restarting in ${sec}s"
		sleep "$sec" &
		child=$!
		wait "$child"
		child=
		[ -z "$stopping" ] || break
	done
	echo "$(now) $prog: stopped $u"
	rm -f "$run/$u.pid" "$run/$u.since"
	exit 0
}

start() {
	u=$1
	supervisor_pid "$u" >/dev/null && return 0
	mkdir -p "$run" "$logdir" || return 1
	rm -f "$run/$u.pid" "$run/$u.main"
	# A clean environment in /, as systemd gives its services; setsid: the
	# supervisor outlives this command and its session (ssh).
	(cd / && exec env -i PATH="$path" LANG=C.UTF-8 HOME=/root \
		KPFREE_SYSTEMCTL_ROOT="$root" KPFREE_SYSTEMCTL_PATH="$path" \
		KPFREE_SYSTEMCTL_RESTART_SEC="${KPFREE_SYSTEMCTL_RESTART_SEC:-}" \
		setsid "$self" __supervise "$u" </dev/null >>"$logdir/$u.log" 2>&1) &
	i=0
	until supervisor_pid "$u" >/dev/null; do
		i=$((i + 1))
		if [ $i -gt 100 ]; then
			echo "Job for $u.service failed: the supervisor did not start. See $logdir/$u.log." >&2
			return 1
		fi
		sleep 0.05
	done
	if [ "$u" = containerd ]; then
		# Type=notify: start returns once containerd serves its API.
		i=0
		until ctr --timeout 2s version >/dev/null 2>&1; do
			i=$((i + 1))
			if [ $i -gt 300 ] || ! supervisor_pid "$u" >/dev/null; then
				echo "Job for $u.service failed: containerd did not come up. See $logdir/$u.log." >&2
				return 1
			fi
			sleep 0.1
		done
	fi
	return 0
}

stop() {
	u=$1
	if s=$(supervisor_pid "$u"); then
		kill -TERM "$s" 2>/dev/null
		i=0
		while supervisor_pid "$u" >/dev/null; do
			i=$((i + 1))
			if [ $i -eq 150 ]; then # TimeoutStopSec: 15 s
				if m=$(main_pid "$u"); then kill -KILL "$m" 2>/dev/null; fi
				kill -KILL "$s" 2>/dev/null
			fi
			if [ $i -gt 200 ]; then
				echo "Failed to stop $u.service: supervisor $s does not exit." >&2
				return 1
			fi
			sleep 0.1
		done
	fi
	rm -f "$run/$u.pid" "$run/$u.main" "$run/$u.since"
	return 0
}

state() {
	if main_pid "$1" >/dev/null; then
		echo active
	elif supervisor_pid "$1" >/dev/null; then
		echo activating
	else
		echo inactive
	fi
}

enabled() { [ -e "$etc/$1.enabled" ]; }

status() {
	u=$1
	if ! known "$u"; then
		echo "Unit $u.service could not be found."
		return 4
	fi
	en=disabled
	if enabled "$u"; then en=enabled; fi
	st=$(state "$u")
	echo "* $u.service - $(description "$u")"
	echo "     Loaded: loaded ($self; $en; preset: enabled)"
	case $st in
	active)
		since=$(cat "$run/$u.since" 2>/dev/null || echo 0)
		echo "     Active: active (running) since $(date -d "@$since" '+%a %Y-%m-%d %H:%M:%S %Z')"
		m=$(main_pid "$u")
		echo "   Main PID: $m ($(cat "/proc/$m/comm" 2>/dev/null))"
		;;
	activating) echo "     Active: activating (auto-restart)" ;;
	*) echo "     Active: inactive (dead)" ;;
	esac
	if [ -r "$logdir/$u.log" ]; then
		echo
		tail -n 10 "$logdir/$u.log"
	fi
	[ "$st" = active ] && return 0
	return 3
}

usage() {
	echo "usage: systemctl start|stop|restart|try-restart|enable [--now]|disable [--now]|is-active|is-enabled|status|daemon-reload|reset-failed [UNIT...]" >&2
	echo "(kpfree lab stand-in: units containerd and kubelet)" >&2
}

if [ "${1:-}" = __supervise ] && [ $# -eq 2 ] && known "$2"; then
	umask 022
	supervise "$2"
fi

verb=
now_flag=
quiet=
units=
for a in "$@"; do
	case $a in
	--now) now_flag=1 ;;
	-q | --quiet) quiet=1 ;;
	--no-pager | --no-block | --system | --no-ask-password | -l | --full | --no-legend) ;;
	-*)
		echo "$prog: unsupported option $a" >&2
		usage
		exit 1
		;;
	*)
		if [ -z "$verb" ]; then
			verb=$a
		else
			units="$units ${a%.service}"
		fi
		;;
	esac
done

rc=0
need_units() {
	if [ -z "$units" ]; then
		echo "Too few arguments." >&2
		exit 1
	fi
	for u in $units; do
		if ! known "$u"; then
			echo "Failed to $verb $u.service: Unit $u.service not found." >&2
			exit 5
		fi
	done
}

case $verb in
daemon-reload | reset-failed) ;;
start)
	need_units
	for u in $units; do start "$u" || rc=1; done
	;;
stop)
	need_units
	for u in $units; do stop "$u" || rc=1; done
	;;
restart)
	need_units
	for u in $units; do stop "$u" && start "$u" || rc=1; done
	;;
try-restart)
	need_units
	for u in $units; do
		if supervisor_pid "$u" >/dev/null; then stop "$u" && start "$u" || rc=1; fi
	done
	;;
enable)
	need_units
	mkdir -p "$etc" || exit 1
	for u in $units; do
		: >"$etc/$u.enabled" || rc=1
		if [ -n "$now_flag" ]; then start "$u" || rc=1; fi
	done
	;;
disable)
	need_units
	for u in $units; do
		rm -f "$etc/$u.enabled"
		if [ -n "$now_flag" ]; then stop "$u" || rc=1; fi
	done
	;;
is-active)
	[ -n "$units" ] || need_units
	rc=3
	for u in $units; do
		st=inactive
		if known "$u"; then st=$(state "$u"); fi
		[ -n "$quiet" ] || echo "$st"
		[ "$st" != active ] || rc=0
	done
	;;
is-enabled)
	[ -n "$units" ] || need_units
	rc=1
	for u in $units; do
		if ! known "$u"; then
			echo "Failed to get unit file state for $u.service: No such file or directory" >&2
			continue
		fi
		st=disabled
		if enabled "$u"; then
			st=enabled
			rc=0
		fi
		[ -n "$quiet" ] || echo "$st"
	done
	;;
status)
	[ -n "$units" ] || need_units
	for u in $units; do
		status "$u"
		r=$?
		[ $r -le $rc ] || rc=$r
	done
	;;
'')
	usage
	exit 1
	;;
*)
	echo "Unknown command verb '$verb' (kpfree lab systemctl)." >&2
	usage
	exit 1
	;;
esac
exit $rc
