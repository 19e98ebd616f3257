package image

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

const testRef = "registry.k8s.io/kube-apiserver:v1.34.4"

// testSpec is an image of one "binary" (a temp file) plus BaseFiles.
func testSpec(t *testing.T, content string) Spec {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "kube-apiserver")
	if err := os.WriteFile(bin, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	return Spec{
		Ref:        testRef,
		Base:       BaseFiles(),
		Files:      []File{{Src: bin, Dst: "/usr/local/bin/kube-apiserver"}},
		Entrypoint: []string{"/usr/local/bin/kube-apiserver"},
	}
}

func mustBuild(t *testing.T, s Spec) v1.Image {
	t.Helper()
	img, err := Build(s)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func digest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestBuildIsDeterministic(t *testing.T) {
	a := mustBuild(t, testSpec(t, "#!/bin/true\nsame bytes\n"))
	// Another temp dir, another file mtime, another build: same digest.
	b := mustBuild(t, testSpec(t, "#!/bin/true\nsame bytes\n"))
	if da, db := digest(t, a), digest(t, b); da != db {
		t.Fatalf("same inputs, different digests: %s and %s", da, db)
	}
	c := mustBuild(t, testSpec(t, "#!/bin/true\nother bytes\n"))
	if digest(t, a) == digest(t, c) {
		t.Fatal("different file content, same digest")
	}
	// The base layer is shared by both.
	la, _ := a.Layers()
	lc, _ := c.Layers()
	if len(la) != 2 || len(lc) != 2 {
		t.Fatalf("want 2 layers, got %d and %d", len(la), len(lc))
	}
	da, _ := la[0].Digest()
	dc, _ := lc[0].Digest()
	if da != dc {
		t.Errorf("base layers differ: %s, %s", da, dc)
	}
}

func TestBuildConfig(t *testing.T) {
	s := testSpec(t, "x")
	s.Cmd = []string{"--help"}
	s.Env = []string{"FOO=bar"}
	s.WorkingDir = "/tmp"
	cf, err := mustBuild(t, s).ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.OS != "linux" || cf.Architecture != "amd64" {
		t.Errorf("platform %s/%s", cf.OS, cf.Architecture)
	}
	if !cf.Created.Time.Equal(Epoch) {
		t.Errorf("created %v, want %v", cf.Created, Epoch)
	}
	want := v1.Config{
		Entrypoint: []string{"/usr/local/bin/kube-apiserver"},
		Cmd:        []string{"--help"},
		Env:        []string{DefaultPath, "FOO=bar"},
		WorkingDir: "/tmp",
	}
	if !reflect.DeepEqual(cf.Config, want) {
		t.Errorf("config %+v, want %+v", cf.Config, want)
	}
	for _, h := range cf.History {
		if !h.Created.Time.Equal(Epoch) {
			t.Errorf("history time %v", h.Created)
		}
	}
}

// layerEntries lists a layer's tar entries as "name mode type[ -> link]".
func layerEntries(t *testing.T, l v1.Layer) []string {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var out []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if !h.ModTime.Equal(Epoch) || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("%s: mtime %v uid %d gid %d", h.Name, h.ModTime, h.Uid, h.Gid)
		}
		e := h.Name + " " + strconv.FormatInt(h.Mode, 8) + " " + string(h.Typeflag)
		if h.Linkname != "" {
			e += " -> " + h.Linkname
		}
		out = append(out, e)
	}
}

