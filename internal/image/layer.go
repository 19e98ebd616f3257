package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// File is one entry of a layer. Its kind follows from the fields set:
//
//	Link != ""   a symbolic link Dst -> Link (Link is kept as written, relative or absolute)
//	Data != nil  a regular file with these bytes
//	Src != ""    a regular file copied from the host path Src (symlinks in Src are followed)
//	otherwise    a directory
//
// Parent directories are added as needed (0755). Everything is owned by root.
type File struct {
	Src  string
	Dst  string // absolute path in the image
	Link string
	Data []byte
	// Mode is the chmod-style permission: 0o755, 0o4755, 0o1777. Zero means the mode of Src for a
	// file copied from the host, 0o644 for Data, 0o755 for a directory; ignored for links.
	Mode int64
}

func (f File) kind() string {
	switch {
	case f.Link != "":
		return "symlink"
	case f.Data != nil:
		return "data"
	case f.Src != "":
		return "file"
	default:
		return "dir"
	}
}

func (f File) String() string {
	switch f.kind() {
	case "symlink":
		return fmt.Sprintf("%s -> %s", f.Dst, f.Link)
	case "data":
		return fmt.Sprintf("%s (%d bytes of data)", f.Dst, len(f.Data))
	case "file":
		return fmt.Sprintf("%s (from %s)", f.Dst, f.Src)
	}
	return f.Dst + "/"
}

func same(a, b File) bool {
	return a.Src == b.Src && a.Link == b.Link && a.Mode == b.Mode &&
		(a.Data == nil) == (b.Data == nil) && bytes.Equal(a.Data, b.Data)
}

// gzipLevel trades size for speed: the images are mostly imported locally, where a few percent
// of size matter less than the seconds spent compressing 100 MB binaries.
const gzipLevel = gzip.BestSpeed

// Layer is a layer built in memory by NewLayer: its gzip bytes and both hashes.
type Layer struct {
	gz      []byte
	digest  v1.Hash
	diffID  v1.Hash
	size    int64 // uncompressed
	entries int
}

var _ v1.Layer = (*Layer)(nil)

// Digest is the sha256 of the compressed layer.
func (l *Layer) Digest() (v1.Hash, error) { return l.digest, nil }

// DiffID is the sha256 of the uncompressed tar.
func (l *Layer) DiffID() (v1.Hash, error) { return l.diffID, nil }

// Compressed returns the gzip bytes.
func (l *Layer) Compressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.gz)), nil
}

// Uncompressed returns the tar stream.
func (l *Layer) Uncompressed() (io.ReadCloser, error) {
	zr, err := gzip.NewReader(bytes.NewReader(l.gz))
	if err != nil {
		return nil, err
	}
	return zr, nil
}

// Size is the compressed size.
func (l *Layer) Size() (int64, error) { return int64(len(l.gz)), nil }

// UncompressedSize is the size of the tar stream.
func (l *Layer) UncompressedSize() int64 { return l.size }

// MediaType is the OCI gzip layer type.
func (l *Layer) MediaType() (types.MediaType, error) { return types.OCILayer, nil }

// NewLayer builds a deterministic gzip tar layer from files: entries sorted by path, owner
// root, every time set to mtime, parent directories added. Identical duplicates are merged;
// two different entries for one path, or a path that runs through a symlink of the layer, are
// errors.
func NewLayer(files []File, mtime time.Time) (*Layer, error) {
	entries, err := plan(files)
	if err != nil {
		return nil, err
	}
	mtime = mtime.UTC().Truncate(time.Second)

	var gzbuf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gzbuf, gzipLevel)
	if err != nil {
		return nil, err
	}
	diff := sha256.New()
	counter := &countWriter{}
	tw := tar.NewWriter(io.MultiWriter(zw, diff, counter))
	for _, f := range entries {
		if err := writeEntry(tw, f, mtime); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	gz := gzbuf.Bytes()
	sum := sha256.Sum256(gz)
	return &Layer{
		gz:      gz,
		digest:  v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])},
		diffID:  hashOf(diff),
		size:    counter.n,
		entries: len(entries),
	}, nil
}

