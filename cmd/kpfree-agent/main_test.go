package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

func TestCgroup2Root(t *testing.T) {
	for _, tc := range []struct {
		name, mounts, want string
	}{
		{"unified host", "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n", "/sys/fs/cgroup"},
		{"hybrid host", "tmpfs /sys/fs/cgroup tmpfs ro 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n", "/sys/fs/cgroup/unified"},
		{"own mount first, host root preferred", "none /run/kpfree/cgroupv2 cgroup2 rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", "/sys/fs/cgroup"},
		{"only a private mount", "none /run/my\\040cg cgroup2 rw 0 0\n", "/run/my cg"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := cgroup2Root(strings.NewReader(tc.mounts))
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if _, err := cgroup2Root(strings.NewReader("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n")); err == nil {
		t.Fatal("no cgroup2 mount: want an error")
	}
}

func TestUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"kpfree-agent", "--help"}, exitOK},
		{[]string{"kpfree-agent", "run", "--help"}, exitOK},
		{[]string{"kpfree-agent", "run", "--no-such-flag"}, exitUsage},
		{[]string{"kpfree-agent", "services", "-o", "yaml"}, exitUsage},
		{[]string{"kpfree-agent", "run", "--log-level", "loud"}, exitUsage},
	} {
		if got := run(tc.args); got != tc.code {
			t.Errorf("%v: exit %d, want %d", tc.args, got, tc.code)
		}
	}
}

func TestRestConfigNeedsCredentials(t *testing.T) {
	if _, err := restConfigFor(t, "https://198.18.0.11:6443", ""); err == nil && !inPod() {
		t.Fatal("no kubeconfig and no service account: want an error")
	}
}

func restConfigFor(t *testing.T, server, kubeconfig string) (string, error) {
	t.Helper()
	cfg, how, err := restConfig(server, kubeconfig)
	if err != nil {
		return "", err
	}
	if cfg.Host != server {
		t.Fatalf("host %q, want %q", cfg.Host, server)
	}
	return how, nil
}

func inPod() bool {
	_, err := os.Stat(saToken)
	return err == nil
}

// --k8s-api-server overrides the kubeconfig's server: the agent reaches the
// API server directly, whatever address the kubeconfig names.
func TestRestConfigServerOverride(t *testing.T) {
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {server: "https://10.96.0.1:443", insecure-skip-tls-verify: true}
users:
- name: u
  user: {token: abc}
contexts:
- name: x
  context: {cluster: c, user: u}
current-context: x
`), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	how, err := restConfigFor(t, "https://198.18.0.11:6443", kc)
	if err != nil || !strings.Contains(how, kc) {
		t.Fatalf("%q, %v", how, err)
	}
	cfg, _, err := restConfig("", kc)
	if err != nil || cfg.Host != "https://10.96.0.1:443" {
		t.Fatalf("without --k8s-api-server: %v, %v", cfg, err)
	}
}

// Inside the agent's pod, status and services default to the agent's own
// --bpffs, --cgroup-root and --health-addr (from the chart's args file).
func TestPodDefaults(t *testing.T) {
	f := filepath.Join(t.TempDir(), "args")
	err := os.WriteFile(f, []byte(`- run
- --k8s-api-server=https://198.18.0.11:6443
- --node-name=$(NODE_NAME)
- --cgroup-root=/run/kpfree/cgroupv2/kpfree-lab/$(NODE_NAME)
- --bpffs=/sys/fs/bpf
- --health-addr=:9999
`), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NODE_NAME", "n2")
	var got [3]string
	app := &cli.App{Commands: []*cli.Command{{
		Name:   "status",
		Flags:  []cli.Flag{bpffsFlag, cgroupFlag, healthAddrFlag},
		Before: podDefaults(f),
		Action: func(c *cli.Context) error {
			got = [3]string{c.String("bpffs"), c.String("cgroup-root"), c.String("health-addr")}
			return nil
		},
	}}}
	if err := app.Run([]string{"x", "status", "--bpffs", "/mnt/bpf"}); err != nil {
		t.Fatal(err)
	}
	want := [3]string{"/mnt/bpf", "/run/kpfree/cgroupv2/kpfree-lab/n2", ":9999"}
	if got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

// The Helm chart (templates/kpfree-agent, rendered in templates/testdata)
// passes flags that `run` must accept: an unknown one would crash-loop the
// DaemonSet.
func TestChartArgsParse(t *testing.T) {
	goldens, _ := filepath.Glob("../../templates/testdata/*.golden")
	if len(goldens) == 0 {
		t.Skip("no rendered chart in templates/testdata")
	}
	for _, g := range goldens {
		data, err := os.ReadFile(g)
		if err != nil {
			t.Fatal(err)
		}
		args := chartArgs(string(data))
		if len(args) == 0 || args[0] != "run" {
			t.Fatalf("%s: no agent args found", g)
		}
		cmd := runCommand()
		var parsed bool
		cmd.Action = func(*cli.Context) error { parsed = true; return nil }
		app := &cli.App{Commands: []*cli.Command{cmd}, Writer: io.Discard, ErrWriter: io.Discard}
		if err := app.Run(append([]string{"kpfree-agent"}, args...)); err != nil || !parsed {
			t.Errorf("%s: kpfree-agent %s: %v", filepath.Base(g), strings.Join(args, " "), err)
		}
	}
}

// chartArgs extracts the container args of the rendered DaemonSet.
func chartArgs(manifest string) []string {
	var out []string
	in := false
	for _, line := range strings.Split(manifest, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case trimmed == "args:":
			in = true
		case in && strings.HasPrefix(trimmed, "- "):
			out = append(out, strings.Trim(strings.TrimPrefix(trimmed, "- "), `"'`))
		case in:
			return out
		}
	}
	return out
}
