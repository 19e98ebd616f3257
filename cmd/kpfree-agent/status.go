package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/pinned"
	"github.com/kpfree/kpfree/bpf"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:   "status",
		Usage:  "show what is pinned and attached, Service and backend counts, kernel features (read-only)",
		Flags:  []cli.Flag{bpffsFlag, cgroupFlag, healthAddrFlag, outputFlag},
		Before: podDefaults(podArgsFile),
		Action: func(c *cli.Context) error {
			u, err := output(c)
			if err != nil {
				return err
			}
			st := gatherStatus(c)
			if u.Format == "json" {
				return u.WriteJSON(st)
			}
			return writeStatus(u.Out, st)
		},
	}
}

type programStatus struct {
	Name     string `json:"name"`
	Mode     string `json:"mode,omitempty"`
	Attached bool   `json:"attached"`
	Cgroup   string `json:"cgroup,omitempty"`
	CgroupID uint64 `json:"cgroupID,omitempty"`
	Note     string `json:"note,omitempty"`
}

type featureStatus struct {
	Feature   string `json:"feature"`
	Mandatory bool   `json:"mandatory"`
	Available bool   `json:"available"`
	Kernel    string `json:"kernel"`
	Effect    string `json:"effect,omitempty"`
}

type deviceStatus struct {
	Name   string   `json:"name"`
	Index  int      `json:"index,omitempty"`
	Mode   string   `json:"mode"`
	Hooks  []string `json:"hooks"`
	SNATv4 string   `json:"snatIPv4,omitempty"`
	SNATv6 string   `json:"snatIPv6,omitempty"`
	Note   string   `json:"note,omitempty"`
}

type agentStatus struct {
	PinDir     string          `json:"pinDir"`
	Installed  bool            `json:"installed"`
	AttachMode string          `json:"attachMode"`
	CgroupRoot string          `json:"cgroupRoot"`
	Programs   []programStatus `json:"programs"`
	Services   int             `json:"services"`
	Backends   int             `json:"backends"`
	Refused    int             `json:"refused"`
	Affinity   int             `json:"affinity"`
	MapsError  string          `json:"mapsError,omitempty"`
	Agent      string          `json:"agent"`
	// Traffic entering the node (tc): where the programs are, what they did.
	Devices    []deviceStatus    `json:"devices"`
	Conntrack  int               `json:"conntrackEntries"`
	Counters   map[string]uint64 `json:"counters,omitempty"`
	Kernel     []featureStatus   `json:"kernel"`
	ProbeError string            `json:"probeError,omitempty"`
}

func gatherStatus(c *cli.Context) agentStatus {
	bpffs := c.String("bpffs")
	st := agentStatus{PinDir: pinned.Dir(bpffs)}
	root, _ := hostCgroup2Root()
	cg, _, err := cgroupRoot(c)
	if err != nil {
		cg = ""
	}

	// Maps: counts.
	if m, err := pinned.OpenMaps(bpffs); err != nil {
		st.MapsError = err.Error()
	} else {
		st.Installed = true
		svcs, err := pinned.Services(m)
		st.Devices, st.Conntrack, st.Counters = nodePortStatus(bpffs, m)
		m.Close()
		if err != nil {
			st.MapsError = err.Error()
		}
		seen := map[lbmap.Backend]bool{}
		for _, s := range svcs {
			st.Services++
			if len(s.Backends) == 0 {
				st.Refused++
			}
			if s.Affinity > 0 {
				st.Affinity++
			}
			for _, b := range s.Backends {
				seen[b] = true
			}
		}
		st.Backends = len(seen)
	}

	// Programs: how and where they are attached.
	modes := map[string]bool{}
	cgroups := map[string]bool{}
	for _, a := range pinned.Attachments(bpffs, cg, root) {
		ps := programStatus{Name: a.Program, Mode: string(a.Mode), Attached: a.Attached, Cgroup: a.Cgroup, CgroupID: a.CgroupID, Note: a.Note}
		if a.Mode != "" {
			modes[string(a.Mode)] = true
		}
		if a.Attached {
			c := a.Cgroup
			if c == "" {
				c = "cgroup id " + strconv.FormatUint(a.CgroupID, 10)
			}
			cgroups[c] = true
		}
		st.Programs = append(st.Programs, ps)
	}
	st.AttachMode = joinKeys(modes, "not attached")
	st.CgroupRoot = joinKeys(cgroups, "-")

	st.Agent = probeAgent(c.String("health-addr"))

	rep, perr := bpf.Probe()
	if perr != nil {
		st.ProbeError = perr.Error()
	}
	for _, f := range rep.Features {
		st.Kernel = append(st.Kernel, featureStatus{Feature: string(f.Feature), Mandatory: f.Mandatory,
			Available: f.Available, Kernel: f.Kernel, Effect: f.Effect})
	}
	return st
}