func hashOf(h hash.Hash) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	return len(p), nil
}

// plan checks and completes the entries: clean absolute paths, no conflicting duplicates,
// parents present and not symlinks; sorted so that a directory precedes its contents.
func plan(files []File) ([]File, error) {
	byDst := make(map[string]File, len(files))
	for _, f := range files {
		if !path.IsAbs(f.Dst) {
			return nil, fmt.Errorf("%s: destination must be an absolute path", f)
		}
		f.Dst = path.Clean(f.Dst)
		if f.Dst == "/" {
			return nil, fmt.Errorf("%s: cannot replace the root directory", f)
		}
		if prev, ok := byDst[f.Dst]; ok {
			if !same(prev, f) {
				return nil, fmt.Errorf("two different entries for %s: %s and %s", f.Dst, prev, f)
			}
			continue
		}
		byDst[f.Dst] = f
	}
	for _, f := range byDst {
		for dir := path.Dir(f.Dst); dir != "/"; dir = path.Dir(dir) {
			p, ok := byDst[dir]
			if !ok {
				byDst[dir] = File{Dst: dir}
				continue
			}
			if k := p.kind(); k != "dir" {
				return nil, fmt.Errorf("%s: parent %s is a %s in this layer, not a directory "+
					"(use the path the link points to)", f, p, k)
			}
		}
	}
	// Sort by path components, so that a directory's entries follow it directly ("/a", "/a/z",
	// "/a-b"): with "/" mapped below every other byte, plain string order does that.
	keys := make([]string, 0, len(byDst))
	for dst := range byDst {
		keys = append(keys, strings.ReplaceAll(dst, "/", "\x00"))
	}
	sort.Strings(keys)
	out := make([]File, 0, len(keys))
	for _, k := range keys {
		out = append(out, byDst[strings.ReplaceAll(k, "\x00", "/")])
	}
	return out, nil
}

func writeEntry(tw *tar.Writer, f File, mtime time.Time) error {
	hdr := &tar.Header{
		Name:    strings.TrimPrefix(f.Dst, "/"),
		ModTime: mtime,
		Format:  tar.FormatPAX,
	}
	switch f.kind() {
	case "dir":
		hdr.Typeflag = tar.TypeDir
		hdr.Name += "/"
		hdr.Mode = orDefault(f.Mode, 0o755)
		return tw.WriteHeader(hdr)
	case "symlink":
		hdr.Typeflag = tar.TypeSymlink
		hdr.Linkname = f.Link
		hdr.Mode = 0o777
		return tw.WriteHeader(hdr)
	case "data":
		hdr.Typeflag = tar.TypeReg
		hdr.Mode = orDefault(f.Mode, 0o644)
		hdr.Size = int64(len(f.Data))
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err := tw.Write(f.Data)
		return err
	}
	src, err := os.Open(f.Src)
	if err != nil {
		return fmt.Errorf("%s: %w", f, err)
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return fmt.Errorf("%s: %w", f, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s: source is not a regular file (%s)", f, fi.Mode().Type())
	}
	hdr.Typeflag = tar.TypeReg
	hdr.Mode = orDefault(f.Mode, chmodBits(fi.Mode()))
	hdr.Size = fi.Size()
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if n, err := io.Copy(tw, io.LimitReader(src, hdr.Size)); err != nil {
		return fmt.Errorf("%s: %w", f, err)
	} else if n != hdr.Size {
		return fmt.Errorf("%s: source shrank while copying (%d of %d bytes)", f, n, hdr.Size)
	}
	return nil
}

func orDefault(mode, def int64) int64 {
	if mode == 0 {
		return def
	}
	return mode
}

// chmodBits converts an fs.FileMode to chmod-style bits (0o4755, 0o1777, ...).
func chmodBits(m os.FileMode) int64 {
	bits := int64(m.Perm())
	if m&os.ModeSetuid != 0 {
		bits |= 0o4000
	}
	if m&os.ModeSetgid != 0 {
		bits |= 0o2000
	}
	if m&os.ModeSticky != 0 {
		bits |= 0o1000
	}
	return bits
}
