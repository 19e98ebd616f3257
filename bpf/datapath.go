//go:build linux

package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// PinVersion names the layout of everything pinned under Options.PinDir. Any
// change to a map's key, value, type or flags needs a new version (or a
// migration): pinned maps are reused by name and an incompatible one fails
// the load.
const PinVersion = "v2"

// MapSizes overrides the max_entries of the maps; zero keeps the default of
// sock_lb.c. Pinned maps keep the size they were created with: changing a
// size needs [Uninstall] (or a new PinVersion) first.
type MapSizes struct {
	Services      uint32 // master entries + backend slots (default 65536)
	Backends      uint32 // distinct backend addresses (default 65536)
	RevNat        uint32 // frontends (default 65536)
	Affinity      uint32 // LRU, client x service (default 65536)
	AffinityMatch uint32 // backend x service pairs (default 65536)
	SockRevNat    uint32 // LRU, translated sockets (default 131072)
	CT            uint32 // LRU, tc connection tracking entries (default 131072)
	SrcRanges     uint32 // loadBalancerSourceRanges prefixes (default 16384)
	Maglev        uint32 // Maglev tables, one per external frontend (default 16384)
}

// Options for [Load].
type Options struct {
	// PinDir is a directory on a bpffs mount; maps, links and programs are
	// pinned under PinDir/PinVersion/{maps,links,progs}.
	PinDir string
	// CgroupPath is the cgroup2 directory whose processes get the load
	// balancer (a node's own subtree, never the machine's cgroup2 root).
	CgroupPath string
	// AllowRootCgroup permits CgroupPath to be a cgroup2 root, which rewrites
	// connections of every process of the machine. Only for throwaway VMs.
	AllowRootCgroup bool
	// ForceProgAttach attaches with BPF_PROG_ATTACH + BPF_F_ALLOW_MULTI (the
	// path kernels before 5.7 need) even where bpf_link exists.
	ForceProgAttach bool
	// MapSizes overrides map sizes.
	MapSizes MapSizes
	// Report is a probe result to use instead of running [Probe]; use
	// Report.Without to emulate an older kernel.
	Report *Report
}

// AttachMode says how programs are attached.
type AttachMode string

const (
	AttachLink       AttachMode = "bpf_link" // pinned links, updated in place on restart
	AttachProgAttach AttachMode = "prog_attach"
)

// MapSet holds the handles of the datapath's maps.
type MapSet struct {
	Services      *ebpf.Map
	Backends      *ebpf.Map
	RevNat        *ebpf.Map
	Affinity      *ebpf.Map
	AffinityMatch *ebpf.Map
	SockRevNat    *ebpf.Map
	CT            *ebpf.Map
	SrcRanges     *ebpf.Map
	Maglev        *ebpf.Map
	Devices       *ebpf.Map
	Stats         *ebpf.Map
}

// Datapath is a loaded and attached socket load balancer.
type Datapath struct {
	Maps   MapSet
	Report Report
	Mode   AttachMode
	// Attached lists the programs attached, in attach order.
	Attached []string
	// Skipped maps a program left out to the reason.
	Skipped map[string]string
	// Emulated lists optional helpers replaced by "r0 = 0".
	Emulated []Feature
	// Warnings are non-fatal oddities met while replacing older attachments.
	Warnings []string

	dir    string
	cgroup *os.File
	coll   *ebpf.Collection
	links  map[string]link.Link
}

type progDef struct {
	name    string
	attach  ebpf.AttachType
	feature Feature
}

// progDefs is the attach order: reverse translation first, so a socket is
// never translated forward by a new program without its reverse in place.
var progDefs = []progDef{
	{sockLBProgKpfRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg, FeatRecvmsg4},
	{sockLBProgKpfRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg, FeatRecvmsg6},
	{sockLBProgKpfGetpeer4, ebpf.AttachCgroupInet4GetPeername, FeatGetpeername4},
	{sockLBProgKpfGetpeer6, ebpf.AttachCgroupInet6GetPeername, FeatGetpeername6},
	{sockLBProgKpfConnect4, ebpf.AttachCGroupInet4Connect, FeatConnect4},
	{sockLBProgKpfConnect6, ebpf.AttachCGroupInet6Connect, FeatConnect6},
	{sockLBProgKpfSendmsg4, ebpf.AttachCGroupUDP4Sendmsg, FeatSendmsg4},
	{sockLBProgKpfSendmsg6, ebpf.AttachCGroupUDP6Sendmsg, FeatSendmsg6},
}

