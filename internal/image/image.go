// Package image builds container images from files on this machine, without Docker or a
// registry, using go-containerregistry.
//
// An image is one or two gzip layers on an empty linux/amd64 base. Everything that could vary
// between two builds of the same inputs is fixed (file times, owners, entry order, gzip header,
// config and history times), so the same files give the same digest.
//
// Build turns a Spec into a v1.Image; HostFiles and ELFDeps gather a dynamically linked host
// binary with its loader, shared libraries and symlinks; WriteTarball writes the docker-archive
// tarball `ctr -n k8s.io images import` takes, WriteOCILayout and WriteOCIArchive write an OCI
// image layout (as a directory or a tar) for crane, skopeo or a registry.
package image

import (
	"fmt"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Epoch is the time stamped on every file, layer and config unless a Spec says otherwise.
var Epoch = time.Unix(0, 0).UTC()

// Spec describes an image.
type Spec struct {
	// Ref names the image, fully qualified: "registry.k8s.io/kube-apiserver:v1.34.4".
	// Build checks it; the name goes into a tarball or layout through the writers' map keys.
	Ref string
	// Base, if not empty, is a first layer under Files: files several images share (a tool set,
	// BaseFiles) give the same layer digest and are stored once in a tarball or a registry.
	Base []File
	// Files is the image's (last) layer.
	Files []File

	Entrypoint []string
	Cmd        []string
	// Env as "NAME=value"; DefaultPath is added when it sets no PATH.
	Env        []string
	WorkingDir string
	// Labels go into the image config.
	Labels map[string]string
	// Created is stamped on the config, the history and every file; zero means Epoch.
	Created time.Time
}

// DefaultPath is the PATH an image gets when Spec.Env sets none.
const DefaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Build makes the image a Spec describes. The layers are built and compressed in memory.
func Build(spec Spec) (v1.Image, error) {
	if _, err := ParseRef(spec.Ref); err != nil {
		return nil, err
	}
	if len(spec.Files) == 0 && len(spec.Base) == 0 {
		return nil, fmt.Errorf("image %s: no files", spec.Ref)
	}
	created := spec.Created
	if created.IsZero() {
		created = Epoch
	}
	created = created.UTC().Truncate(time.Second)

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	for _, part := range []struct {
		name  string
		files []File
	}{{"base", spec.Base}, {"files", spec.Files}} {
		if len(part.files) == 0 {
			continue
		}
		l, err := NewLayer(part.files, created)
		if err != nil {
			return nil, fmt.Errorf("image %s: %s layer: %w", spec.Ref, part.name, err)
		}
		img, err = mutate.Append(img, mutate.Addendum{
			Layer: l,
			History: v1.History{
				Created:   v1.Time{Time: created},
				CreatedBy: fmt.Sprintf("kpfree image: %s, %d entries", part.name, l.entries),
			},
		})
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", spec.Ref, err)
		}
	}

	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", spec.Ref, err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = "amd64"
	cf.OS = "linux"
	cf.Created = v1.Time{Time: created}
	env := spec.Env
	if !hasEnv(env, "PATH") {
		env = append([]string{DefaultPath}, env...)
	}
	cf.Config = v1.Config{
		Entrypoint: spec.Entrypoint,
		Cmd:        spec.Cmd,
		Env:        env,
		WorkingDir: spec.WorkingDir,
		Labels:     spec.Labels,
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", spec.Ref, err)
	}
	// Settle the digest now so that errors surface here, not in a writer.
	if _, err := img.Digest(); err != nil {
		return nil, fmt.Errorf("image %s: %w", spec.Ref, err)
	}
	return img, nil
}

func hasEnv(env []string, name string) bool {
	for _, e := range env {
		if strings.HasPrefix(e, name+"=") {
			return true
		}
	}
	return false
}

// BaseFiles are the few files most programs expect in an image: /tmp (mode 1777), /run,
// /var/run -> /run, /etc/passwd and /etc/group with root and nobody, and an /etc/nsswitch.conf
// that looks in files first.
func BaseFiles() []File {
	return []File{
		{Dst: "/tmp", Mode: 0o777 | 01000},
		{Dst: "/run", Mode: 0o755},
		{Dst: "/var/run", Link: "/run"},
		{Dst: "/etc/passwd", Mode: 0o644, Data: []byte(
			"root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n")},
		{Dst: "/etc/group", Mode: 0o644, Data: []byte("root:x:0:\nnogroup:x:65534:\n")},
		{Dst: "/etc/nsswitch.conf", Mode: 0o644, Data: []byte(
			"passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n")},
	}
}
