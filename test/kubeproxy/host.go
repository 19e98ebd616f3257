package kubeproxy

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/test/kubeenv"
)

// runHost runs a read-only command in the calling process's namespaces.
func runHost(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.String(), nil
}

// HostSysctls reads the host-global and host-namespace settings kube-proxy
// could write, in the calling process's namespaces: every
// /proc/sys/net/netfilter entry (but the nf_conntrack_count counter), the
// nf_conntrack module parameters (hashsize...), route_localnet and
// ip_forward. A test compares a reading before and after running kube-proxy
// in a node to show the host was not touched.
func HostSysctls() (map[string]string, error) {
	out := map[string]string{}
	var paths []string
	for _, glob := range []string{"/proc/sys/net/netfilter/*", "/sys/module/nf_conntrack/parameters/*", "/proc/sys/net/bridge/*"} {
		m, err := filepath.Glob(glob)
		if err != nil {
			return nil, err
		}
		paths = append(paths, m...)
	}
	paths = append(paths, "/proc/sys/net/ipv4/conf/all/route_localnet", "/proc/sys/net/ipv4/conf/default/route_localnet", "/proc/sys/net/ipv4/ip_forward")
	for _, p := range paths {
		if filepath.Base(p) == "nf_conntrack_count" {
			continue
		}
		fi, err := os.Stat(p)
		if err != nil || fi.IsDir() {
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			continue // write-only or unreadable entries
		}
		out[p] = strings.TrimSpace(string(data))
	}
	return out, nil
}

// NodeSysctl reads a /proc/sys entry inside a lab node (its own network
// namespace's value), e.g. "net/netfilter/nf_conntrack_tcp_timeout_established".
func NodeSysctl(ctx context.Context, s *lab.State, node, name string) (string, error) {
	out, err := s.Exec(ctx, node, "cat", filepath.Join("/proc/sys", name))
	return strings.TrimSpace(string(out)), err
}

// NodeBinary makes a Kubernetes binary (kubeenv.Binary) visible inside the
// lab's nodes, which do not see the build cache under the host's /root, and
// returns its path there: a hard link (a copy across filesystems) in the
// lab's state directory, which lab down removes.
func NodeBinary(s *lab.State, name string) (string, error) {
	src, err := kubeenv.Binary(name)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(s.Dir, "bin")
	dst := filepath.Join(dir, name)
	if sameFile(src, dst) {
		return dst, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.CreateTemp(dir, "."+name+"-*")
	if err != nil {
		return "", err
	}
	tmp.Close()
	os.Remove(tmp.Name())
	if err := os.Link(src, tmp.Name()); err != nil {
		if err := copyFile(src, tmp.Name()); err != nil {
			return "", err
		}
		if err := os.Chmod(tmp.Name(), 0o755); err != nil {
			return "", err
		}
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		os.Remove(tmp.Name())
		return "", err
	}
	return dst, nil
}

func sameFile(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}
