package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	cgroup2Magic = 0x63677270 // CGROUP2_SUPER_MAGIC
	bpffsMagic   = 0xcafe4a11 // BPF_FS_MAGIC
)

// cgroup2Root returns the host's cgroup2 mount point from a /proc/mounts
// listing: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a
// hybrid one (v1 controllers plus cgroup2), else the first cgroup2 mount.
func cgroup2Root(mounts io.Reader) (string, error) {
	var found []string
	sc := bufio.NewScanner(mounts)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 3 && f[2] == "cgroup2" {
			found = append(found, unescapeMount(f[1]))
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	for _, want := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		for _, p := range found {
			if p == want {
				return p, nil
			}
		}
	}
	if len(found) > 0 {
		return found[0], nil
	}
	return "", errors.New("no cgroup2 mount in /proc/mounts: mount one (mount -t cgroup2 none DIR) and pass --cgroup-root")
}

// unescapeMount undoes the octal escapes of /proc/mounts (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func hostCgroup2Root() (string, error) {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return "", err
	}
	defer f.Close()
	return cgroup2Root(f)
}

// isCgroup2Root: a cgroup2 directory without cgroup.type is a hierarchy root.
func isCgroup2Root(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, fmt.Errorf("--cgroup-root %s: %w", path, err)
	}
	if int64(st.Type) != cgroup2Magic {
		return false, fmt.Errorf("--cgroup-root %s is not a cgroup2 directory", path)
	}
	_, err := os.Stat(filepath.Join(path, "cgroup.type"))
	return errors.Is(err, os.ErrNotExist), nil
}

func isBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && int64(st.Type) == bpffsMagic
}

// ensureBPFFS mounts a bpffs at path unless one is there.
func ensureBPFFS(path string) (mounted bool, err error) {
	if isBPFFS(path) {
		return false, nil
	}
	if err := os.MkdirAll(path, 0o700); err != nil {
		return false, fmt.Errorf("--bpffs: %w", err)
	}
	if err := unix.Mount("bpf", path, "bpf", 0, "mode=0700"); err != nil {
		return false, fmt.Errorf("--bpffs: mount bpf at %s: %w", path, err)
	}
	return true, nil
}
