//go:build linux

package bpf

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TCMode says how the tc programs are attached to a device.
type TCMode string

const (
	// TCModeTCX: tcx bpf_links (Linux 6.6+), pinned, updated in place on
	// restart.
	TCModeTCX TCMode = "tcx"
	// TCModeClsact: cls_bpf filters in direct-action mode on a clsact qdisc
	// (4.19-6.5), replaced in place (same priority and handle) on restart.
	TCModeClsact TCMode = "clsact"
)

// kpfree's own cls_bpf filters: one per program, with the program's protocol
// (ETH_P_IP or ETH_P_IPV6, so the kernel runs only the matching one), on
// these priorities and this handle. Filters of the same priority must share a
// protocol, hence one priority per family.
const (
	ClsactPrioIPv4 = 0x4b50 // 19280
	ClsactPrioIPv6 = 0x4b51 // 19281
	ClsactHandle   = 0x4b50
)

// NodePortOptions for [Datapath.LoadNodePort].
type NodePortOptions struct {
	// Devices are the interfaces (in the caller's network namespace) that
	// carry NodePort, ExternalIP and LoadBalancer traffic. Devices attached by
	// an earlier run but no longer listed are detached.
	Devices []string
	// ForceLegacyTC attaches with clsact + cls_bpf even where tcx exists (the
	// path of 4.19-6.5 kernels).
	ForceLegacyTC bool
}

// AttachedDevice is one device with kpfree's tc programs.
type AttachedDevice struct {
	Name  string
	Index int
	Mode  TCMode
}

// NodePort is the loaded and attached tc datapath.
type NodePort struct {
	Mode     TCMode
	Devices  []AttachedDevice
	Warnings []string

	dir   string
	progs *NodePortPrograms
	links []link.Link
}

// NodePortPrograms are the four tc programs of nodeport.c loaded against a
// set of maps, not attached (the loader's building block; tests run them with
// BPF_PROG_TEST_RUN).
type NodePortPrograms struct {
	In4, In6, Out4, Out6 *ebpf.Program
	coll                 *ebpf.Collection
}

// Program names in nodeport.c.
const (
	ProgTCIn4  = nodePortProgKpfTcIn4
	ProgTCIn6  = nodePortProgKpfTcIn6
	ProgTCOut4 = nodePortProgKpfTcOut4
	ProgTCOut6 = nodePortProgKpfTcOut6
)

// tcHook is where one program goes. Egress hooks come first: replies are
// translated back before new flows are translated forward.
type tcHook struct {
	prog   string
	suffix string // pin name suffix
	tcx    ebpf.AttachType
	parent uint32
	proto  uint16
	prio   uint16
}

var tcHooks = []tcHook{
	{ProgTCOut4, "egress4", ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS, unix.ETH_P_IP, ClsactPrioIPv4},
	{ProgTCOut6, "egress6", ebpf.AttachTCXEgress, netlink.HANDLE_MIN_EGRESS, unix.ETH_P_IPV6, ClsactPrioIPv6},
	{ProgTCIn4, "ingress4", ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS, unix.ETH_P_IP, ClsactPrioIPv4},
	{ProgTCIn6, "ingress6", ebpf.AttachTCXIngress, netlink.HANDLE_MIN_INGRESS, unix.ETH_P_IPV6, ClsactPrioIPv6},
}

// NodePortSpec returns nodeport.c's collection spec (nothing is loaded).
func NodePortSpec() (*ebpf.CollectionSpec, error) { return loadNodePort() }

// NewNodePortPrograms loads the tc programs so that they use the maps in m
// (the same kernel objects as the socket load balancer; no map is created).
func NewNodePortPrograms(m MapSet) (*NodePortPrograms, error) {
	spec, err := loadNodePort()
	if err != nil {
		return nil, err
	}
	repl := map[string]*ebpf.Map{}
	for name, mp := range map[string]*ebpf.Map{
		MapServices: m.Services, MapBackends: m.Backends, MapRevNat: m.RevNat, MapAffinity: m.Affinity,
		MapAffMatch: m.AffinityMatch, MapSockRevNat: m.SockRevNat, MapCT: m.CT, MapSrcRanges: m.SrcRanges,
		MapMaglev: m.Maglev, MapDevices: m.Devices, MapStats: m.Stats,
	} {
		ms, ok := spec.Maps[name]
		if !ok {
			continue
		}
		if mp == nil {
			return nil, fmt.Errorf("bpf: load tc programs: map %s missing from the MapSet", name)
		}
		// Sizes come from the existing map (MapSizes), pinning does not apply.
		ms.MaxEntries = mp.MaxEntries()
		ms.Pinning = ebpf.PinNone
		repl[name] = mp
	}
	coll, err := newCollection(spec, ebpf.CollectionOptions{MapReplacements: repl})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("bpf: load tc programs: %+v", verr)
		}
		return nil, fmt.Errorf("bpf: load tc programs: %w", err)
	}
	return &NodePortPrograms{
		In4: coll.Programs[ProgTCIn4], In6: coll.Programs[ProgTCIn6],
		Out4: coll.Programs[ProgTCOut4], Out6: coll.Programs[ProgTCOut6],
		coll: coll,
	}, nil
}