// nodePortStatus reads where the tc programs are attached (pins), their SNAT
// addresses (kpf_devices, by ifindex in this network namespace), the
// conntrack entry count and the packet counters.
func nodePortStatus(bpffs string, m bpf.MapSet) ([]deviceStatus, int, map[string]uint64) {
	devs := []deviceStatus{}
	atts, err := bpf.TCAttachments(bpffs)
	if err != nil {
		devs = append(devs, deviceStatus{Note: "reading tc pins: " + err.Error()})
	}
	snat, _ := lbmap.ReadDevices(m.Devices)
	byName := map[string]lbmap.DeviceAddrs{}
	idx := map[string]int{}
	for i, a := range snat {
		if ifc, err := net.InterfaceByIndex(i); err == nil {
			byName[ifc.Name], idx[ifc.Name] = a, i
		}
	}
	for _, a := range atts {
		d := deviceStatus{Name: a.Device, Mode: string(a.Mode), Hooks: a.Hooks, Index: idx[a.Device]}
		if s, ok := byName[a.Device]; ok {
			if s.V4.IsValid() {
				d.SNATv4 = s.V4.String()
			}
			if s.V6.IsValid() {
				d.SNATv6 = s.V6.String()
			}
		}
		if _, err := net.InterfaceByName(a.Device); err != nil {
			d.Note = "device not found in this network namespace"
		}
		devs = append(devs, d)
	}
	ct := -1
	if n, err := bpf.CountEntries(m.CT); err == nil {
		ct = n
	}
	counters, _ := lbmap.ReadStats(m.Stats)
	return devs, ct, counters
}

func joinKeys(m map[string]bool, none string) string {
	if len(m) == 0 {
		return none
	}
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return strings.Join(ks, ", ")
}

