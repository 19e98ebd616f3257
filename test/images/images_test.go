package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kpfree/kpfree/internal/image"
)

// fakeBinDir makes a bin dir whose binaries are small files (or copies of src, if given).
func fakeBinDir(t *testing.T, src string, names ...string) string {
	t.Helper()
	dir := t.TempDir()
	content := []byte("#!/bin/true\n")
	if src != "" {
		var err error
		if content, err = os.ReadFile(src); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), content, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func refs(images []Image) []string {
	var out []string
	for _, i := range images {
		out = append(out, i.Refs()...)
	}
	return out
}

func needTools(t *testing.T) {
	t.Helper()
	for _, p := range []string{"/usr/sbin/xtables-nft-multi", "/usr/sbin/nft", "/usr/sbin/conntrack"} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("%v (apt-get install iptables nftables conntrack)", err)
		}
	}
}

func TestImageSet(t *testing.T) {
	needTools(t)
	dir := fakeBinDir(t, "", requiredBinaries...)
	images, skipped, err := imageSet(dir, "/tmp/pause", "nft")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"registry.k8s.io/kube-apiserver:v1.34.4",
		"registry.k8s.io/kube-controller-manager:v1.34.4",
		"registry.k8s.io/kube-scheduler:v1.34.4",
		"registry.k8s.io/etcd:3.6.5-0",
		"registry.k8s.io/kube-proxy:v1.34.4",
		"registry.k8s.io/pause:3.10.1",
	}
	if got := refs(images); !reflect.DeepEqual(got, want) {
		t.Errorf("refs %v\nwant %v", got, want)
	}
	if len(skipped) != 2 {
		t.Errorf("skipped %v, want coredns and agnhost", skipped)
	}

	// With every optional binary: coredns and agnhost (two tags) too.
	dir = fakeBinDir(t, "", append(requiredBinaries, optionalBinaries...)...)
	images, skipped, err = imageSet(dir, "/tmp/pause", "legacy")
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, "registry.k8s.io/coredns/coredns:v1.12.1",
		"registry.k8s.io/e2e-test-images/agnhost:2.56", "registry.k8s.io/e2e-test-images/agnhost:2.53")
	if got := refs(images); !reflect.DeepEqual(got, want) || len(skipped) != 0 {
		t.Errorf("refs %v (skipped %v)\nwant %v", got, skipped, want)
	}
	for _, im := range images {
		s := im.Spec
		switch {
		case strings.Contains(s.Ref, "/kube-proxy:"):
			links := map[string]string{}
			srcs := map[string]bool{}
			for _, f := range s.Base {
				if f.Link != "" {
					links[f.Dst] = f.Link
				}
				if f.Src != "" {
					srcs[f.Dst] = true
				}
			}
			for dst, link := range map[string]string{
				"/usr/sbin/iptables":              "iptables-legacy", // --iptables-mode legacy
				"/usr/sbin/ip6tables-restore":     "ip6tables-legacy-restore",
				"/usr/sbin/iptables-nft-save":     "xtables-nft-multi",
				"/usr/sbin/ip6tables-legacy-save": "xtables-legacy-multi",
				"/lib64":                          "usr/lib64",
			} {
				if links[dst] != link {
					t.Errorf("kube-proxy: %s -> %q, want %q", dst, links[dst], link)
				}
			}
			for _, p := range []string{"/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi",
				"/usr/sbin/nft", "/usr/sbin/conntrack", "/etc/protocols",
				"/usr/lib/x86_64-linux-gnu/xtables/libxt_comment.so",
				"/usr/lib/x86_64-linux-gnu/libnftables.so.1.1.0"} {
				if !srcs[p] {
					t.Errorf("kube-proxy: no file %s", p)
				}
			}
			if s.Files[0].Dst != "/usr/local/bin/kube-proxy" {
				t.Errorf("kube-proxy binary at %s", s.Files[0].Dst)
			}
		case strings.Contains(s.Ref, "/etcd:"):
			if len(s.Files) != 2 || s.Files[0].Dst != "/usr/local/bin/etcd" || s.Files[1].Dst != "/usr/local/bin/etcdctl" {
				t.Errorf("etcd files %v", s.Files)
			}
		case strings.Contains(s.Ref, "/coredns:"):
			if !reflect.DeepEqual(s.Entrypoint, []string{"/coredns"}) {
				t.Errorf("coredns entrypoint %v", s.Entrypoint)
			}
		}
	}

	if _, _, err := imageSet(t.TempDir(), "/tmp/pause", "nft"); err == nil ||
		!strings.Contains(err.Error(), "kube-apiserver") {
		t.Errorf("empty bin dir: %v", err)
	}
	if _, _, err := imageSet(dir, "/tmp/pause", "ipvs"); err == nil {
		t.Error("iptables mode ipvs: no error")
	}
}

