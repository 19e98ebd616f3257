// Command agent-image writes the kpfree-agent image without Docker (`make
// image`): an OCI archive a registry takes (crane/skopeo push) and a
// docker-archive tarball `ctr -n k8s.io images import` takes.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kpfree/kpfree/internal/image"
)

func main() {
	bin := flag.String("bin", "bin/kpfree-agent", "static kpfree-agent binary (CGO_ENABLED=0)")
	tag := flag.String("tag", "dev", "image tag (the release version)")
	repo := flag.String("repository", image.AgentRepository, "image repository")
	out := flag.String("out-dir", "_out", "where to write kpfree-agent.oci.tar and kpfree-agent.tar")
	flag.Parse()
	if err := run(*bin, *repo+":"+*tag, *out); err != nil {
		fmt.Fprintln(os.Stderr, "agent-image:", err)
		os.Exit(1)
	}
}

func run(bin, ref, out string) error {
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("%w: build it first (make build)", err)
	}
	img, err := image.Build(image.AgentSpec(bin, ref))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	set := map[string]v1.Image{ref: img}
	oci := filepath.Join(out, "kpfree-agent.oci.tar")
	if err := image.WriteOCIArchive(oci, set); err != nil {
		return err
	}
	docker := filepath.Join(out, "kpfree-agent.tar")
	if err := image.WriteTarball(docker, set); err != nil {
		return err
	}
	d, err := img.Digest()
	if err != nil {
		return err
	}
	fmt.Printf("%s %s\n  OCI archive:    %s\n  docker archive: %s (ctr -n k8s.io images import)\n", ref, d, oci, docker)
	return nil
}
