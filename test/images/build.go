package main

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/kpfree/kpfree/internal/image"
)

// pauseSource is built into the pause image; embedding it makes it part of the recipe.
//
//go:embed pause/main.go
var pauseSource []byte

// built is an image of the set, built.
type built struct {
	Image
	img          v1.Image
	size         int64 // compressed, all layers
	uncompressed int64
}

func build(ctx context.Context, o options, stdout, stderr io.Writer) error {
	start := time.Now()
	tmp, err := os.MkdirTemp("", "kpfree-images-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	pauseBin := filepath.Join(tmp, "pause")

	images, skipped, err := imageSet(o.binDir, pauseBin, o.iptablesMode)
	if err != nil {
		return err
	}
	for _, s := range skipped {
		fmt.Fprintln(stderr, "images: skipping", s)
	}
	rec, inputs, err := recipe(o, images, pauseBin)
	if err != nil {
		return err
	}
	stamp := o.out + ".stamp"
	if !o.force {
		ok, why := upToDate(o.out, stamp, rec, inputs)
		if ok {
			fmt.Fprintf(stdout, "images: %s is up to date (%d images)\n", o.out, len(images))
			return nil
		}
		fmt.Fprintf(stderr, "images: building: %s\n", why)
	}

	if err := buildPause(ctx, pauseBin); err != nil {
		return err
	}
	results, err := buildAll(ctx, images)
	if err != nil {
		return err
	}
	byRef := map[string]v1.Image{}
	for _, b := range results {
		for _, r := range b.Refs() {
			byRef[r] = b.img
		}
	}
	os.Remove(stamp) // a failed write must not leave a matching stamp behind
	switch o.format {
	case formatDocker:
		err = image.WriteTarball(o.out, byRef)
	case formatOCIArch:
		err = image.WriteOCIArchive(o.out, byRef)
	case formatOCILayout:
		err = image.WriteOCILayout(o.out, byRef)
	}
	if err != nil {
		return err
	}
	if err := os.WriteFile(stamp, []byte(rec+"\n"), 0o644); err != nil {
		return err
	}

	fmt.Fprintf(stdout, "images: wrote %d images (%d names) to %s (%s, %s) in %.1f s\n",
		len(results), len(byRef), o.out, o.format, human(outSize(o.out)), time.Since(start).Seconds())
	for _, b := range results {
		fmt.Fprintf(stdout, "  %-50s %9s  (%s unpacked)\n", b.Spec.Ref, human(b.size), human(b.uncompressed))
		for _, a := range b.Aliases {
			fmt.Fprintf(stdout, "  %-50s %9s\n", a, "(same)")
		}
	}
	return nil
}

// buildAll builds the images, as many at a time as there are CPUs (gzip is the cost).
func buildAll(ctx context.Context, images []Image) ([]built, error) {
	out := make([]built, len(images))
	errs := make([]error, len(images))
	sem := make(chan struct{}, runtime.NumCPU())
	var wg sync.WaitGroup
	for i, im := range images {
		wg.Add(1)
		go func() {
			defer wg.Done()
			select {
			case sem <- struct{}{}:
				defer func() { <-sem }()
			case <-ctx.Done():
				errs[i] = ctx.Err()
				return
			}
			img, err := image.Build(im.Spec)
			if err != nil {
				errs[i] = err
				return
			}
			b := built{Image: im, img: img}
			layers, err := img.Layers()
			if err != nil {
				errs[i] = err
				return
			}
			for _, l := range layers {
				n, _ := l.Size()
				b.size += n
				if u, ok := l.(interface{ UncompressedSize() int64 }); ok {
					b.uncompressed += u.UncompressedSize()
				}
			}
			out[i] = b
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// buildPause builds the embedded pause source, static, into dst: in a throwaway module, so it
// works from any directory and builds exactly the embedded source.
func buildPause(ctx context.Context, dst string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("building pause: %w (the go command is needed)", err)
	}
	dir, err := os.MkdirTemp("", "kpfree-pause-src-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module kpfree.test/pause\n\ngo 1.22\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), pauseSource, 0o644); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-ldflags=-s -w -buildid=", "-o", dst, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64", "GOWORK=off",
		"GOFLAGS=-buildvcs=false", "GOTOOLCHAIN=local")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("building pause: %v\n%s", err, out)
	}
	return nil
}

// recipe hashes everything that decides the output: this program, the Go version, the pause
// source, the flags and every image's files (with the size and mtime of each source). It also
// returns the input files, for the mtime check.
func recipe(o options, images []Image, pauseBin string) (string, []string, error) {
	type file struct {
		image.File
		Data     string `json:",omitempty"`
		Size     int64  `json:",omitempty"`
		Modified int64  `json:",omitempty"`
	}
	type img struct {
		Refs                 []string
		Base, Files          []file
		Entrypoint, Cmd, Env []string
		WorkingDir           string
		Labels               map[string]string
	}
	r := struct {
		Generator, Go, Pause, Format string
		Images                       []img
	}{Go: runtime.Version(), Pause: sum(pauseSource), Format: o.format}

	self, err := os.Executable()
	if err != nil {
		return "", nil, err
	}
	if r.Generator, err = sumFile(self); err != nil {
		return "", nil, err
	}

	var inputs []string
	conv := func(fs []image.File) ([]file, error) {
		var out []file
		for _, f := range fs {
			x := file{File: f}
			x.File.Data = nil
			if f.Data != nil {
				x.Data = sum(f.Data)
			}
			if f.Src != "" && f.Src != pauseBin {
				fi, err := os.Stat(f.Src)
				if err != nil {
					return nil, err
				}
				x.Size, x.Modified = fi.Size(), fi.ModTime().UnixNano()
				inputs = append(inputs, f.Src)
			}
			if f.Src == pauseBin {
				x.File.Src = "(pause)"
			}
			out = append(out, x)
		}
		return out, nil
	}
	for _, im := range images {
		s := im.Spec
		base, err := conv(s.Base)
		if err != nil {
			return "", nil, err
		}
		files, err := conv(s.Files)
		if err != nil {
			return "", nil, err
		}
		r.Images = append(r.Images, img{Refs: im.Refs(), Base: base, Files: files,
			Entrypoint: s.Entrypoint, Cmd: s.Cmd, Env: s.Env, WorkingDir: s.WorkingDir, Labels: s.Labels})
	}
	b, err := json.Marshal(r)
	if err != nil {
		return "", nil, err
	}
	return sum(b), inputs, nil
}

// upToDate: out exists, its stamp holds this recipe, and it is newer than every input.
func upToDate(out, stamp, rec string, inputs []string) (bool, string) {
	fi, err := os.Stat(out)
	if err != nil {
		return false, "no " + out
	}
	b, err := os.ReadFile(stamp)
	if err != nil || strings.TrimSpace(string(b)) != rec {
		return false, "inputs or flags changed since " + out + " was written"
	}
	for _, in := range inputs {
		ii, err := os.Stat(in)
		if err != nil || !ii.ModTime().Before(fi.ModTime()) {
			return false, in + " is newer than " + out
		}
	}
	return true, ""
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func sumFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// outSize is the size of a file, or of the files under a directory.
func outSize(p string) int64 {
	var n int64
	filepath.Walk(p, func(_ string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

func human(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
