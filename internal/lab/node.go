package lab

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// holderScript runs as the holder, already inside the node's netns and in
// fresh private mount and UTS namespaces. $1 is the holder's name (argv[0] of
// the final sleep), $2 the hostname, then groups: "overlay DIR UPPER WORK",
// "bind SRC DST", "bindro SRC DST" (read-only), "rshared DIR", and "open DIR"
// ... "rebind DIR", which shows the real DIR again on top of the mounts in
// between (through fd 4, opened before them; mounts in between name their
// sources under DIR as /proc/self/fd/4/...).
// It says "ready" on fd 3 and then sleeps forever.
const holderScript = `set -euo pipefail
name=$1 host=$2
shift 2
# Drop the copies of the host's netns bind mounts this mount namespace got,
# so the node does not keep other namespaces alive after they are deleted.
# /run/netns (a mount point once iproute2 made it shared) goes in one lazy
# unmount: each unmount waits for an RCU grace period, one per netns adds up.
if mountpoint -q /run/netns; then umount -n -l /run/netns; fi
mapfile -t mounts </proc/self/mountinfo
for m in "${mounts[@]}"; do
	read -r -a f <<<"$m"
	for ((i = 6; i < ${#f[@]} - 1; i++)); do
		if [[ ${f[i]} == - ]]; then
			if [[ ${f[i+1]} == nsfs ]]; then umount -n -l -- "$(printf '%b' "${f[4]}")" || true; fi
			break
		fi
	done
done
echo "$host" >/proc/sys/kernel/hostname
while (($#)); do
	case $1 in
	open) exec 4<"$2"; shift 2 ;;
	rebind) mount -n -c --bind /proc/self/fd/4 -- "$2"; exec 4<&-; shift 2 ;;
	# mount -n: no utab, so nothing is written to the host's /run.
	overlay) mount -n -t overlay kpfree-lab -o "lowerdir=$2,upperdir=$3,workdir=$4" -- "$2"; shift 4 ;;
	# mount -c: paths as given (/proc/self/fd/4/... must not be resolved to
	# the lab dir's name, which an overlay may hide).
	bind) mount -n -c --bind -- "$2" "$3"; shift 3 ;;
	bindro) mount -n -c --bind -- "$2" "$3"; mount -n -c -o remount,bind,ro -- "$3"; shift 3 ;;
	rshared) mount -n --make-rshared -- "$2"; shift 2 ;;
	*) echo "holder: unknown mount kind $1" >&2; exit 2 ;;
	esac
done
echo ready >&3
exec 3>&-
exec -a "$name" sleep infinity
`

const resolvConf = "# kpfree lab: no DNS server is reachable from lab nodes\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n"

// overlayDirs names the upper and work dirs of the overlay of dir.
func (s *State) overlayDirs(node, dir string) (upper, work string) {
	key := strings.ReplaceAll(strings.Trim(dir, "/"), "/", "_")
	base := filepath.Join(s.nodeDir(node), "overlay", key)
	return filepath.Join(base, "upper"), filepath.Join(base, "work")
}

// logFiles are login records sshd writes for terminal sessions; each node
// gets its own empty copy bound over the host's.
var logFiles = []string{"/var/log/wtmp", "/var/log/btmp", "/var/log/lastlog"}

// stateDirs are host directories that programs in a node write to (sudo's
// lecture records); unless overlaid, each node gets its own empty copy.
var stateDirs = []string{"/var/lib/sudo"}

func (s *State) privateDir(node, dir string) string {
	return filepath.Join(s.nodeDir(node), "private", strings.ReplaceAll(strings.Trim(dir, "/"), "/", "_"))
}

