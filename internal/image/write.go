package image

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// ParseRef checks that ref is a fully qualified image tag ("registry.k8s.io/pause:3.10.1") that
// reads back unchanged, so the name an importer stores is exactly the one given.
func ParseRef(ref string) (name.Tag, error) {
	tag, err := name.NewTag(ref, name.StrictValidation)
	if err != nil {
		return name.Tag{}, fmt.Errorf("image reference %q: %w", ref, err)
	}
	if tag.String() != ref {
		return name.Tag{}, fmt.Errorf("image reference %q is not fully qualified (it reads as %q)", ref, tag.String())
	}
	return tag, nil
}

// Annotations on index.json descriptors in an OCI layout: containerd's importer takes the full
// name from the first, skopeo and crane (and containerd, failing the first) from the second.
const (
	AnnotationContainerdName = "io.containerd.image.name"
	AnnotationRefName        = "org.opencontainers.image.ref.name"
)

// blobWriter receives the files of an archive or layout. Calls come in a fixed order.
type blobWriter interface {
	dir(name string) error
	file(name string, size int64, r io.Reader) error
}

// group is one distinct image and the refs that name it.
type group struct {
	img  v1.Image
	refs []string
}

// groups sorts refs and merges refs that name the same image (same manifest digest).
func groups(images map[string]v1.Image) ([]*group, error) {
	if len(images) == 0 {
		return nil, fmt.Errorf("no images to write")
	}
	refs := make([]string, 0, len(images))
	for ref := range images {
		if _, err := ParseRef(ref); err != nil {
			return nil, err
		}
		refs = append(refs, ref)
	}
	sort.Strings(refs)
	var out []*group
	byDigest := map[v1.Hash]*group{}
	for _, ref := range refs {
		img := images[ref]
		d, err := img.Digest()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", ref, err)
		}
		if g, ok := byDigest[d]; ok {
			g.refs = append(g.refs, ref)
			continue
		}
		g := &group{img: img, refs: []string{ref}}
		byDigest[d] = g
		out = append(out, g)
	}
	return out, nil
}

// writeBlobs writes every distinct config, layer and (if manifests) manifest blob once, named
// by fileName.
func writeBlobs(w blobWriter, gs []*group, manifests bool, fileName func(h v1.Hash, kind string) string) error {
	seen := map[v1.Hash]bool{}
	put := func(h v1.Hash, kind string, size int64, open func() (io.ReadCloser, error)) error {
		if seen[h] {
			return nil
		}
		seen[h] = true
		r, err := open()
		if err != nil {
			return err
		}
		defer r.Close()
		return w.file(fileName(h, kind), size, r)
	}
	rawBlob := func(b []byte) func() (io.ReadCloser, error) {
		return func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	}
	for _, g := range gs {
		if manifests {
			raw, err := g.img.RawManifest()
			if err != nil {
				return err
			}
			d, _ := g.img.Digest()
			if err := put(d, "manifest", int64(len(raw)), rawBlob(raw)); err != nil {
				return err
			}
		}
		cfg, err := g.img.RawConfigFile()
		if err != nil {
			return err
		}
		cd, err := g.img.ConfigName()
		if err != nil {
			return err
		}
		if err := put(cd, "config", int64(len(cfg)), rawBlob(cfg)); err != nil {
			return err
		}
		layers, err := g.img.Layers()
		if err != nil {
			return err
		}
		for _, l := range layers {
			d, err := l.Digest()
			if err != nil {
				return err
			}
			size, err := l.Size()
			if err != nil {
				return err
			}
			if err := put(d, "layer", size, l.Compressed); err != nil {
				return fmt.Errorf("%s: layer %s: %w", g.refs[0], d, err)
			}
		}
	}
	return nil
}

// WriteTarball writes images, keyed by their full refs, as one docker-archive tarball (the
// `docker save` format: manifest.json with RepoTags, a config and a gzip blob per layer), the
// format `ctr -n k8s.io images import` and `docker load` take. Refs naming the same image share
// one manifest.json entry; layers shared by images are stored once. The output is deterministic
// and written atomically (temp file + rename).
func WriteTarball(path string, images map[string]v1.Image) error {
	gs, err := groups(images)
	if err != nil {
		return err
	}
	return writeTarFile(path, func(tw *tarWriter) error {
		fileName := func(h v1.Hash, kind string) string {
			if kind == "config" {
				return h.Hex + ".json"
			}
			return h.Hex + ".tar.gz"
		}
		if err := writeBlobs(tw, gs, false, fileName); err != nil {
			return err
		}
		var m tarball.Manifest
		for _, g := range gs {
			cd, err := g.img.ConfigName()
			if err != nil {
				return err
			}
			layers, err := g.img.Layers()
			if err != nil {
				return err
			}
			d := tarball.Descriptor{Config: fileName(cd, "config"), RepoTags: g.refs}
			for _, l := range layers {
				ld, err := l.Digest()
				if err != nil {
					return err
				}
				d.Layers = append(d.Layers, fileName(ld, "layer"))
			}
			m = append(m, d)
		}
		b, err := json.Marshal(m)
		if err != nil {
			return err
		}
		return tw.file("manifest.json", int64(len(b)), bytes.NewReader(b))
	})
}