const (
	cgroup2Magic = 0x63677270 // CGROUP2_SUPER_MAGIC
	bpffsMagic   = 0xcafe4a11 // BPF_FS_MAGIC
)

// Spec returns the datapath's collection spec with the map sizes applied
// (nothing is loaded).
func Spec(sizes MapSizes) (*ebpf.CollectionSpec, error) {
	spec, err := loadSockLB()
	if err != nil {
		return nil, err
	}
	for name, n := range map[string]uint32{
		MapServices:   sizes.Services,
		MapBackends:   sizes.Backends,
		MapRevNat:     sizes.RevNat,
		MapAffinity:   sizes.Affinity,
		MapAffMatch:   sizes.AffinityMatch,
		MapSockRevNat: sizes.SockRevNat,
		MapCT:         sizes.CT,
		MapSrcRanges:  sizes.SrcRanges,
		MapMaglev:     sizes.Maglev,
	} {
		if n != 0 {
			spec.Maps[name].MaxEntries = n
		}
	}
	return spec, nil
}

// Load probes the kernel, loads the programs, creates or reuses the pinned
// maps and attaches every program to opts.CgroupPath. Programs already
// attached by an earlier run (pinned under the same PinDir) are replaced
// without a gap: bpf_links are updated in place; prog-attach programs are
// attached anew (ALLOW_MULTI) before the old ones are detached.
func Load(opts Options) (_ *Datapath, err error) {
	if opts.PinDir == "" || opts.CgroupPath == "" {
		return nil, errors.New("bpf: PinDir and CgroupPath are required")
	}
	if err := RemoveMemlock(); err != nil {
		return nil, err
	}
	if err := checkFS(opts.PinDir, bpffsMagic, "bpffs"); err != nil {
		return nil, err
	}
	if err := checkCgroup(opts.CgroupPath, opts.AllowRootCgroup); err != nil {
		return nil, err
	}

	var report Report
	var warnings []string
	if opts.Report != nil {
		report = *opts.Report
	} else if report, err = Probe(); err != nil {
		// Inconclusive probes count as missing: fatal for a mandatory
		// feature (below), a degradation for an optional one.
		warnings = append(warnings, err.Error())
	}
	if missing := report.Missing(); len(missing) > 0 {
		if err != nil {
			return nil, fmt.Errorf("bpf: %w (%v)", &MissingError{Missing: missing}, err)
		}
		return nil, &MissingError{Missing: missing}
	}

	spec, err := Spec(opts.MapSizes)
	if err != nil {
		return nil, err
	}
	d := &Datapath{
		Report:   report,
		Mode:     AttachLink,
		Skipped:  map[string]string{},
		Warnings: warnings,
		dir:      filepath.Join(opts.PinDir, PinVersion),
		links:    map[string]link.Link{},
	}
	if opts.ForceProgAttach || !report.Has(FeatCgroupLink) {
		d.Mode = AttachProgAttach
	}
	var attach []progDef
	for _, p := range progDefs {
		if report.Has(p.feature) {
			attach = append(attach, p)
			continue
		}
		delete(spec.Programs, p.name)
		for _, f := range report.Features {
			if f.Feature == p.feature {
				d.Skipped[p.name] = fmt.Sprintf("%s missing (Linux %s): %s", f.Feature, f.Kernel, f.Effect)
			}
		}
	}
	d.Emulated = polyfillHelpers(spec, report)

	for _, sub := range []string{"maps", "links", "progs"} {
		if err := os.MkdirAll(filepath.Join(d.dir, sub), 0o700); err != nil {
			return nil, fmt.Errorf("bpf: %w", err)
		}
	}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()

	d.coll, err = newCollection(spec, ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: filepath.Join(d.dir, "maps")},
	})
	if err != nil {
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("bpf: pinned maps under %s do not match this build or MapSizes "+
				"(a layout change needs a new PinVersion; a size change needs Uninstall first): %w", d.dir, err)
		}
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("bpf: load programs: %+v", verr)
		}
		return nil, fmt.Errorf("bpf: load programs: %w", err)
	}
	d.Maps = MapSet{
		Services:      d.coll.Maps[MapServices],
		Backends:      d.coll.Maps[MapBackends],
		RevNat:        d.coll.Maps[MapRevNat],
		Affinity:      d.coll.Maps[MapAffinity],
		AffinityMatch: d.coll.Maps[MapAffMatch],
		SockRevNat:    d.coll.Maps[MapSockRevNat],
		CT:            d.coll.Maps[MapCT],
		SrcRanges:     d.coll.Maps[MapSrcRanges],
		Maglev:        d.coll.Maps[MapMaglev],
		Devices:       d.coll.Maps[MapDevices],
		Stats:         d.coll.Maps[MapStats],
	}

	d.cgroup, err = os.Open(opts.CgroupPath)
	if err != nil {
		return nil, fmt.Errorf("bpf: open cgroup: %w", err)
	}
	for _, p := range attach {
		prog := d.coll.Programs[p.name]
		if d.Mode == AttachLink {
			err = d.attachLink(p, prog)
		} else {
			err = d.attachProg(p, prog)
		}
		if err != nil {
			return nil, fmt.Errorf("bpf: attach %s to %s: %w", p.name, opts.CgroupPath, err)
		}
		d.Attached = append(d.Attached, p.name)
	}
	// A program this kernel (or Report.Without) rules out must not stay
	// attached from an earlier run.
	for _, p := range progDefs {
		if _, skipped := d.Skipped[p.name]; skipped {
			d.warn(detachPinned(d.dir, d.cgroup, p))
		}
	}
	return d, nil
}