// mountArgs lists the holder's mounts for node n.
func (s *State) mountArgs(n *Node) []string {
	var args []string
	// The lab dir itself may lie under an overlaid dir (/var/lib/kpfree-lab
	// with /var/lib overlaid): the node then sees the real dir, not the
	// overlay's view of it, which would go stale as the host rewrites files
	// (and cannot show the overlay's own upper dirs). Mounts after that
	// overlay reach their sources in the lab dir through an fd opened before
	// it: an overlay's upper dir, or containerd's, cannot be on overlayfs.
	rebind := s.overlaid(s.Dir)
	src := func(p string) string { return p }
	if rebind {
		args = append(args, "open", s.Dir)
		src = func(p string) string {
			if rel, err := filepath.Rel(s.Dir, p); err == nil && within(p, s.Dir) {
				return filepath.Join("/proc/self/fd/4", rel)
			}
			return p
		}
	}
	for _, d := range s.Overlays {
		upper, work := s.overlayDirs(n.Name, d)
		args = append(args, "overlay", d, src(upper), src(work))
	}
	if s.Kubernetes {
		args = append(args, s.kubeBinaryMountArgs()...)
	}
	nd := s.nodeDir(n.Name)
	args = append(args, "bind", src(filepath.Join(nd, "root")), "/root", "bind", src(filepath.Join(nd, "home")), "/home")
	for _, f := range logFiles {
		if s.overlaid(f) {
			continue
		}
		if fi, err := os.Stat(f); err == nil && fi.Mode().IsRegular() {
			args = append(args, "bind", src(filepath.Join(nd, "log", filepath.Base(f))), f)
		}
	}
	for _, d := range stateDirs {
		if s.overlaid(d) {
			continue
		}
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			args = append(args, "bind", src(s.privateDir(n.Name, d)), d)
		}
	}
	if s.Kubernetes {
		args = append(args, s.kubeLateMountArgs(n, src)...)
	}
	if rebind {
		args = append(args, "rebind", s.Dir)
	}
	return args
}

func (s *State) overlaid(path string) bool {
	for _, d := range s.Overlays {
		if within(path, d) {
			return true
		}
	}
	return false
}

// prepareNode writes everything a node needs before its holder starts: the
// overlay upper dirs (users, sudoers, hostname, hosts, machine-id, /run/sshd),
// the node's /root and /home, its log files and its host key. What a previous
// Up wrote for its identity (host key, machine-id, users) is kept, so a
// rebuilt node is the same node.
func (s *State) prepareNode(n *Node, hosts []byte, users *userDB) (hostKey string, err error) {
	nd := s.nodeDir(n.Name)
	for _, d := range s.Overlays {
		upper, work := s.overlayDirs(n.Name, d)
		if err := mkdirLike(upper, d); err != nil {
			return "", err
		}
		// A work dir left by a node that died is not reusable: start clean.
		if err := os.RemoveAll(work); err != nil {
			return "", err
		}
		if err := os.MkdirAll(work, 0o700); err != nil {
			return "", err
		}
	}
	etc, _ := s.overlayDirs(n.Name, "/etc")
	run, _ := s.overlayDirs(n.Name, "/run")

	// The user database is written once: a rebuilt node keeps the users
	// and groups that were added inside it (by kubeadm, packages, tests).
	for name, data := range users.files() {
		if _, err := os.Lstat(filepath.Join(etc, name)); err == nil {
			continue
		}
		if err := writeLike(etc, "/etc", name, data, 0o644); err != nil {
			return "", err
		}
	}
	if err := writeLike(etc, "/etc", strings.TrimPrefix(nodeAuthorizedKeys, "/etc/"), users.authorized, 0o644); err != nil {
		return "", err
	}
	sudoers := fmt.Sprintf("# kpfree lab node %s\n%s ALL=(ALL:ALL) NOPASSWD: ALL\n%s ALL=(ALL:ALL) ALL\n", n.Name, AdminUser, NoPasswordUser)
	if err := writeLike(etc, "/etc", "sudoers.d/kpfree-lab", []byte(sudoers), 0o440); err != nil {
		return "", err
	}
	if err := writeLike(etc, "/etc", "hostname", []byte(n.Name+"\n"), 0o644); err != nil {
		return "", err
	}
	if err := writeLike(etc, "/etc", "hosts", hosts, 0o644); err != nil {
		return "", err
	}
	// No DNS server is reachable from a node (no NAT): point the resolver at
	// the node's own loopback, where nothing listens, so that lookups of
	// names missing from /etc/hosts fail at once instead of timing out.
	if err := writeLike(etc, "/etc", "resolv.conf", []byte(resolvConf), 0o644); err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(etc, "machine-id")); err != nil {
		id := make([]byte, 16)
		if _, err := rand.Read(id); err != nil {
			return "", err
		}
		if err := writeLike(etc, "/etc", "machine-id", []byte(hex.EncodeToString(id)+"\n"), 0o444); err != nil {
			return "", err
		}
	}
	// sshd's privilege separation directory.
	if err := mkdirLike(filepath.Join(run, "sshd"), ""); err != nil {
		return "", err
	}

	if err := os.MkdirAll(filepath.Join(nd, "root"), 0o700); err != nil {
		return "", err
	}
	for _, u := range users.added {
		home := filepath.Join(nd, "home", u.name)
		if err := os.MkdirAll(home, 0o750); err != nil {
			return "", err
		}
		if err := os.Chown(home, u.uid, u.gid); err != nil {
			return "", err
		}
	}
	if err := os.Chmod(filepath.Join(nd, "home"), 0o755); err != nil {
		return "", err
	}
	if s.Kubernetes {
		if err := s.prepareKubernetes(n); err != nil {
			return "", err
		}
	}
	for _, f := range logFiles {
		fi, err := os.Stat(f)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		p := filepath.Join(nd, "log", filepath.Base(f))
		if _, err := os.Stat(p); err == nil {
			continue
		}
		if err := writeLike(filepath.Join(nd, "log"), "/var/log", filepath.Base(f), nil, fi.Mode().Perm()); err != nil {
			return "", err
		}
	}
	for _, d := range stateDirs {
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			if err := mkdirLike(s.privateDir(n.Name, d), d); err != nil {
				return "", err
			}
		}
	}
	return s.ensureHostKey(n.Name)
}