// Program returns a program by name (ProgTC*).
func (p *NodePortPrograms) Program(name string) *ebpf.Program { return p.coll.Programs[name] }

// Close releases the programs (attached ones stay attached).
func (p *NodePortPrograms) Close() error {
	p.coll.Close()
	return nil
}

// LoadNodePort loads the tc programs against d's maps and attaches them to
// ingress and egress of every device in opts.Devices: tcx links where the
// kernel has them (pinned under PinDir/v2/links/tc, updated in place on a
// restart), else clsact + cls_bpf filters (replaced in place; recorded under
// PinDir/v2/tc/clsact so that Uninstall finds them). Either way a restart
// never leaves a hook empty. Devices attached earlier but not listed now are detached.
// Device names are resolved in the calling thread's network namespace.
func (d *Datapath) LoadNodePort(opts NodePortOptions) (_ *NodePort, err error) {
	if d.coll == nil {
		return nil, errors.New("bpf: LoadNodePort: datapath closed")
	}
	if missing := d.Report.MissingForNodePort(); len(missing) > 0 {
		return nil, fmt.Errorf("bpf: NodePort datapath: %w", &MissingError{Missing: missing})
	}
	devs, err := lookupDevices(opts.Devices)
	if err != nil {
		return nil, err
	}
	n := &NodePort{Mode: TCModeTCX, dir: d.dir}
	if opts.ForceLegacyTC || !d.Report.Has(FeatTCX) {
		n.Mode = TCModeClsact
	}
	n.progs, err = NewNodePortPrograms(d.Maps)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			n.Close()
		}
	}()
	for _, sub := range []string{tcxLinkDir(d.dir), clsactDir(d.dir)} {
		if err := os.MkdirAll(sub, 0o700); err != nil {
			return nil, fmt.Errorf("bpf: %w", err)
		}
	}
	for _, dev := range devs {
		if n.Mode == TCModeTCX {
			err = n.attachTCX(d.dir, dev)
		} else {
			err = n.attachClsact(d.dir, dev)
		}
		if err != nil {
			return nil, fmt.Errorf("bpf: attach tc programs to %s (%s): %w", dev.Attrs().Name, n.Mode, err)
		}
		n.Devices = append(n.Devices, AttachedDevice{Name: dev.Attrs().Name, Index: dev.Attrs().Index, Mode: n.Mode})
	}
	// Make-before-break: only now drop what is no longer wanted, including
	// the other mode's attachments on devices that switched modes.
	keep := map[TCMode][]string{}
	for _, dev := range n.Devices {
		keep[n.Mode] = append(keep[n.Mode], dev.Name)
	}
	n.warn(detachTC(d.dir, keep))
	return n, nil
}

func (n *NodePort) warn(err error) {
	if err != nil {
		n.Warnings = append(n.Warnings, err.Error())
	}
}

func lookupDevices(names []string) ([]netlink.Link, error) {
	var devs []netlink.Link
	var errs []error
	for _, name := range names {
		l, err := netlink.LinkByName(name)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			continue
		}
		devs = append(devs, l)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("bpf: NodePort devices not found (check --devices and the network namespace): %w",
			errors.Join(errs...))
	}
	return devs, nil
}

// Pin names hold the device name; bpffs refuses dots (VLAN devices such as
// eth0.100), so '%' and '.' are escaped.
func escapeIfname(s string) string {
	return strings.NewReplacer("%", "%25", ".", "%2E").Replace(s)
}

func unescapeIfname(s string) string {
	return strings.NewReplacer("%2E", ".", "%25", "%").Replace(s)
}

func tcxLinkDir(dir string) string { return filepath.Join(dir, "links", "tc") }
func clsactDir(dir string) string  { return filepath.Join(dir, "tc", "clsact") }

// qdiscMarker is an empty directory beside a device's pinned programs saying
// that kpfree created the device's clsact qdisc (and may remove it).
const qdiscMarker = "created-qdisc"

