//go:build linux

package bpf_test

// Attaching the tc programs: a veth pair in the test's own network namespace,
// LoadNodePort in tcx mode (where the kernel has it) and with ForceLegacyTC
// (clsact + cls_bpf, the 4.19-6.5 path), restart, device removal from the
// list, mode switch, Detach and Uninstall.

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/kpfree/kpfree/bpf"
)

var tcDevs = []string{"kpft0", "kpft1"}

// tcEnv loads the socket LB (child cgroup, private bpffs) and creates a veth
// pair in the env's network namespace. Everything tc is undone inside that
// namespace at cleanup, before the env's own Uninstall (which runs outside).
func tcEnv(t *testing.T) (*env, *bpf.Datapath) {
	t.Helper()
	e := newEnv(t)
	dp := e.load(bpf.Options{})
	if err := inNetns(e.netns, func() error {
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: tcDevs[0]}, PeerName: tcDevs[1]})
	}); err != nil {
		t.Fatalf("create veth: %v", err)
	}
	t.Cleanup(func() {
		if err := inNetns(e.netns, func() error { return bpf.Uninstall(e.pinDir, e.cgroup) }); err != nil {
			t.Errorf("uninstall in netns: %v", err)
		}
	})
	return e, dp
}

func (e *env) loadNodePort(dp *bpf.Datapath, opts bpf.NodePortOptions) *bpf.NodePort {
	e.t.Helper()
	var np *bpf.NodePort
	if err := inNetns(e.netns, func() (err error) {
		np, err = dp.LoadNodePort(opts)
		return err
	}); err != nil {
		e.t.Fatalf("LoadNodePort: %v", err)
	}
	for _, w := range np.Warnings {
		e.t.Logf("LoadNodePort warning: %s", w)
	}
	return np
}

// tcState is what a device has of kpfree's: program names per hook, by
// attachment kind, and the program ids (to see a restart replace them).
type tcState struct {
	tcx, filters map[string][]string // "ingress"/"egress" -> program names
	ids          []ebpf.ProgramID
	linkIDs      []link.ID
	clsact       bool
}

func (e *env) tcState(dev string) tcState {
	e.t.Helper()
	s := tcState{tcx: map[string][]string{}, filters: map[string][]string{}}
	err := inNetns(e.netns, func() error {
		l, err := netlink.LinkByName(dev)
		if err != nil {
			return err
		}
		for dir, at := range map[string]ebpf.AttachType{"ingress": ebpf.AttachTCXIngress, "egress": ebpf.AttachTCXEgress} {
			res, err := link.QueryPrograms(link.QueryOptions{Target: l.Attrs().Index, Attach: at})
			if err != nil && !errors.Is(err, ebpf.ErrNotSupported) && !errors.Is(err, unix.EINVAL) { // EINVAL: no tcx
				return err
			}
			if res != nil {
				for _, p := range res.Programs {
					s.tcx[dir] = append(s.tcx[dir], progName(e.t, p.ID))
					s.ids = append(s.ids, p.ID)
					if id, ok := p.LinkID(); ok {
						s.linkIDs = append(s.linkIDs, id)
					}
				}
			}
		}
		for dir, parent := range map[string]uint32{"ingress": netlink.HANDLE_MIN_INGRESS, "egress": netlink.HANDLE_MIN_EGRESS} {
			fs, err := netlink.FilterList(l, parent)
			if err != nil {
				continue // no clsact qdisc
			}
			for _, f := range fs {
				if bf, ok := f.(*netlink.BpfFilter); ok {
					s.filters[dir] = append(s.filters[dir], bf.Name)
					s.ids = append(s.ids, ebpf.ProgramID(bf.Id))
				}
			}
		}
		qs, err := netlink.QdiscList(l)
		for _, q := range qs {
			s.clsact = s.clsact || q.Type() == "clsact"
		}
		return err
	})
	if err != nil {
		e.t.Fatalf("tc state of %s: %v", dev, err)
	}
	for _, m := range []map[string][]string{s.tcx, s.filters} {
		for k := range m {
			sort.Strings(m[k])
		}
	}
	return s
}

func progName(t *testing.T, id ebpf.ProgramID) string {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		t.Fatalf("program %d: %v", id, err)
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.Name
}

var (
	wantIngress = []string{bpf.ProgTCIn4, bpf.ProgTCIn6}
	wantEgress  = []string{bpf.ProgTCOut4, bpf.ProgTCOut6}
)

// requireAttached checks that dev has exactly kpfree's four programs, in mode.
func (e *env) requireAttached(dev string, mode bpf.TCMode) tcState {
	e.t.Helper()
	s := e.tcState(dev)
	got, other := s.tcx, s.filters
	if mode == bpf.TCModeClsact {
		got, other = s.filters, s.tcx
	}
	if !slices.Equal(got["ingress"], wantIngress) || !slices.Equal(got["egress"], wantEgress) || len(other) != 0 {
		e.t.Fatalf("%s (%s): tcx %v, filters %v; want ingress %v, egress %v in %s only", dev, mode, s.tcx, s.filters, wantIngress, wantEgress, mode)
	}
	return s
}

func (e *env) requireBare(dev string, wantClsact bool) {
	e.t.Helper()
	s := e.tcState(dev)
	if len(s.tcx) != 0 || len(s.filters) != 0 || s.clsact != wantClsact {
		e.t.Fatalf("%s: tcx %v, filters %v, clsact qdisc %v; want nothing of kpfree's (clsact %v)", dev, s.tcx, s.filters, s.clsact, wantClsact)
	}
}