// hostsFile renders /etc/hosts for the nodes: localhost and every node by name.
func (s *State) hostsFile() []byte {
	var b bytes.Buffer
	b.WriteString("# kpfree lab\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n\n")
	for _, n := range s.Nodes {
		fmt.Fprintf(&b, "%s\t%s\n", n.Address, n.Name)
	}
	return b.Bytes()
}

// startHolder starts node n's holder in its netns and cgroup and waits until
// its mounts are done.
func (s *State) startHolder(ctx context.Context, n *Node) (int, error) {
	nd := s.nodeDir(n.Name)
	logf, err := os.OpenFile(filepath.Join(nd, "holder.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return 0, err
	}
	defer r.Close()
	argv := []string{"nsenter", "--net=" + n.NetNS, "--", "unshare", "--mount", "--uts", "--propagation", "private", "--",
		"bash", "-c", holderScript, "kpfree-lab-holder", HolderMarker + s.netnsName(n.Name), n.Name}
	argv = s.inV1Cgroups(n, append(argv, s.mountArgs(n)...))
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = baseEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{w}
	err = startDaemon(cmd, n.Cgroup)
	w.Close()
	if err != nil {
		return 0, fmt.Errorf("start holder: %w", err)
	}
	pid := cmd.Process.Pid

	type result struct {
		out []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		out, err := io.ReadAll(r)
		ch <- result{out, err}
	}()
	select {
	case res := <-ch:
		if strings.TrimSpace(string(res.out)) == "ready" {
			return pid, nil
		}
	case <-ctx.Done():
	case <-time.After(30 * time.Second):
	}
	_ = cmd.Process.Kill()
	return 0, fmt.Errorf("holder did not get ready: %s", tail(filepath.Join(nd, "holder.log")))
}

// tail returns the last lines of a log file, for error messages.
func tail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(no log " + path + ")"
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}