func (d *Datapath) warn(err error) {
	if err != nil {
		d.Warnings = append(d.Warnings, err.Error())
	}
}

// attachLink attaches through a pinned bpf_link; an existing pinned link is
// updated to the new program atomically.
func (d *Datapath) attachLink(p progDef, prog *ebpf.Program) error {
	linkPin := filepath.Join(d.dir, "links", p.name)
	l, err := d.reuseLink(linkPin, prog)
	if err != nil {
		return err
	}
	if l == nil {
		raw, err := link.AttachRawLink(link.RawLinkOptions{
			Target:  int(d.cgroup.Fd()),
			Program: prog,
			Attach:  p.attach,
		})
		if err != nil {
			return err
		}
		if err := raw.Pin(linkPin); err != nil {
			raw.Close()
			return err
		}
		l = raw
	}
	d.links[p.name] = l
	// Now that the new program runs, drop a prog-attach copy left by an
	// earlier ForceProgAttach run.
	d.warn(detachPinnedProg(d.dir, d.cgroup, p))
	d.warn(sweepProgAttached(d.cgroup, p, 0))
	return nil
}

// reuseLink loads and updates a pinned link. It returns nil, nil when there is
// none to reuse (no pin, a defunct link, or one on another cgroup, which is
// then detached).
func (d *Datapath) reuseLink(pin string, prog *ebpf.Program) (link.Link, error) {
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	cgID, err := cgroupID(d.cgroup)
	if err != nil {
		l.Close()
		return nil, err
	}
	info, err := l.Info()
	if err == nil && info.Cgroup() != nil && info.Cgroup().CgroupId != cgID {
		d.Warnings = append(d.Warnings, fmt.Sprintf("%s was attached to another cgroup (id %d): detached", pin, info.Cgroup().CgroupId))
		return nil, dropLink(l)
	}
	if err := l.Update(prog); err != nil {
		if errors.Is(err, unix.ENOLINK) { // cgroup gone: defunct link
			return nil, dropLink(l)
		}
		l.Close()
		return nil, fmt.Errorf("update pinned link %s: %w", pin, err)
	}
	return l, nil
}

