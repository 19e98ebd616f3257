//go:build linux

// Package pinned inspects what a kpfree-agent left in bpffs (maps, links,
// programs) without changing anything: the read side of `kpfree-agent
// status` and `kpfree-agent services`.
package pinned

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/bpf"
)

// Dir is where Load pins under a bpffs mount.
func Dir(bpffs string) string { return filepath.Join(bpffs, bpf.PinVersion) }

// ErrNotInstalled is returned when no pinned maps exist.
var ErrNotInstalled = errors.New("no kpfree maps pinned")

// OpenMaps opens the pinned maps read-only. Close the set when done.
func OpenMaps(bpffs string) (bpf.MapSet, error) {
	dir := filepath.Join(Dir(bpffs), "maps")
	if _, err := os.Stat(filepath.Join(dir, bpf.MapServices)); errors.Is(err, fs.ErrNotExist) {
		return bpf.MapSet{}, fmt.Errorf("%w under %s", ErrNotInstalled, dir)
	}
	var m bpf.MapSet
	for _, x := range []struct {
		name string
		dst  **ebpf.Map
	}{
		{bpf.MapServices, &m.Services}, {bpf.MapBackends, &m.Backends}, {bpf.MapRevNat, &m.RevNat},
		{bpf.MapAffinity, &m.Affinity}, {bpf.MapAffMatch, &m.AffinityMatch}, {bpf.MapSockRevNat, &m.SockRevNat},
		{bpf.MapSrcRanges, &m.SrcRanges}, {bpf.MapMaglev, &m.Maglev},
		{bpf.MapCT, &m.CT}, {bpf.MapDevices, &m.Devices}, {bpf.MapStats, &m.Stats},
	} {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(dir, x.name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			m.Close()
			return bpf.MapSet{}, fmt.Errorf("open pinned map %s: %w", x.name, err)
		}
		*x.dst = mp
	}
	return m, nil
}

// Services reads the Services out of the maps without writing them.
//
// lbmap.New would restore straight from the maps, but it also deletes
// entries it finds unreachable, which could race with a running agent that
// is in the middle of a make-before-break change. So the maps lbmap
// reads are copied into private, unpinned maps first and lbmap reads the
// copy.
func Services(m bpf.MapSet) ([]lbmap.Service, error) {
	cp, err := bpf.NewMaps(bpf.MapSizes{
		Services:      m.Services.MaxEntries(),
		Backends:      m.Backends.MaxEntries(),
		RevNat:        m.RevNat.MaxEntries(),
		AffinityMatch: m.AffinityMatch.MaxEntries(),
		SrcRanges:     m.SrcRanges.MaxEntries(),
		Maglev:        m.Maglev.MaxEntries(),
		Affinity:      1024, // not copied: small
		SockRevNat:    1024,
	})
	if err != nil {
		return nil, err
	}
	defer cp.Close()
	err = errors.Join(
		copyMap[bpf.SvcKey, bpf.SvcVal](m.Services, cp.Services),
		copyMap[uint32, bpf.BackendVal](m.Backends, cp.Backends),
		copyMap[uint32, bpf.RevNatVal](m.RevNat, cp.RevNat),
		copyMap[bpf.AffMatchKey, uint32](m.AffinityMatch, cp.AffinityMatch),
		copyMap[bpf.SrcRangeKey, uint8](m.SrcRanges, cp.SrcRanges),
		copyMap[uint32, bpf.MaglevVal](m.Maglev, cp.Maglev),
	)
	if err != nil {
		return nil, err
	}
	t, err := lbmap.New(cp)
	if err != nil {
		return nil, err
	}
	return t.Dump()
}

func copyMap[K, V any](src, dst *ebpf.Map) error {
	var k K
	var v V
	it := src.Iterate()
	for it.Next(&k, &v) {
		if err := dst.Put(&k, &v); err != nil {
			return fmt.Errorf("copy %s: %w", src.String(), err)
		}
	}
	return it.Err()
}

// Attachment is one datapath program as pinned.
type Attachment struct {
	Program string
	Mode    bpf.AttachMode // "" when not pinned
	// CgroupID and Cgroup: where a pinned link attaches (Cgroup "" when the
	// directory was not found under the cgroup2 mount).
	CgroupID uint64
	Cgroup   string
	// Attached: the link is live (bpf_link) or the program is in the
	// cgroup's attached list (prog_attach, checked against cgroupPath).
	Attached bool
	Note     string
}

// Attachments lists every datapath program and how it is pinned.
// cgroupPath is where the agent is expected to attach (used for
// prog-attach, which a pin alone does not tie to a cgroup); cgroup2Root is
// searched to turn a link's cgroup id into a path.
func Attachments(bpffs, cgroupPath, cgroup2Root string) []Attachment {
	dir := Dir(bpffs)
	var out []Attachment
	for _, name := range bpf.ProgramNames() {
		a := Attachment{Program: name}
		if l, err := link.LoadPinnedLink(filepath.Join(dir, "links", name), nil); err == nil {
			a.Mode = bpf.AttachLink
			if info, err := l.Info(); err == nil && info.Cgroup() != nil {
				a.CgroupID = info.Cgroup().CgroupId
				a.Attached = true
				a.Cgroup = findCgroup(cgroup2Root, a.CgroupID)
			} else if err != nil {
				a.Note = err.Error()
			} else {
				a.Note = "link has no cgroup (defunct)"
			}
			l.Close()
		} else if !errors.Is(err, fs.ErrNotExist) {
			a.Note = err.Error()
		}
		if p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "progs", name), nil); err == nil {
			if a.Mode != "" {
				a.Note = strings.TrimSpace(a.Note + " also pinned as a prog-attach program")
			}
			a.Mode = bpf.AttachProgAttach
			a.Attached, a.Note = progAttached(p, cgroupPath, a.Note)
			if a.Attached {
				a.Cgroup = cgroupPath
				a.CgroupID, _ = cgroupID(cgroupPath)
			}
			p.Close()
		}
		out = append(out, a)
	}
	return out
}

// progAttached checks the cgroup's attached list for the pinned program.
func progAttached(p *ebpf.Program, cgroupPath, note string) (bool, string) {
	if cgroupPath == "" {
		return false, note + " (no cgroup to check)"
	}
	info, err := p.Info()
	if err != nil {
		return false, err.Error()
	}
	id, _ := info.ID()
	cg, err := os.Open(cgroupPath)
	if err != nil {
		return false, err.Error()
	}
	defer cg.Close()
	for _, at := range []ebpf.AttachType{
		ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
		ebpf.AttachCGroupUDP4Sendmsg, ebpf.AttachCGroupUDP6Sendmsg,
		ebpf.AttachCGroupUDP4Recvmsg, ebpf.AttachCGroupUDP6Recvmsg,
		ebpf.AttachCgroupInet4GetPeername, ebpf.AttachCgroupInet6GetPeername,
	} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: at})
		if err != nil {
			continue
		}
		if slices.ContainsFunc(res.Programs, func(ap link.AttachedProgram) bool { return ap.ID == id }) {
			return true, note
		}
	}
	return false, strings.TrimSpace(note + " pinned but not attached to " + cgroupPath)
}

func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

// findCgroup walks the cgroup2 mount for the directory whose inode (the
// cgroup id) is id.
func findCgroup(root string, id uint64) string {
	if root == "" {
		return ""
	}
	found := ""
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if ino, err := cgroupID(p); err == nil && ino == id {
			found = p
			return fs.SkipAll
		}
		return nil
	})
	return found
}