func (n *NodePort) attachTCX(dir string, dev netlink.Link) error {
	idx := dev.Attrs().Index
	for _, h := range tcHooks {
		prog := n.progs.Program(h.prog)
		pin := filepath.Join(tcxLinkDir(dir), escapeIfname(dev.Attrs().Name)+"-"+h.suffix)
		l, err := n.reuseTCXLink(pin, idx, prog)
		if err != nil {
			return err
		}
		if l == nil {
			l, err = link.AttachTCX(link.TCXOptions{Interface: idx, Program: prog, Attach: h.tcx})
			if err != nil {
				return fmt.Errorf("%s: %w", h.prog, err)
			}
			if err := l.Pin(pin); err != nil {
				l.Close()
				return fmt.Errorf("pin %s: %w", pin, err)
			}
		}
		n.links = append(n.links, l)
	}
	return nil
}

// reuseTCXLink updates a pinned link to prog (atomic: no packet misses a
// program). It returns nil, nil when there is none to reuse: no pin, or a
// link on another interface index (the device was re-created) or a defunct
// one, which is dropped.
func (n *NodePort) reuseTCXLink(pin string, ifindex int, prog *ebpf.Program) (link.Link, error) {
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		return nil, fmt.Errorf("load pinned link %s: %w", pin, err)
	}
	info, err := l.Info()
	if err != nil || info.TCX() == nil || int(info.TCX().Ifindex) != ifindex {
		n.Warnings = append(n.Warnings, fmt.Sprintf("%s was attached elsewhere or is defunct: replaced", pin))
		return nil, dropLink(l)
	}
	if err := l.Update(prog); err != nil {
		if errors.Is(err, unix.ENOLINK) {
			return nil, dropLink(l)
		}
		l.Close()
		return nil, fmt.Errorf("update pinned link %s: %w", pin, err)
	}
	return l, nil
}

func (n *NodePort) attachClsact(dir string, dev netlink.Link) error {
	created, err := ensureClsact(dev)
	if err != nil {
		return err
	}
	devDir := filepath.Join(clsactDir(dir), escapeIfname(dev.Attrs().Name))
	if err := os.MkdirAll(devDir, 0o700); err != nil {
		return err
	}
	if created {
		if err := os.Mkdir(filepath.Join(devDir, qdiscMarker), 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	for _, h := range tcHooks {
		prog := n.progs.Program(h.prog)
		f := tcFilter(dev.Attrs().Index, h)
		f.Fd = prog.FD()
		// Same priority, protocol and handle: the kernel swaps the program
		// of the existing filter atomically.
		if err := netlink.FilterReplace(f); err != nil {
			return fmt.Errorf("tc filter replace %s: %w", h.prog, err)
		}
		// The pin records the attachment for Uninstall.
		pin := filepath.Join(devDir, h.suffix)
		_ = os.Remove(pin)
		if err := prog.Pin(pin); err != nil {
			return fmt.Errorf("pin %s: %w", pin, err)
		}
	}
	return nil
}

func tcFilter(ifindex int, h tcHook) *netlink.BpfFilter {
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    h.parent,
			Handle:    ClsactHandle,
			Protocol:  h.proto,
			Priority:  h.prio,
		},
		Name:         h.prog,
		DirectAction: true,
	}
}

// ensureClsact adds a clsact qdisc unless the device has one. It reports
// whether it created it.
func ensureClsact(dev netlink.Link) (bool, error) {
	qs, err := netlink.QdiscList(dev)
	if err != nil {
		return false, fmt.Errorf("list qdiscs: %w", err)
	}
	for _, q := range qs {
		if q.Attrs().Parent != netlink.HANDLE_CLSACT {
			continue
		}
		if q.Type() == "clsact" {
			return false, nil
		}
		return false, fmt.Errorf("the device has a %q qdisc where clsact goes (an ingress qdisc has no egress hook): "+
			"remove it or use tcx (Linux 6.6+)", q.Type())
	}
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: dev.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscAdd(q); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return false, nil
		}
		return false, fmt.Errorf("add clsact qdisc: %w", err)
	}
	return true, nil
}

// Close releases this process's handles; the programs stay attached (agent
// restart).
func (n *NodePort) Close() error {
	for _, l := range n.links {
		l.Close()
	}
	n.links = nil
	if n.progs != nil {
		n.progs.Close()
		n.progs = nil
	}
	return nil
}

// Detach removes kpfree's tc programs from every device this or an earlier
// run attached (under the same PinDir), then closes n. It needs the network
// namespace the devices live in.
func (n *NodePort) Detach() error {
	n.Close()
	return detachTC(n.dir, nil)
}