// ociIndex builds the index.json of an OCI layout: one descriptor per ref, in ref order.
func ociIndex(gs []*group) ([]byte, error) {
	var refs []string
	byRef := map[string]*group{}
	for _, g := range gs {
		for _, r := range g.refs {
			refs = append(refs, r)
			byRef[r] = g
		}
	}
	sort.Strings(refs)
	idx := v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex}
	for _, r := range refs {
		img := byRef[r].img
		mt, err := img.MediaType()
		if err != nil {
			return nil, err
		}
		raw, err := img.RawManifest()
		if err != nil {
			return nil, err
		}
		d, err := img.Digest()
		if err != nil {
			return nil, err
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return nil, err
		}
		idx.Manifests = append(idx.Manifests, v1.Descriptor{
			MediaType: mt,
			Size:      int64(len(raw)),
			Digest:    d,
			Platform:  &v1.Platform{OS: cf.OS, Architecture: cf.Architecture},
			Annotations: map[string]string{
				AnnotationContainerdName: r,
				AnnotationRefName:        r,
			},
		})
	}
	return json.Marshal(idx)
}

const ociLayoutFile = `{"imageLayoutVersion":"1.0.0"}`

func writeOCI(w blobWriter, gs []*group) error {
	if err := w.file("oci-layout", int64(len(ociLayoutFile)), bytes.NewReader([]byte(ociLayoutFile))); err != nil {
		return err
	}
	idx, err := ociIndex(gs)
	if err != nil {
		return err
	}
	if err := w.file("index.json", int64(len(idx)), bytes.NewReader(idx)); err != nil {
		return err
	}
	if err := w.dir("blobs"); err != nil {
		return err
	}
	if err := w.dir("blobs/sha256"); err != nil {
		return err
	}
	return writeBlobs(w, gs, true, func(h v1.Hash, _ string) string {
		return "blobs/" + h.Algorithm + "/" + h.Hex
	})
}

// WriteOCILayout writes images, keyed by their full refs, as an OCI image layout directory
// (oci-layout, index.json, blobs/sha256/...), which skopeo (`skopeo copy oci:DIR:REF
// docker://HOST/NAME:TAG`, one image) and crane (`crane push --index DIR HOST/NAME:TAG`, all of
// them as an index; plain `crane push DIR` for a layout of one image) read. Each index.json entry
// carries the full ref in both AnnotationContainerdName and AnnotationRefName. dir is created
// if needed; an existing index.json is replaced and blobs already present are kept.
func WriteOCILayout(dir string, images map[string]v1.Image) error {
	gs, err := groups(images)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return writeOCI(&dirWriter{root: dir}, gs)
}

// WriteOCIArchive writes the OCI image layout of WriteOCILayout as one tar file (what
// `skopeo copy oci-archive:FILE:REF ...` and `ctr images import` take). Deterministic, atomic.
func WriteOCIArchive(path string, images map[string]v1.Image) error {
	gs, err := groups(images)
	if err != nil {
		return err
	}
	return writeTarFile(path, func(tw *tarWriter) error { return writeOCI(tw, gs) })
}

// tarWriter writes entries with fixed metadata.
type tarWriter struct{ tw *tar.Writer }

func (t *tarWriter) dir(name string) error {
	return t.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755,
		ModTime: Epoch, Format: tar.FormatPAX})
}

func (t *tarWriter) file(name string, size int64, r io.Reader) error {
	if err := t.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644,
		Size: size, ModTime: Epoch, Format: tar.FormatPAX}); err != nil {
		return err
	}
	n, err := io.Copy(t.tw, r)
	if err == nil && n != size {
		err = fmt.Errorf("%s: wrote %d bytes, want %d", name, n, size)
	}
	return err
}

// writeTarFile creates path atomically: the tar goes to a temp file beside it, renamed on
// success.
func writeTarFile(path string, fill func(*tarWriter) error) (err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	tw := tar.NewWriter(tmp)
	if err := fill(&tarWriter{tw: tw}); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// dirWriter writes an OCI layout into a directory; blobs are content-addressed, so one that
// exists with the right size is kept.
type dirWriter struct{ root string }

func (d *dirWriter) dir(name string) error {
	return os.MkdirAll(filepath.Join(d.root, name), 0o755)
}

func (d *dirWriter) file(name string, size int64, r io.Reader) (err error) {
	p := filepath.Join(d.root, name)
	if fi, err := os.Stat(p); err == nil && fi.Size() == size && filepath.Dir(name) != "." {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".*.tmp")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	n, err := io.Copy(tmp, r)
	if err != nil {
		return err
	}
	if n != size {
		return fmt.Errorf("%s: wrote %d bytes, want %d", name, n, size)
	}
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), p)
}
