package image

import (
	"os"
	"path/filepath"
	"testing"
)

func TestAgentImage(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "kpfree-agent")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	img, err := Build(AgentSpec(bin, AgentRepository+":v0.1.0"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if ep := cfg.Config.Entrypoint; len(ep) != 1 || ep[0] != "/usr/local/bin/kpfree-agent" {
		t.Errorf("entrypoint %v", ep)
	}
	if cfg.Architecture != "amd64" || cfg.OS != "linux" {
		t.Errorf("platform %s/%s", cfg.OS, cfg.Architecture)
	}
	again, _ := Build(AgentSpec(bin, AgentRepository+":v0.1.0"))
	d1, _ := img.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("not reproducible: %s vs %s", d1, d2)
	}
}