func TestImagesList(t *testing.T) {
	needTools(t)
	var out, errOut bytes.Buffer
	dir := fakeBinDir(t, "", append(requiredBinaries, "coredns")...)
	if err := run(context.Background(), options{binDir: dir, list: true, iptablesMode: "nft"}, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(out.String())
	if len(lines) != 7 || lines[6] != "registry.k8s.io/coredns/coredns:v1.12.1" {
		t.Errorf("--images-list printed %q", out.String())
	}
	if !strings.Contains(errOut.String(), "agnhost") {
		t.Errorf("no note about agnhost: %q", errOut.String())
	}
}

// buildTestPause builds the pause binary once per test binary run.
func buildTestPause(t *testing.T) string {
	t.Helper()
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command")
	}
	p := filepath.Join(t.TempDir(), "pause")
	if err := buildPause(context.Background(), p); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPause(t *testing.T) {
	pause := buildTestPause(t)
	deps, err := image.ELFDeps(pause)
	if err != nil || len(deps) != 0 {
		t.Errorf("pause is not static: %v %v", deps, err)
	}
	out, err := exec.Command(pause, "-v").Output()
	if err != nil || !strings.Contains(string(out), "pause.go version") {
		t.Errorf("pause -v: %q %v", out, err)
	}
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		cmd := exec.Command(pause)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		// It keeps running: a SIGCHLD must not stop it either.
		time.Sleep(100 * time.Millisecond)
		cmd.Process.Signal(syscall.SIGCHLD)
		select {
		case err := <-done:
			t.Fatalf("pause exited early: %v", err)
		case <-time.After(200 * time.Millisecond):
		}
		cmd.Process.Signal(sig)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("pause after %v: %v, want exit 0", sig, err)
			}
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("pause ignored %v", sig)
		}
	}
}

func TestRunSkipsWhenWarm(t *testing.T) {
	needTools(t)
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command")
	}
	dir := fakeBinDir(t, "", requiredBinaries...)
	out := filepath.Join(t.TempDir(), "images.tar")
	o := options{binDir: dir, out: out, format: formatDocker, iptablesMode: "nft"}
	runOnce := func() string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		if err := run(context.Background(), o, &stdout, &stderr); err != nil {
			t.Fatalf("%v\n%s", err, stderr.String())
		}
		return stdout.String()
	}
	if s := runOnce(); !strings.Contains(s, "wrote 6 images (6 names)") {
		t.Fatalf("first run: %s", s)
	}
	first, _ := os.ReadFile(out)
	if s := runOnce(); !strings.Contains(s, "up to date") {
		t.Errorf("second run: %s", s)
	}
	// A rebuilt binary (newer mtime) makes it build again, to the same bytes.
	future := time.Now().Add(time.Minute)
	os.Chtimes(filepath.Join(dir, "kube-scheduler"), future, future)
	if s := runOnce(); !strings.Contains(s, "wrote 6 images (6 names)") {
		t.Errorf("after touching an input: %s", s)
	}
	if again, _ := os.ReadFile(out); !bytes.Equal(first, again) {
		t.Error("same inputs, different tarball")
	}
	// Other flags, other recipe.
	o.iptablesMode = "legacy"
	if s := runOnce(); !strings.Contains(s, "wrote 6 images (6 names)") {
		t.Errorf("after changing --iptables-mode: %s", s)
	}
	os.Remove(filepath.Join(dir, "etcd"))
	o.force = true
	var stdout, stderr bytes.Buffer
	if err := run(context.Background(), o, &stdout, &stderr); err == nil || !strings.Contains(err.Error(), "etcd") {
		t.Errorf("without etcd: %v", err)
	}
}

// k8sBinDir is where test/k8s/build.sh puts the real binaries (KPFREE_K8S_BIN overrides).
func k8sBinDir() string {
	if d := os.Getenv("KPFREE_K8S_BIN"); d != "" {
		return d
	}
	return defaultBinDir()
}

// TestKubeadmImageList checks the set against what the real kubeadm asks for.
func TestKubeadmImageList(t *testing.T) {
	kubeadm := filepath.Join(k8sBinDir(), "kubeadm")
	if !isFile(kubeadm) {
		t.Skipf("no %s (test/k8s/build.sh)", kubeadm)
	}
	out, err := exec.Command(kubeadm, "config", "images", "list", "--kubernetes-version", KubernetesVersion).Output()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		t.Fatalf("kubeadm: %v\n%s", err, ee.Stderr)
	} else if err != nil {
		t.Fatal(err)
	}
	wantRefs := strings.Fields(string(out))
	dir := fakeBinDir(t, "", append(requiredBinaries, "coredns")...)
	images, _, err := imageSet(dir, "/tmp/pause", "nft")
	if err != nil {
		t.Fatal(err)
	}
	got := refs(images)
	for _, r := range wantRefs {
		if !slices.Contains(got, r) {
			t.Errorf("kubeadm wants %s; the set has %v", r, got)
		}
	}
}
