package main

import (
	"bytes"
	"io"
	"os"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// leafCommands lists every runnable command path, e.g. ["lab", "up"].
func leafCommands(prefix []string, cmds []*cli.Command) [][]string {
	var out [][]string
	for _, c := range cmds {
		p := append(append([]string(nil), prefix...), c.Name)
		if len(c.Subcommands) > 0 {
			out = append(out, leafCommands(p, c.Subcommands)...)
			continue
		}
		out = append(out, p)
	}
	return out
}

// Every command parses its flags (a flag defined twice panics in urfave/cli
// only when the command runs) and prints help.
func TestEveryCommandHasHelp(t *testing.T) {
	app := newApp()
	for _, path := range leafCommands(nil, app.Commands) {
		if path[0] == "help" {
			continue
		}
		t.Run(strings.Join(path, "_"), func(t *testing.T) {
			app := newApp()
			var buf bytes.Buffer
			app.Writer, app.ErrWriter = &buf, &buf
			args := append(append([]string{"kpfree"}, path...), "--help")
			if err := app.Run(args); err != nil {
				t.Fatalf("%v: %v", args, err)
			}
			if !strings.Contains(buf.String(), "USAGE") {
				t.Errorf("%v printed no usage:\n%s", args, buf.String())
			}
		})
	}
}

func TestExitCodes(t *testing.T) {
	devnull, _ := os.Open(os.DevNull)
	defer devnull.Close()
	old := os.Stderr
	os.Stderr = devnull
	defer func() { os.Stderr = old }()
	cases := []struct {
		args []string
		want int
	}{
		{[]string{"kpfree", "version"}, exitOK},
		{[]string{"kpfree", "--bogus"}, exitUsage},
		{[]string{"kpfree", "version", "-o", "yaml"}, exitUsage},
		{[]string{"kpfree", "-o", "yaml", "version"}, exitUsage},
		{[]string{"kpfree", "preflight", "--concurrency", "0", "--local"}, exitUsage},
		{[]string{"kpfree", "preflight"}, exitUsage},                                       // no --nodes
		{[]string{"kpfree", "preflight", "--nodes", "/nonexistent/hosts.yaml"}, exitUsage}, // unreadable
		{[]string{"kpfree", "preflight", "--local", "--role", "boss"}, exitUsage},
		{[]string{"kpfree", "lab", "up", "--nodes", "0"}, exitUsage},
		{[]string{"kpfree", "install", "--api-server", "10.0.0.1:6443"}, exitUsage}, // no --kubeconfig
		{[]string{"kpfree", "install", "--kubeconfig", "/dev/null"}, exitUsage},     // no API server address
		{[]string{"kpfree", "install", "--kubeconfig", "/dev/null", "--api-server", "10.0.0.1"}, exitUsage},
	}
	for _, c := range cases {
		if got := runQuiet(c.args); got != c.want {
			t.Errorf("%v: exit %d, want %d", c.args, got, c.want)
		}
	}
}

func runQuiet(args []string) int {
	oldOut := os.Stdout
	r, w, _ := os.Pipe()
	os.Stdout = w
	code := run(args)
	w.Close()
	io.Copy(io.Discard, r)
	os.Stdout = oldOut
	return code
}

func TestAgentImage(t *testing.T) {
	cases := []struct {
		ref, repo, tag, digest string
	}{
		{"", "", "", ""}, // the chart's default
		{"localhost/kpfree-agent:dev", "localhost/kpfree-agent", "dev", ""},
		{"registry:5000/kpfree-agent", "registry:5000/kpfree-agent", "", ""},
		{"ghcr.io/kpfree/kpfree-agent:v1@sha256:abc", "ghcr.io/kpfree/kpfree-agent", "v1", "sha256:abc"},
	}
	for _, c := range cases {
		img := agentImage(c.ref, "Never")
		if img.Repository != c.repo || img.Tag != c.tag || img.Digest != c.digest || img.PullPolicy != "Never" {
			t.Errorf("agentImage(%q) = %+v", c.ref, img)
		}
	}
}