// probeAgent asks a running agent's /readyz.
func probeAgent(addr string) string {
	if addr == "" {
		return "not checked (--health-addr empty)"
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "bad --health-addr: " + err.Error()
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	url := "http://" + net.JoinHostPort(host, port) + "/readyz"
	hc := &http.Client{Timeout: 2 * time.Second}
	resp, err := hc.Get(url)
	if err != nil {
		return "not reachable at " + url
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode == http.StatusOK {
		return "ready (" + url + ")"
	}
	return fmt.Sprintf("not ready (%s: %s)", url, strings.TrimSpace(string(body)))
}

func writeStatus(w io.Writer, st agentStatus) error {
	kv := func(k, v string) { fmt.Fprintf(w, "%-12s %s\n", k+":", v) }
	kv("pins", st.PinDir)
	if !st.Installed {
		kv("maps", "none ("+st.MapsError+")")
	} else {
		kv("services", fmt.Sprintf("%d frontends (%d refused: no backends, %d with ClientIP affinity), %d distinct backends",
			st.Services, st.Refused, st.Affinity, st.Backends))
		if st.MapsError != "" {
			kv("maps error", st.MapsError)
		}
	}
	kv("attach mode", st.AttachMode)
	if len(st.Devices) == 0 {
		kv("devices", "none (no tc programs: NodePort, ExternalIPs and LoadBalancer IPs not served)")
	}
	for _, d := range st.Devices {
		v := fmt.Sprintf("%s (%s: %s)", d.Name, d.Mode, strings.Join(d.Hooks, " "))
		if d.SNATv4 != "" || d.SNATv6 != "" {
			v += " snat " + strings.TrimSpace(d.SNATv4+" "+d.SNATv6)
		}
		if d.Note != "" {
			v += " - " + d.Note
		}
		kv("device", v)
	}
	if st.Installed {
		kv("conntrack", fmt.Sprintf("%d entries", st.Conntrack))
		var cs []string
		for _, n := range bpf.StatNames {
			if v := st.Counters[n]; v > 0 {
				cs = append(cs, fmt.Sprintf("%s=%d", n, v))
			}
		}
		if len(cs) > 0 {
			kv("packets", strings.Join(cs, " "))
		}
	}
	kv("cgroup root", st.CgroupRoot)
	kv("agent", st.Agent)
	fmt.Fprintln(w, "programs:")
	for _, p := range st.Programs {
		state := "not attached"
		if p.Attached {
			state = "attached"
		}
		line := fmt.Sprintf("  %-14s %-12s %s", p.Name, orDash(p.Mode), state)
		if p.Note != "" {
			line += " (" + p.Note + ")"
		}
		fmt.Fprintln(w, line)
	}
	fmt.Fprintln(w, "kernel:")
	for _, f := range st.Kernel {
		state := "ok"
		switch {
		case !f.Available && f.Mandatory:
			state = "MISSING (needs Linux " + f.Kernel + ")"
		case !f.Available:
			state = "missing (Linux " + f.Kernel + "): " + f.Effect
		}
		fmt.Fprintf(w, "  %-34s %s\n", f.Feature, state)
	}
	if st.ProbeError != "" {
		fmt.Fprintln(w, "  probe inconclusive:", st.ProbeError)
	}
	return nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func servicesCommand() *cli.Command {
	return &cli.Command{
		Name:   "services",
		Usage:  "print the load balancer maps: frontend -> backends (read-only)",
		Flags:  []cli.Flag{bpffsFlag, outputFlag},
		Before: podDefaults(podArgsFile),
		Action: func(c *cli.Context) error {
			u, err := output(c)
			if err != nil {
				return err
			}
			m, err := pinned.OpenMaps(c.String("bpffs"))
			if err != nil {
				if errors.Is(err, os.ErrPermission) {
					return fmt.Errorf("%w (run as root)", err)
				}
				return err
			}
			defer m.Close()
			svcs, err := pinned.Services(m)
			if err != nil {
				return err
			}
			if u.Format == "json" {
				return u.WriteJSON(servicesJSON(svcs))
			}
			rows := make([][]string, 0, len(svcs))
			for _, s := range svcs {
				aff := "-"
				if s.Affinity > 0 {
					aff = strconv.FormatInt(int64(s.Affinity/time.Second), 10) + "s"
				}
				bes := "none (refused)"
				if len(s.Backends) > 0 {
					parts := make([]string, len(s.Backends))
					for i, b := range s.Backends {
						parts[i] = b.String()
					}
					bes = strings.Join(parts, " ")
				}
				flags := "-"
				if f := s.Flags(); len(f) > 0 {
					flags = strings.Join(f, " ")
				}
				rows = append(rows, []string{s.Frontend.String(), strconv.Itoa(int(s.RevNatID)), flags, aff, strconv.Itoa(len(s.Backends)), bes})
			}
			return u.WriteTable([]string{"FRONTEND", "ID", "FLAGS", "AFFINITY", "N", "BACKENDS"}, rows)
		},
	}
}

type serviceJSON struct {
	Frontend        string   `json:"frontend"`
	Address         string   `json:"address"`
	Port            uint16   `json:"port"`
	Protocol        string   `json:"protocol"`
	RevNatID        uint32   `json:"revNatID"`
	Scope           string   `json:"scope"`
	External        bool     `json:"external,omitempty"`
	LocalOnly       bool     `json:"localOnly,omitempty"`
	SourceRanges    []string `json:"sourceRanges,omitempty"`
	Maglev          bool     `json:"maglev,omitempty"`
	AffinitySeconds int64    `json:"affinitySeconds,omitempty"`
	Backends        []string `json:"backends"`
}

func servicesJSON(svcs []lbmap.Service) []serviceJSON {
	out := make([]serviceJSON, 0, len(svcs))
	for _, s := range svcs {
		j := serviceJSON{
			Frontend: s.Frontend.String(), Address: s.Frontend.Addr.String(), Port: s.Frontend.Port,
			Protocol: s.Frontend.Proto.String(), RevNatID: s.RevNatID,
			AffinitySeconds: int64(s.Affinity / time.Second), Backends: []string{},
			Scope: s.Frontend.Scope.String(), External: s.External, LocalOnly: s.LocalOnly, Maglev: s.Maglev,
		}
		for _, p := range s.SourceRanges {
			j.SourceRanges = append(j.SourceRanges, p.String())
		}
		for _, b := range s.Backends {
			j.Backends = append(j.Backends, b.String())
		}
		out = append(out, j)
	}
	return out
}