func TestLayerEntries(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "tool")
	if err := os.WriteFile(src, []byte("tool"), 0o750); err != nil {
		t.Fatal(err)
	}
	l, err := NewLayer([]File{
		{Src: src, Dst: "/usr/sbin/tool"},
		{Dst: "/usr/sbin/tool-alias", Link: "tool"},
		{Dst: "/usr/sbin/tool", Src: src}, // identical duplicate: merged
		{Dst: "/tmp", Mode: 0o1777},
		{Dst: "/a-b/c", Data: []byte("x")},
		{Dst: "/a/b", Data: []byte("y"), Mode: 0o600},
	}, Epoch)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"a/ 755 5",
		"a/b 600 0",
		"a-b/ 755 5",
		"a-b/c 644 0",
		"tmp/ 1777 5",
		"usr/ 755 5",
		"usr/sbin/ 755 5",
		"usr/sbin/tool 750 0",
		"usr/sbin/tool-alias 777 2 -> tool",
	}
	if got := layerEntries(t, l); !reflect.DeepEqual(got, want) {
		t.Errorf("entries:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestLayerErrors(t *testing.T) {
	for name, files := range map[string][]File{
		"relative":        {{Dst: "usr/bin/x", Data: []byte{}}},
		"root":            {{Dst: "/"}},
		"conflict":        {{Dst: "/x", Data: []byte("1")}, {Dst: "/x", Data: []byte("2")}},
		"through symlink": {{Dst: "/lib", Link: "usr/lib"}, {Dst: "/lib/libc.so.6", Data: []byte{}}},
		"missing source":  {{Dst: "/x", Src: "/nonexistent/kpfree"}},
	} {
		if _, err := NewLayer(files, Epoch); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestParseRef(t *testing.T) {
	for ref, ok := range map[string]bool{
		"registry.k8s.io/pause:3.10.1":                 true,
		"registry.k8s.io/coredns/coredns:v1.12.1":      true,
		"registry.k8s.io/e2e-test-images/agnhost:2.56": true,
		"pause:3.10.1":          false, // would become index.docker.io/library/...
		"registry.k8s.io/pause": false, // no tag
		"registry.k8s.io/pause@sha256:" + strings.Repeat("0", 64): false,
	} {
		if _, err := ParseRef(ref); (err == nil) != ok {
			t.Errorf("ParseRef(%q): err %v, want ok=%v", ref, err, ok)
		}
	}
}

func TestWriteTarball(t *testing.T) {
	a := mustBuild(t, testSpec(t, "apiserver"))
	s := testSpec(t, "pause")
	s.Ref = "registry.k8s.io/pause:3.10.1"
	p := mustBuild(t, s)
	images := map[string]v1.Image{
		testRef:                        a,
		"registry.k8s.io/pause:3.10.1": p,
		"registry.k8s.io/pause:3.10":   p, // an alias: same manifest.json entry
	}
	out := filepath.Join(t.TempDir(), "images.tar")
	if err := WriteTarball(out, images); err != nil {
		t.Fatal(err)
	}
	first, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := WriteTarball(out, images); err != nil {
		t.Fatal(err)
	}
	if second, _ := os.ReadFile(out); string(first) != string(second) {
		t.Error("two writes of the same images differ")
	}

	// manifest.json has exactly our names.
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(out) })
	if err != nil {
		t.Fatal(err)
	}
	var tags [][]string
	for _, d := range m {
		tags = append(tags, d.RepoTags)
	}
	want := [][]string{{testRef}, {"registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10.1"}}
	if !reflect.DeepEqual(tags, want) {
		t.Errorf("RepoTags %v, want %v", tags, want)
	}

	// go-containerregistry reads each image back with the same digest; the shared base layer
	// is stored once.
	for ref, img := range images {
		tag, _ := ParseRef(ref)
		back, err := tarball.ImageFromPath(out, &tag)
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		// The docker archive has no manifest: compare what it is built from.
		wantCfg, _ := img.ConfigName()
		gotCfg, err := back.ConfigName()
		if err != nil || gotCfg != wantCfg {
			t.Errorf("%s: config %s (%v), want %s", ref, gotCfg, err, wantCfg)
		}
	}
	layers := 0
	f, _ := os.Open(out)
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		if strings.HasSuffix(h.Name, ".tar.gz") {
			layers++
		}
	}
	if layers != 3 { // base, apiserver, pause
		t.Errorf("%d layer blobs, want 3", layers)
	}
}

func TestWriteOCI(t *testing.T) {
	a := mustBuild(t, testSpec(t, "apiserver"))
	images := map[string]v1.Image{testRef: a}
	dir := filepath.Join(t.TempDir(), "layout")
	if err := WriteOCILayout(dir, images); err != nil {
		t.Fatal(err)
	}
	// Writing again into the same directory is fine.
	if err := WriteOCILayout(dir, images); err != nil {
		t.Fatal(err)
	}
	lp, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Annotations[AnnotationRefName] != testRef ||
		im.Manifests[0].Annotations[AnnotationContainerdName] != testRef {
		t.Fatalf("index %+v", im.Manifests)
	}
	back, err := lp.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	if digest(t, back) != digest(t, a) {
		t.Error("layout image digest differs")
	}
	// Validate every blob against its digest (as a registry push would).
	layers, _ := back.Layers()
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, rc); err != nil {
			t.Errorf("layer: %v", err)
		}
		rc.Close()
	}

	// The archive holds the same files.
	arc := filepath.Join(t.TempDir(), "images.oci.tar")
	if err := WriteOCIArchive(arc, images); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(arc)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	var names []string
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		names = append(names, h.Name)
		if h.Typeflag != tar.TypeReg {
			continue
		}
		want, err := os.ReadFile(filepath.Join(dir, h.Name))
		if err != nil {
			t.Errorf("%s in archive but not in layout", h.Name)
			continue
		}
		got, _ := io.ReadAll(tr)
		if string(got) != string(want) {
			t.Errorf("%s differs between archive and layout", h.Name)
		}
	}
	if len(names) != 2+2+4 { // oci-layout, index.json, blobs/, blobs/sha256/, manifest, config, 2 layers
		t.Errorf("archive entries %v", names)
	}
	var index v1.IndexManifest
	b, _ := os.ReadFile(filepath.Join(dir, "index.json"))
	if err := json.Unmarshal(b, &index); err != nil || index.SchemaVersion != 2 {
		t.Errorf("index.json: %v %s", err, b)
	}
}
