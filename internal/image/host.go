package image

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// LibDirs are the directories searched for a shared library named without a slash, in order:
// the dynamic loader's default directories on Debian amd64 (no ld.so.cache is consulted, and
// none goes into the image, so a library must be where the loader looks by default).
var LibDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64"}

// maxLinks bounds symlink chains, as the kernel does.
const maxLinks = 40

// ELFDeps returns the host paths a dynamically linked ELF file needs at run time: its program
// interpreter (PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2) and the shared libraries of its
// DT_NEEDED entries, recursively. Libraries are searched in the file's DT_RPATH/DT_RUNPATH
// ($ORIGIN expanded) and then LibDirs, skipping files of another ELF class or machine. Paths
// are as the loader would open them (not resolved through symlinks), sorted. A static binary
// needs nothing; a file that is not ELF is an error.
func ELFDeps(file string) ([]string, error) {
	root, err := readELF(file)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	queue := []*elfInfo{root}
	if root.interp != "" {
		seen[root.interp] = true
		out = append(out, root.interp)
	}
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		for _, lib := range cur.needed {
			p, err := findLib(lib, cur, root)
			if err != nil {
				return nil, fmt.Errorf("%s (needed by %s): %w", lib, cur.path, err)
			}
			if seen[p] {
				continue
			}
			seen[p] = true
			out = append(out, p)
			info, err := readELF(p)
			if err != nil {
				return nil, err
			}
			queue = append(queue, info)
		}
	}
	sort.Strings(out)
	return out, nil
}

type elfInfo struct {
	path    string
	class   elf.Class
	machine elf.Machine
	interp  string
	needed  []string
	rpath   []string // DT_RPATH then DT_RUNPATH, $ORIGIN expanded
}

func readELF(path string) (*elfInfo, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading ELF %s: %w", path, err)
	}
	defer f.Close()
	info := &elfInfo{path: path, class: f.Class, machine: f.Machine}
	for _, p := range f.Progs {
		if p.Type != elf.PT_INTERP {
			continue
		}
		b, err := io.ReadAll(p.Open())
		if err != nil {
			return nil, fmt.Errorf("%s: reading PT_INTERP: %w", path, err)
		}
		info.interp = string(bytes.TrimRight(b, "\x00"))
	}
	// A static binary has no dynamic section: ImportedLibraries and DynString then report
	// nothing (or an error we can ignore for want of a .dynamic).
	if f.Section(".dynamic") == nil && dynProg(f) == nil {
		return info, nil
	}
	if info.needed, err = f.ImportedLibraries(); err != nil {
		return nil, fmt.Errorf("%s: reading DT_NEEDED: %w", path, err)
	}
	for _, tag := range []elf.DynTag{elf.DT_RPATH, elf.DT_RUNPATH} {
		vals, err := f.DynString(tag)
		if err != nil {
			return nil, fmt.Errorf("%s: reading %s: %w", path, tag, err)
		}
		for _, v := range vals {
			for _, dir := range strings.Split(v, ":") {
				dir = strings.ReplaceAll(dir, "${ORIGIN}", "$ORIGIN")
				dir = strings.ReplaceAll(dir, "$ORIGIN", filepath.Dir(path))
				if dir != "" {
					info.rpath = append(info.rpath, dir)
				}
			}
		}
	}
	return info, nil
}

func dynProg(f *elf.File) *elf.Prog {
	for _, p := range f.Progs {
		if p.Type == elf.PT_DYNAMIC {
			return p
		}
	}
	return nil
}

func findLib(name string, from, root *elfInfo) (string, error) {
	if strings.Contains(name, "/") {
		if _, err := os.Stat(name); err != nil {
			return "", err
		}
		return name, nil
	}
	dirs := append(append([]string(nil), from.rpath...), LibDirs...)
	for _, dir := range dirs {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err != nil {
			continue
		}
		f, err := elf.Open(p)
		if err != nil {
			continue
		}
		ok := f.Class == root.class && f.Machine == root.machine
		f.Close()
		if ok {
			return p, nil
		}
	}
	return "", fmt.Errorf("not found in %s", strings.Join(dirs, ", "))
}