// attachProg attaches with BPF_PROG_ATTACH + ALLOW_MULTI, then detaches the
// program of the previous run: both run for a moment, which is harmless
// because a translated address is no VIP any more (and a reverse-translated
// one no backend).
func (d *Datapath) attachProg(p progDef, prog *ebpf.Program) error {
	err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target:  int(d.cgroup.Fd()),
		Program: prog,
		Attach:  p.attach,
		Flags:   unix.BPF_F_ALLOW_MULTI,
	})
	if err != nil {
		return err
	}
	progPin := filepath.Join(d.dir, "progs", p.name)
	tmp := progPin + "_new" // bpffs refuses names with a dot
	_ = os.Remove(tmp)
	if err := prog.Pin(tmp); err != nil {
		return err
	}
	d.warn(detachPinnedProg(d.dir, d.cgroup, p))
	if err := os.Rename(tmp, progPin); err != nil {
		return err
	}
	// A link from an earlier bpf_link run: closing its last reference detaches it.
	d.warn(detachPinnedLink(d.dir, p))
	id, err := progID(prog)
	if err != nil {
		return err
	}
	// Copies orphaned by a crash between attach and pin.
	d.warn(sweepProgAttached(d.cgroup, p, id))
	return nil
}

// Close releases this process's handles. Pinned maps, links and programs stay:
// the datapath keeps working until the next Load replaces it.
func (d *Datapath) Close() error {
	for _, l := range d.links {
		l.Close()
	}
	d.links = map[string]link.Link{}
	if d.coll != nil {
		d.coll.Close()
		d.coll = nil
	}
	if d.cgroup != nil {
		d.cgroup.Close()
		d.cgroup = nil
	}
	return nil
}

// Detach removes the programs from the cgroup and deletes every pin (maps
// included): the uninstall path. The Datapath is closed afterwards.
func (d *Datapath) Detach() error {
	if d.cgroup == nil {
		return errors.New("bpf: datapath closed")
	}
	var errs []error
	for name, l := range d.links {
		errs = append(errs, dropLink(l))
		delete(d.links, name)
	}
	errs = append(errs, uninstall(d.dir, d.cgroup), d.Close())
	return errors.Join(errs...)
}

// Uninstall detaches every program pinned under pinDir from cgroupPath, the
// tc programs from their devices (see [Datapath.LoadNodePort]; clsact filters
// are found by device name in the calling thread's network namespace), and
// deletes the pins, without loading anything (rollback, or before changing
// MapSizes).
func Uninstall(pinDir, cgroupPath string) error {
	cg, err := os.Open(cgroupPath)
	if err != nil {
		return fmt.Errorf("bpf: open cgroup: %w", err)
	}
	defer cg.Close()
	return uninstall(filepath.Join(pinDir, PinVersion), cg)
}

func uninstall(dir string, cg *os.File) error {
	var errs []error
	for _, p := range progDefs {
		errs = append(errs, detachPinned(dir, cg, p))
	}
	// The tc programs (LoadNodePort): tcx links, and clsact filters on the
	// devices recorded under tc/clsact (looked up by name in the calling
	// thread's network namespace).
	errs = append(errs, detachTC(dir, nil))
	for _, sub := range []string{tcxLinkDir(dir), clsactDir(dir), filepath.Join(dir, "tc")} {
		if err := os.Remove(sub); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	maps, _ := os.ReadDir(filepath.Join(dir, "maps"))
	for _, m := range maps {
		errs = append(errs, os.Remove(filepath.Join(dir, "maps", m.Name())))
	}
	for _, sub := range []string{"maps", "links", "progs", ""} {
		if err := os.Remove(filepath.Join(dir, sub)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// detachPinned removes p from the cgroup whichever way an earlier run
// attached it.
func detachPinned(dir string, cg *os.File, p progDef) error {
	return errors.Join(
		detachPinnedLink(dir, p),
		detachPinnedProg(dir, cg, p),
		sweepProgAttached(cg, p, 0),
	)
}

func detachPinnedLink(dir string, p progDef) error {
	pin := filepath.Join(dir, "links", p.name)
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return fmt.Errorf("detach %s: %w", pin, err)
	}
	return dropLink(l)
}

// dropLink detaches a link at once (BPF_LINK_DETACH, 5.9+: other holders of
// the link do not keep it attached, and the kernel does not defer it), then
// removes its pin and closes it. Before 5.9 the last close detaches.
func dropLink(l link.Link) error {
	_ = l.Detach()
	err := l.Unpin()
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	return errors.Join(err, l.Close())
}

func detachPinnedProg(dir string, cg *os.File, p progDef) error {
	pin := filepath.Join(dir, "progs", p.name)
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	old, err := ebpf.LoadPinnedProgram(pin, nil)
	if err != nil {
		return fmt.Errorf("detach %s: %w", pin, err)
	}
	defer old.Close()
	err = link.RawDetachProgram(link.RawDetachProgramOptions{
		Target:  int(cg.Fd()),
		Program: old,
		Attach:  p.attach,
	})
	if err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("detach %s: %w", pin, err)
	}
	return os.Remove(pin)
}

// sweepProgAttached detaches programs named like p that are prog-attached to
// cg, except keep (0: none). Link-attached ones refuse with ENOENT and stay.
func sweepProgAttached(cg *os.File, p progDef, keep ebpf.ProgramID) error {
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: p.attach})
	if err != nil {
		return nil // no BPF_PROG_QUERY: nothing to sweep with
	}
	var errs []error
	for _, ap := range res.Programs {
		if ap.ID == keep {
			continue
		}
		if _, isLink := ap.LinkID(); isLink {
			continue
		}
		prog, err := ebpf.NewProgramFromID(ap.ID)
		if err != nil {
			continue
		}
		info, err := prog.Info()
		if err == nil && info.Name == p.name {
			err = link.RawDetachProgram(link.RawDetachProgramOptions{Target: int(cg.Fd()), Program: prog, Attach: p.attach})
			if err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("detach orphan %s (id %d): %w", p.name, ap.ID, err))
			}
		}
		prog.Close()
	}
	return errors.Join(errs...)
}