// detachTC removes tc attachments recorded under dir except those of keep
// (mode -> device names).
func detachTC(dir string, keep map[TCMode][]string) error {
	var errs []error
	pins, _ := os.ReadDir(tcxLinkDir(dir))
	for _, p := range pins {
		i := strings.LastIndexByte(p.Name(), '-')
		if i > 0 && slices.Contains(keep[TCModeTCX], unescapeIfname(p.Name()[:i])) {
			continue
		}
		pin := filepath.Join(tcxLinkDir(dir), p.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", pin, err), os.Remove(pin))
			continue
		}
		errs = append(errs, dropLink(l))
	}
	devs, _ := os.ReadDir(clsactDir(dir))
	for _, e := range devs {
		name := unescapeIfname(e.Name())
		if slices.Contains(keep[TCModeClsact], name) {
			continue
		}
		errs = append(errs, detachClsact(filepath.Join(clsactDir(dir), e.Name()), name))
	}
	return errors.Join(errs...)
}

// detachClsact deletes kpfree's filters from a device (when it still exists),
// the clsact qdisc too when kpfree created it and nothing else uses it, and
// the record.
func detachClsact(devDir, name string) error {
	var errs []error
	dev, err := netlink.LinkByName(name)
	if err == nil {
		for _, h := range tcHooks {
			errs = append(errs, deleteFilter(dev, h))
		}
		if _, err := os.Stat(filepath.Join(devDir, qdiscMarker)); err == nil {
			errs = append(errs, deleteClsactIfEmpty(dev))
		}
	} else if !errors.As(err, new(netlink.LinkNotFoundError)) {
		errs = append(errs, fmt.Errorf("detach tc filters from %s: %w", name, err))
	}
	// Only when the filters are gone: a failed delete stays recorded.
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return os.RemoveAll(devDir)
}

func deleteFilter(dev netlink.Link, h tcHook) error {
	fs, err := netlink.FilterList(dev, h.parent)
	if err != nil {
		return fmt.Errorf("list tc filters of %s: %w", dev.Attrs().Name, err)
	}
	for _, f := range fs {
		bf, ok := f.(*netlink.BpfFilter)
		if !ok || bf.Priority != h.prio || bf.Handle != ClsactHandle || bf.Protocol != h.proto {
			continue
		}
		if err := netlink.FilterDel(tcFilter(dev.Attrs().Index, h)); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete tc filter %s from %s: %w", h.prog, dev.Attrs().Name, err)
		}
	}
	return nil
}

func deleteClsactIfEmpty(dev netlink.Link) error {
	for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
		fs, err := netlink.FilterList(dev, parent)
		if err != nil || len(fs) > 0 {
			return nil // somebody else's filters: the qdisc stays
		}
	}
	err := netlink.QdiscDel(&netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: dev.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	})
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete clsact qdisc of %s: %w", dev.Attrs().Name, err)
	}
	return nil
}

// TCAttachment is one device kpfree's tc programs are recorded on (from the
// pins: read-only, nothing is loaded).
type TCAttachment struct {
	Device string   `json:"device"`
	Mode   TCMode   `json:"mode"`
	Hooks  []string `json:"hooks"` // ingress4, ingress6, egress4, egress6
}

// TCAttachments lists the devices with kpfree tc programs pinned under
// pinDir (as LoadNodePort left them), sorted by device.
func TCAttachments(pinDir string) ([]TCAttachment, error) {
	dir := filepath.Join(pinDir, PinVersion)
	byDev := map[TCMode]map[string][]string{TCModeTCX: {}, TCModeClsact: {}}
	ents, err := os.ReadDir(tcxLinkDir(dir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	for _, e := range ents {
		i := strings.LastIndexByte(e.Name(), '-')
		if i < 0 {
			continue
		}
		dev := unescapeIfname(e.Name()[:i])
		byDev[TCModeTCX][dev] = append(byDev[TCModeTCX][dev], e.Name()[i+1:])
	}
	devs, err := os.ReadDir(clsactDir(dir))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	for _, d := range devs {
		hooks, err := os.ReadDir(filepath.Join(clsactDir(dir), d.Name()))
		if err != nil {
			return nil, err
		}
		dev := unescapeIfname(d.Name())
		for _, h := range hooks {
			if h.Name() != qdiscMarker {
				byDev[TCModeClsact][dev] = append(byDev[TCModeClsact][dev], h.Name())
			}
		}
	}
	var out []TCAttachment
	for mode, m := range byDev {
		for dev, hooks := range m {
			slices.Sort(hooks)
			out = append(out, TCAttachment{Device: dev, Mode: mode, Hooks: hooks})
		}
	}
	slices.SortFunc(out, func(a, b TCAttachment) int {
		return cmp.Or(strings.Compare(a.Device, b.Device), strings.Compare(string(a.Mode), string(b.Mode)))
	})
	return out, nil
}
