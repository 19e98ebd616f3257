package image

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
)

const xtablesNFT = "/usr/sbin/xtables-nft-multi" // Debian's iptables package

func needFile(t *testing.T, p string) {
	t.Helper()
	if _, err := os.Stat(p); err != nil {
		t.Skipf("%s not here (apt-get install iptables): %v", p, err)
	}
}

func hasBase(paths []string, base string) bool {
	for _, p := range paths {
		if filepath.Base(p) == base {
			return true
		}
	}
	return false
}

func TestELFDepsXtables(t *testing.T) {
	needFile(t, xtablesNFT)
	deps, err := ELFDeps(xtablesNFT)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s needs %s", xtablesNFT, strings.Join(deps, " "))
	for _, want := range []string{"libxtables.so.12", "libnftnl.so.11", "libmnl.so.0", "libc.so.6", "ld-linux-x86-64.so.2"} {
		if !hasBase(deps, want) {
			t.Errorf("%s not found in %v", want, deps)
		}
	}
	// The interpreter by the path in PT_INTERP (libc's DT_NEEDED names it too).
	if !slices.Contains(deps, "/lib64/ld-linux-x86-64.so.2") {
		t.Errorf("interpreter /lib64/ld-linux-x86-64.so.2 not in %v", deps)
	}
}

func TestELFDepsStatic(t *testing.T) {
	// A Go test binary built with CGO_ENABLED=0 is static; with cgo it needs libc.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	deps, err := ELFDeps(self)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := exec.Command("go", "env", "CGO_ENABLED").Output()
	if strings.TrimSpace(string(out)) == "0" && len(deps) != 0 {
		t.Errorf("static binary needs %v", deps)
	}
	if _, err := ELFDeps("/etc/passwd"); err == nil {
		t.Error("ELFDeps of a text file: no error")
	}
}

func TestHostFilesKeepsSymlinks(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("Debian amd64 library paths")
	}
	needFile(t, xtablesNFT)
	files, err := HostFiles("/usr/sbin/iptables-nft", "/usr/lib/x86_64-linux-gnu/xtables")
	if err != nil {
		t.Fatal(err)
	}
	byDst := map[string]File{}
	for _, f := range files {
		byDst[f.Dst] = f
	}
	if f := byDst["/usr/sbin/iptables-nft"]; f.Link != "xtables-nft-multi" {
		t.Errorf("iptables-nft: %s", f)
	}
	if f := byDst[xtablesNFT]; f.Src != xtablesNFT || f.Mode&0o111 == 0 {
		t.Errorf("xtables-nft-multi: %+v", f)
	}
	// The interpreter path must work in the image as on the host: every symlink on the way
	// is kept (on merged /usr: /lib64 -> usr/lib64, ld-linux -> ../lib/x86_64-linux-gnu/...).
	img := map[string]File{}
	for _, f := range files {
		img[f.Dst] = f
	}
	for _, p := range []string{"/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libc.so.6",
		"/lib/x86_64-linux-gnu/libxtables.so.12", "/usr/lib/x86_64-linux-gnu/xtables/libxt_comment.so"} {
		f, err := resolveIn(img, p)
		if err != nil {
			t.Errorf("%s in image: %v", p, err)
			continue
		}
		if f.Src == "" {
			t.Errorf("%s resolves to %s, not a file", p, f)
		}
	}
	// Libraries that only the dlopen'd extensions need are there too.
	if _, err := resolveIn(img, "/lib/x86_64-linux-gnu/libnetfilter_conntrack.so.3"); err != nil {
		t.Errorf("libnetfilter_conntrack (libxt_connlabel): %v", err)
	}
	// And the set is a valid layer.
	if _, err := NewLayer(files, Epoch); err != nil {
		t.Fatal(err)
	}
}

// resolveIn follows p through the symlinks of an image file set, as the kernel would.
func resolveIn(img map[string]File, p string) (File, error) {
	for hops := 0; hops < maxLinks; hops++ {
		comps := strings.Split(strings.TrimPrefix(p, "/"), "/")
		cur := "/"
		moved := false
		for i, c := range comps {
			next := filepath.Join(cur, c)
			f, ok := img[next]
			if !ok {
				if i < len(comps)-1 {
					cur = next // an implicit parent directory
					continue
				}
				return File{}, os.ErrNotExist
			}
			if f.Link == "" {
				if i == len(comps)-1 {
					return f, nil
				}
				cur = next
				continue
			}
			target := f.Link
			if !filepath.IsAbs(target) {
				target = filepath.Join(cur, target)
			}
			p = filepath.Join(append([]string{target}, comps[i+1:]...)...)
			moved = true
			break
		}
		if !moved {
			return File{}, os.ErrNotExist
		}
	}
	return File{}, os.ErrInvalid
}