// IsELF reports whether the file starts with the ELF magic.
func IsELF(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var magic [4]byte
	_, err = io.ReadFull(f, magic[:])
	return err == nil && string(magic[:]) == elf.ELFMAG
}

// HostFiles returns the image files that put the given host paths into an image at the same
// places, so that they work there as they do on the host:
//
//   - a regular file is copied (with its mode);
//   - a symlink, whether it is the path itself or one of its parent directories (/lib ->
//     usr/lib on a merged-/usr system), is kept as a symlink, and what it points to is added
//     the same way;
//   - a directory is added with everything below it (symlinks inside it are kept, and their
//     targets added when they exist);
//   - every ELF file brings its interpreter and shared libraries (ELFDeps).
//
// The result is sorted by destination and has no duplicates.
func HostFiles(paths ...string) ([]File, error) {
	c := &collector{files: map[string]File{}, done: map[string]bool{}}
	for _, p := range paths {
		if err := c.add(p); err != nil {
			return nil, err
		}
	}
	out := make([]File, 0, len(c.files))
	for _, f := range c.files {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Dst < out[j].Dst })
	return out, nil
}

type collector struct {
	files map[string]File // by Dst
	done  map[string]bool // real paths whose content was added
}

// add puts path (absolute, on the host) and all it needs into c.
func (c *collector) add(path string) error {
	if !filepath.IsAbs(path) {
		return fmt.Errorf("host path %q is not absolute", path)
	}
	real, err := c.resolve(filepath.Clean(path), 0)
	if err != nil {
		return err
	}
	return c.addReal(real)
}

// resolve walks path component by component as the kernel would, recording every symlink it
// crosses, and returns the path with no symlinks left.
func (c *collector) resolve(path string, depth int) (string, error) {
	if depth > maxLinks {
		return "", fmt.Errorf("%s: too many levels of symbolic links", path)
	}
	cur := "/"
	rest := strings.Split(strings.TrimPrefix(path, "/"), "/")
	for i, comp := range rest {
		if comp == "" {
			continue
		}
		next := filepath.Join(cur, comp)
		fi, err := os.Lstat(next)
		if err != nil {
			return "", err
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			cur = next
			continue
		}
		target, err := os.Readlink(next)
		if err != nil {
			return "", err
		}
		c.files[next] = File{Dst: next, Link: target}
		if !filepath.IsAbs(target) {
			target = filepath.Join(cur, target)
		}
		// The link's target is resolved on its own (recording its links), then the rest
		// of the path continues from there.
		resolved, err := c.resolve(filepath.Clean(target), depth+1)
		if err != nil {
			return "", fmt.Errorf("%s -> %s: %w", next, target, err)
		}
		if i == len(rest)-1 {
			return resolved, nil
		}
		return c.resolve(filepath.Join(append([]string{resolved}, rest[i+1:]...)...), depth+1)
	}
	return cur, nil
}

// addReal adds a path with no symlinks in it: a file (and its ELF needs) or a directory tree.
func (c *collector) addReal(real string) error {
	if c.done[real] {
		return nil
	}
	c.done[real] = true
	fi, err := os.Lstat(real)
	if err != nil {
		return err
	}
	switch {
	case fi.Mode().IsRegular():
		c.files[real] = File{Src: real, Dst: real, Mode: chmodBits(fi.Mode())}
		if !IsELF(real) {
			return nil
		}
		deps, err := ELFDeps(real)
		if err != nil {
			return err
		}
		for _, d := range deps {
			if err := c.add(d); err != nil {
				return err
			}
		}
		return nil
	case fi.IsDir():
		return c.addTree(real)
	}
	return fmt.Errorf("%s: unsupported file type %s", real, fi.Mode().Type())
}

func (c *collector) addTree(root string) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			c.files[p] = File{Dst: p, Mode: chmodBits(fi.Mode())}
			return nil
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			c.files[p] = File{Dst: p, Link: target}
			if !filepath.IsAbs(target) {
				target = filepath.Join(filepath.Dir(p), target)
			}
			if _, err := os.Stat(target); errors.Is(err, fs.ErrNotExist) {
				return nil // dangling on the host too
			}
			return c.add(target)
		}
		return c.addReal(p)
	})
}