func progID(p *ebpf.Program) (ebpf.ProgramID, error) {
	info, err := p.Info()
	if err != nil {
		return 0, err
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("kernel reports no program id")
	}
	return id, nil
}

// cgroupID is the cgroup2 id, which is the inode number of its directory.
func cgroupID(cg *os.File) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(cg.Fd()), &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

func checkFS(path string, magic int64, what string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return fmt.Errorf("bpf: %s: %w", path, err)
	}
	if int64(st.Type) != magic {
		return fmt.Errorf("bpf: %s is not on a %s mount", path, what)
	}
	return nil
}

// checkCgroup refuses anything but a cgroup2 directory and, unless allowed,
// a cgroup2 root: the root has no cgroup.type file.
func checkCgroup(path string, allowRoot bool) error {
	if err := checkFS(path, cgroup2Magic, "cgroup2"); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(path, "cgroup.type")); errors.Is(err, os.ErrNotExist) && !allowRoot {
		return fmt.Errorf("bpf: %s is a cgroup2 root: attaching there rewrites every connection of the machine "+
			"(set AllowRootCgroup only inside a throwaway VM)", path)
	}
	return nil
}

// ProgramNames lists the programs of the datapath, in attach order.
func ProgramNames() []string {
	names := make([]string, len(progDefs))
	for i, p := range progDefs {
		names[i] = p.name
	}
	return names
}

// NewMaps creates the datapath's maps, unpinned and without programs: for
// tests and tools that exercise the maps alone. Close them when done.
func NewMaps(sizes MapSizes) (MapSet, error) {
	if err := RemoveMemlock(); err != nil {
		return MapSet{}, err
	}
	spec, err := Spec(sizes)
	if err != nil {
		return MapSet{}, err
	}
	m := map[string]*ebpf.Map{}
	for name, ms := range spec.Maps {
		ms = ms.Copy()
		ms.Pinning = ebpf.PinNone
		mp, err := ebpf.NewMap(ms)
		if err != nil {
			for _, c := range m {
				c.Close()
			}
			return MapSet{}, fmt.Errorf("bpf: create map %s: %w", name, err)
		}
		m[name] = mp
	}
	return MapSet{
		Services: m[MapServices], Backends: m[MapBackends], RevNat: m[MapRevNat],
		Affinity: m[MapAffinity], AffinityMatch: m[MapAffMatch], SockRevNat: m[MapSockRevNat],
		CT: m[MapCT], SrcRanges: m[MapSrcRanges], Maglev: m[MapMaglev], Devices: m[MapDevices], Stats: m[MapStats],
	}, nil
}

// Close closes every map handle in the set.
func (m MapSet) Close() error {
	for _, mp := range []*ebpf.Map{m.Services, m.Backends, m.RevNat, m.Affinity, m.AffinityMatch, m.SockRevNat,
		m.CT, m.SrcRanges, m.Maglev, m.Devices, m.Stats} {
		if mp != nil {
			mp.Close()
		}
	}
	return nil
}