// mkdirLike creates dir with the mode and owner of like ("" = 0755 root).
func mkdirLike(dir, like string) error {
	mode, uid, gid := os.FileMode(0o755), 0, 0
	if like != "" {
		fi, err := os.Stat(like)
		if err != nil {
			return err
		}
		mode = fi.Mode().Perm() | fi.Mode()&(fs.ModeSticky|fs.ModeSetgid)
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(dir, mode); err != nil {
		return err
	}
	return os.Chown(dir, uid, gid)
}

// writeLike writes rel under upper with the mode and owner of lower/rel when
// that exists (defMode, root otherwise), creating parent dirs like lower's.
func writeLike(upper, lower, rel string, data []byte, defMode os.FileMode) error {
	if err := os.MkdirAll(upper, 0o755); err != nil {
		return err
	}
	parts := strings.Split(filepath.Dir(rel), "/")
	for i := range parts {
		if parts[i] == "." {
			continue
		}
		sub := filepath.Join(parts[:i+1]...)
		like := filepath.Join(lower, sub)
		if _, err := os.Stat(like); err != nil {
			like = ""
		}
		if err := mkdirLike(filepath.Join(upper, sub), like); err != nil {
			return err
		}
	}
	mode, uid, gid := defMode, 0, 0
	if fi, err := os.Stat(filepath.Join(lower, rel)); err == nil {
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	}
	p := filepath.Join(upper, rel)
	if err := writeFileAtomic(p, data, mode); err != nil {
		return err
	}
	return os.Chown(p, uid, gid)
}

// userDB is the host's passwd, shadow, group and gshadow with the lab users
// added, as the nodes see them. The host's files are only read.
type userDB struct {
	passwd, shadow, group, gshadow []byte
	added                          []labUser
	authorized                     []byte // the nodes' authorized_keys (every user)
}

type labUser struct {
	name     string
	uid, gid int
}

// loadUsers reads the host's user database and adds AdminUser and
// NoPasswordUser (same IDs on every node). Their password fields are "*": no
// password, but not locked, so sshd (UsePAM no) accepts their keys. A locked
// root ("!...") is unlocked the same way, in the nodes only.
func loadUsers(etc string) (*userDB, error) {
	read := func(name string) ([]byte, error) {
		data, err := os.ReadFile(filepath.Join(etc, name))
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return data, err
	}
	db := &userDB{}
	var err error
	for _, f := range []struct {
		name string
		dst  *[]byte
	}{{"passwd", &db.passwd}, {"shadow", &db.shadow}, {"group", &db.group}, {"gshadow", &db.gshadow}} {
		if *f.dst, err = read(f.name); err != nil {
			return nil, err
		}
	}
	users, usedUID := parseIDs(db.passwd, 2)
	groups, usedGID := parseIDs(db.group, 2)
	days := int(time.Now().Unix() / 86400)
	next := 2000
	for _, name := range []string{AdminUser, NoPasswordUser} {
		if users[name] || groups[name] {
			return nil, fmt.Errorf("the host already has a user or group %q: the lab will not redefine it", name)
		}
		for usedUID[next] || usedGID[next] {
			next++
		}
		id := next
		next++
		db.added = append(db.added, labUser{name, id, id})
		db.passwd = appendLine(db.passwd, fmt.Sprintf("%s:x:%d:%d:kpfree lab:/home/%s:/bin/bash", name, id, id, name))
		db.shadow = appendLine(db.shadow, fmt.Sprintf("%s:*:%d:0:99999:7:::", name, days))
		db.group = appendLine(db.group, fmt.Sprintf("%s:x:%d:", name, id))
		if db.gshadow != nil {
			db.gshadow = appendLine(db.gshadow, name+":!::")
		}
	}
	db.shadow = unlockRoot(db.shadow)
	return db, nil
}

func (db *userDB) files() map[string][]byte {
	m := map[string][]byte{"passwd": db.passwd, "shadow": db.shadow, "group": db.group}
	if db.gshadow != nil {
		m["gshadow"] = db.gshadow
	}
	return m
}

// parseIDs returns the names and the numeric IDs (field idx) of a passwd or group file.
func parseIDs(data []byte, idx int) (map[string]bool, map[int]bool) {
	names, ids := map[string]bool{}, map[int]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Split(sc.Text(), ":")
		if len(f) <= idx {
			continue
		}
		names[f[0]] = true
		if id, err := strconv.Atoi(f[idx]); err == nil {
			ids[id] = true
		}
	}
	return names, ids
}

func appendLine(data []byte, line string) []byte {
	out := append([]byte{}, data...)
	if len(out) > 0 && out[len(out)-1] != '\n' {
		out = append(out, '\n')
	}
	return append(append(out, line...), '\n')
}

func unlockRoot(shadow []byte) []byte {
	lines := strings.SplitAfter(string(shadow), "\n")
	for i, l := range lines {
		if f := strings.SplitN(l, ":", 3); len(f) == 3 && f[0] == "root" && strings.HasPrefix(f[1], "!") {
			lines[i] = "root:*:" + f[2]
		}
	}
	return []byte(strings.Join(lines, ""))
}
