//go:build linux

package bpf

// Test helpers that need the package's internals; export_test.go hands them to
// the integration tests of package bpf_test.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// inVM reports whether the test runs inside a kernel-matrix VM (test/kernels):
// a throwaway kernel on which attaching at the cgroup2 root is safe.
func inVM() bool { return os.Getenv("KPFREE_IN_VM") == "1" }

// cgroup2Mount returns where cgroup2 is mounted: KPFREE_VM_CGROUP2 inside the
// kernel-matrix VM (pure cgroup2 at /sys/fs/cgroup), else the cgroup2 entry of
// /proc/self/mounts (/sys/fs/cgroup/unified on hybrid hosts, /sys/fs/cgroup
// on pure-v2 ones). Among several, the hierarchy's root wins over a mount of
// a subtree (cgroup namespace, bind mount).
func cgroup2Mount() (string, error) {
	if p := os.Getenv("KPFREE_VM_CGROUP2"); p != "" {
		if err := checkFS(p, cgroup2Magic, "cgroup2"); err != nil {
			return "", fmt.Errorf("KPFREE_VM_CGROUP2: %w", err)
		}
		return p, nil
	}
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "", err
	}
	var found []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[2] == "cgroup2" {
			found = append(found, unescapeMountField(f[1]))
		}
	}
	for _, p := range found {
		if isCgroup2Root(p) {
			return p, nil
		}
	}
	if len(found) > 0 {
		return found[0], nil
	}
	return "", errors.New("no cgroup2 mount in /proc/self/mounts")
}

// isCgroup2Root: only the root of a cgroup2 hierarchy lacks cgroup.type.
func isCgroup2Root(p string) bool {
	_, err := os.Stat(filepath.Join(p, "cgroup.type"))
	return errors.Is(err, os.ErrNotExist)
}

// unescapeMountField undoes the octal escapes of /proc/mounts (\040 for a
// space, \011, \012, \134).
func unescapeMountField(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// kernelVersion returns the running kernel's version and a description. On
// Debian the release says X.Y.0 and the version string carries the real
// sublevel ("#1 SMP Debian 5.10.262-1 (...)").
func kernelVersion() ([3]int, string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return [3]int{}, "", err
	}
	release, version := unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Version[:])
	v, ok := parseVersion(release)
	if !ok {
		return [3]int{}, "", fmt.Errorf("cannot parse kernel release %q", release)
	}
	desc := release
	if m := debianVersion.FindStringSubmatch(version); m != nil {
		if d, ok := parseVersion(m[1]); ok && d[0] == v[0] && d[1] == v[1] {
			v = d
			desc += " (" + m[1] + ")"
		}
	}
	return v, desc, nil
}

var (
	debianVersion = regexp.MustCompile(`Debian (\d+\.\d+\.\d+)`)
	leadVersion   = regexp.MustCompile(`^(\d+)\.(\d+)(?:\.(\d+))?`)
)

func parseVersion(s string) ([3]int, bool) {
	m := leadVersion.FindStringSubmatch(s)
	if m == nil {
		return [3]int{}, false
	}
	var v [3]int
	for i := range 3 {
		if m[i+1] != "" {
			v[i], _ = strconv.Atoi(m[i+1])
		}
	}
	return v, true
}

// kernelHas reports whether a kernel of version v should have a feature whose
// FeatureStatus.Kernel is spec: "5.8" (mainline from 5.8 on), or "5.2 or
// 4.19.57" (mainline from 5.2, or the 4.19 stable series from 4.19.57).
func kernelHas(v [3]int, spec string) (bool, error) {
	for _, alt := range strings.Split(spec, " or ") {
		alt = strings.TrimSpace(alt)
		w, ok := parseVersion(alt)
		if !ok || leadVersion.FindString(alt) != alt {
			return false, fmt.Errorf("feature kernel %q: cannot parse %q", spec, alt)
		}
		if strings.Count(alt, ".") == 2 { // a stable backport: that series only
			if v[0] == w[0] && v[1] == w[1] && v[2] >= w[2] {
				return true, nil
			}
			continue
		}
		if v[0] > w[0] || v[0] == w[0] && v[1] >= w[1] {
			return true, nil
		}
	}
	return false, nil
}