func TestIntegrationTCAttach(t *testing.T) {
	for _, mode := range []bpf.TCMode{bpf.TCModeTCX, bpf.TCModeClsact} {
		t.Run(string(mode), func(t *testing.T) {
			e, dp := tcEnv(t)
			if mode == bpf.TCModeTCX && !dp.Report.Has(bpf.FeatTCX) {
				t.Skip("no tcx on this kernel (Linux 6.6+)")
			}
			opts := bpf.NodePortOptions{Devices: tcDevs, ForceLegacyTC: mode == bpf.TCModeClsact}
			np := e.loadNodePort(dp, opts)
			if np.Mode != mode || len(np.Devices) != 2 || np.Devices[0].Name != tcDevs[0] || np.Devices[0].Index == 0 {
				t.Fatalf("NodePort %+v, want mode %s on %v", np, mode, tcDevs)
			}
			before := e.requireAttached(tcDevs[0], mode)
			e.requireAttached(tcDevs[1], mode)
			np.Close()

			// Restart: new programs in the same attachments.
			np = e.loadNodePort(dp, opts)
			after := e.requireAttached(tcDevs[0], mode)
			for _, id := range after.ids {
				if slices.Contains(before.ids, id) {
					t.Fatalf("program %d survived the restart: not replaced", id)
				}
			}
			// Same links (the query walks ingress/egress in map order: compare sorted).
			slices.Sort(before.linkIDs)
			slices.Sort(after.linkIDs)
			if mode == bpf.TCModeTCX && !slices.Equal(before.linkIDs, after.linkIDs) {
				t.Fatalf("tcx links %v became %v: not updated in place", before.linkIDs, after.linkIDs)
			}
			np.Close()

			// A device left out of the list is detached.
			np = e.loadNodePort(dp, bpf.NodePortOptions{Devices: tcDevs[:1], ForceLegacyTC: opts.ForceLegacyTC})
			e.requireAttached(tcDevs[0], mode)
			e.requireBare(tcDevs[1], false)
			// ...and the pins say so (what kpfree-agent status shows).
			atts, err := bpf.TCAttachments(e.pinDir)
			if err != nil {
				t.Fatal(err)
			}
			want := []bpf.TCAttachment{{Device: tcDevs[0], Mode: mode, Hooks: []string{"egress4", "egress6", "ingress4", "ingress6"}}}
			if !reflect.DeepEqual(atts, want) {
				t.Fatalf("TCAttachments = %+v, want %+v", atts, want)
			}

			// Detach leaves nothing: no programs, no pins, and no clsact
			// qdisc (kpfree created it).
			if err := inNetns(e.netns, np.Detach); err != nil {
				t.Fatalf("detach: %v", err)
			}
			e.requireBare(tcDevs[0], false)
			requireNoTCPins(t, e.pinDir)
		})
	}
}

// TestIntegrationTCModeSwitchAndUninstall: switching between tcx and clsact
// across a restart (where tcx exists) leaves only the new mode's
// attachments; Uninstall removes
// the tc programs too, but never a clsact qdisc kpfree did not create.
func TestIntegrationTCModeSwitchAndUninstall(t *testing.T) {
	e, dp := tcEnv(t)
	// kpft1 has a clsact qdisc of somebody else's.
	if err := inNetns(e.netns, func() error {
		l, err := netlink.LinkByName(tcDevs[1])
		if err != nil {
			return err
		}
		return netlink.QdiscAdd(&netlink.GenericQdisc{QdiscType: "clsact", QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: l.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}})
	}); err != nil {
		t.Fatalf("add clsact: %v", err)
	}
	if dp.Report.Has(bpf.FeatTCX) {
		e.loadNodePort(dp, bpf.NodePortOptions{Devices: tcDevs}).Close()
		e.requireAttached(tcDevs[0], bpf.TCModeTCX)
		e.loadNodePort(dp, bpf.NodePortOptions{Devices: tcDevs, ForceLegacyTC: true}).Close()
		e.requireAttached(tcDevs[0], bpf.TCModeClsact)
		e.requireAttached(tcDevs[1], bpf.TCModeClsact)
		e.loadNodePort(dp, bpf.NodePortOptions{Devices: tcDevs}).Close()
		e.requireAttached(tcDevs[0], bpf.TCModeTCX)
		e.requireAttached(tcDevs[1], bpf.TCModeTCX)
	} else {
		t.Log("no tcx on this kernel (Linux 6.6+): clsact and Uninstall only")
	}
	e.loadNodePort(dp, bpf.NodePortOptions{Devices: tcDevs, ForceLegacyTC: true}).Close()
	e.requireAttached(tcDevs[0], bpf.TCModeClsact)
	e.requireAttached(tcDevs[1], bpf.TCModeClsact)
	dp.Close()

	if err := inNetns(e.netns, func() error { return bpf.Uninstall(e.pinDir, e.cgroup) }); err != nil {
		t.Fatalf("uninstall: %v", err)
	}
	e.requireBare(tcDevs[0], false)
	e.requireBare(tcDevs[1], true) // not kpfree's qdisc: stays
	if _, err := os.Stat(filepath.Join(e.pinDir, bpf.PinVersion)); !errors.Is(err, os.ErrNotExist) {
		names, _ := readDirNames(filepath.Join(e.pinDir, bpf.PinVersion))
		t.Fatalf("pins left after Uninstall: %v (%v)", names, err)
	}
}

func requireNoTCPins(t *testing.T, pinDir string) {
	t.Helper()
	for _, sub := range []string{"links/tc", "tc/clsact"} {
		names, _ := readDirNames(filepath.Join(pinDir, bpf.PinVersion, sub))
		if len(names) > 0 {
			t.Fatalf("pins left under %s: %v", sub, names)
		}
	}
}
