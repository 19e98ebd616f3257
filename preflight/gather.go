package preflight

import (
	"bufio"
	"bytes"
	_ "embed"
	"encoding/hex"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Script is the read-only POSIX sh script that gathers a host's facts.
// ParseFacts reads its output.
//
//go:embed gather.sh
var Script string

// Facts is what the gather script found on one host.
type Facts struct {
	KernelRelease   string  `json:"kernelRelease"`             // uname -r
	KernelBuild     string  `json:"kernelBuild,omitempty"`     // uname -v
	KernelSignature string  `json:"kernelSignature,omitempty"` // /proc/version_signature (Ubuntu)
	Machine         string  `json:"machine,omitempty"`         // uname -m
	Kernel          Version `json:"kernel"`                    // upstream version, see KernelVersion
	KernelParsed    bool    `json:"kernelParsed"`

	OS          string `json:"os,omitempty"` // PRETTY_NAME from /etc/os-release
	Hostname    string `json:"hostname"`     // uname -n
	UID         int    `json:"uid"`          // -1 when unknown
	MachineID   string `json:"machineID,omitempty"`
	ProductUUID string `json:"productUUID,omitempty"`

	// ConfigSource is the kernel config that was read: "/proc/config.gz",
	// "/boot/config-<release>", "/lib/modules/<release>/config", or "" when
	// none exists. Config holds the options preflight reads that are set
	// ("y", "m" or a value); an unset option is absent.
	ConfigSource string            `json:"configSource,omitempty"`
	Config       map[string]string `json:"config,omitempty"`
	// Modules: "sch_ingress"/"cls_bpf" -> builtin|loaded|available|none,
	// "" when there is no module index to look in.
	Modules     map[string]string `json:"modules,omitempty"`
	Filesystems []string          `json:"filesystems,omitempty"` // /proc/filesystems
	Mounts      []Mount           `json:"mounts,omitempty"`      // cgroup, cgroup2 and bpf mounts
	BTF         bool              `json:"btf"`                   // /sys/kernel/btf/vmlinux exists
	// Sysctls: "" absent, "?" unreadable.
	BPFJITEnable string `json:"bpfJITEnable"`
	IPForward    string `json:"ipForward"`

	Swaps           []Swap            `json:"swaps,omitempty"`
	Binaries        map[string]string `json:"binaries,omitempty"` // name -> path, "" not found
	IptablesVersion string            `json:"iptablesVersion,omitempty"`
	RuntimeSockets  []string          `json:"runtimeSockets,omitempty"`
	Listeners       []Socket          `json:"listeners,omitempty"` // listening TCP sockets

	Clock Clock `json:"clock"`

	// Probe is set by Local only: the running kernel's answers.
	Probe *ProbeReport `json:"probe,omitempty"`
}

// Mount is one line of /proc/mounts.
type Mount struct {
	Source  string `json:"source"`
	Path    string `json:"path"`
	FSType  string `json:"fstype"`
	Options string `json:"options,omitempty"`
}

// Swap is one active swap area from /proc/swaps.
type Swap struct {
	Name    string `json:"name"`
	Type    string `json:"type"`
	SizeKiB int64  `json:"sizeKiB"`
	UsedKiB int64  `json:"usedKiB"`
}

// Socket is one line of /proc/net/tcp or tcp6.
type Socket struct {
	Local  netip.AddrPort `json:"local"`
	Remote netip.AddrPort `json:"remote"`
	State  uint8          `json:"state"` // 0x0A is LISTEN
}

const tcpListen = 0x0A

// Clock brackets the host's clock: Remote was read by the script between
// LocalBefore and LocalAfter on this machine's clock.
type Clock struct {
	Valid       bool          `json:"valid"`
	Remote      time.Time     `json:"remote"`
	Resolution  time.Duration `json:"resolution"` // 1s when date lacks %N (busybox)
	LocalBefore time.Time     `json:"localBefore"`
	LocalAfter  time.Time     `json:"localAfter"`
}

// Offset bounds the host clock minus the local clock: the true offset lies in [lo, hi].
func (c Clock) Offset() (lo, hi time.Duration) {
	return c.Remote.Sub(c.LocalAfter), c.Remote.Add(c.Resolution).Sub(c.LocalBefore)
}

// ParseFacts reads the gather script's output.
func ParseFacts(out []byte) (*Facts, error) {
	f := &Facts{UID: -1, Config: map[string]string{}, Modules: map[string]string{}, Binaries: map[string]string{}}
	kv := map[string]string{}
	sections := map[string][]string{}
	begun, ended := false, false
	var section string
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		if !begun {
			begun = line == "kpfree.begin=1"
			continue
		}
		if section != "" {
			if line == "@end "+section {
				section = ""
			} else {
				sections[section] = append(sections[section], line)
			}
			continue
		}
		if name, ok := strings.CutPrefix(line, "@begin "); ok {
			section = name
			sections[name] = sections[name][:0:0]
			continue
		}
		if line == "kpfree.end=1" {
			ended = true
			break
		}
		if k, v, ok := strings.Cut(line, "="); ok {
			kv[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading gather output: %w", err)
	}
	switch {
	case !begun:
		return nil, fmt.Errorf("gather output has no kpfree.begin line (did the script run under sh?)")
	case !ended:
		return nil, fmt.Errorf("gather output is cut short (no kpfree.end line)")
	case kv["kernel.release"] == "":
		return nil, fmt.Errorf("gather output has no kernel release")
	}

	f.KernelRelease = kv["kernel.release"]
	f.KernelBuild = kv["kernel.build"]
	f.KernelSignature = kv["kernel.signature"]
	f.Machine = kv["kernel.machine"]
	f.Kernel, f.KernelParsed = KernelVersion(f.KernelRelease, f.KernelBuild, f.KernelSignature)
	f.OS = unquote(kv["os.PRETTY_NAME"])
	if f.OS == "" {
		f.OS = strings.TrimSpace(unquote(kv["os.ID"]) + " " + unquote(kv["os.VERSION_ID"]))
	}
	f.Hostname = kv["host.name"]
	if uid, err := strconv.Atoi(kv["host.uid"]); err == nil {
		f.UID = uid
	}
	f.MachineID = strings.TrimSpace(kv["host.machine-id"])
	f.ProductUUID = strings.ToLower(strings.TrimSpace(kv["host.product-uuid"]))

	f.ConfigSource = kv["kernel.config"]
	for _, l := range sections["kconfig"] {
		if k, v, ok := strings.Cut(l, "="); ok && strings.HasPrefix(k, "CONFIG_") && v != "" && v != "n" {
			f.Config[k] = unquote(v)
		}
	}
	for _, m := range []string{"sch_ingress", "cls_bpf"} {
		f.Modules[m] = kv["module."+m]
	}
	for _, l := range sections["filesystems"] {
		if fields := strings.Fields(l); len(fields) > 0 {
			f.Filesystems = append(f.Filesystems, fields[len(fields)-1])
		}
	}
	for _, l := range sections["mounts"] {
		fields := strings.Fields(l)
		if len(fields) < 3 {
			continue
		}
		m := Mount{Source: fields[0], Path: unescapeMount(fields[1]), FSType: fields[2]}
		if len(fields) > 3 {
			m.Options = fields[3]
		}
		f.Mounts = append(f.Mounts, m)
	}
	f.BTF = kv["kernel.btf"] != ""
	f.BPFJITEnable = kv["sysctl.net.core.bpf_jit_enable"]
	f.IPForward = kv["sysctl.net.ipv4.ip_forward"]
	f.Swaps = parseSwaps(sections["swaps"])
	for k, v := range kv {
		if name, ok := strings.CutPrefix(k, "bin."); ok {
			f.Binaries[name] = v
		}
	}
	f.IptablesVersion = kv["iptables.version"]
	f.RuntimeSockets = dedupeSockets(strings.Fields(kv["runtime.sockets"]))

	be := bigEndianMachine(f.Machine)
	for _, sec := range []struct {
		name string
		v6   bool
	}{{"tcp", false}, {"tcp6", true}} {
		socks, err := parseProcNetTCP(sections[sec.name], sec.v6, be)
		if err != nil {
			return nil, fmt.Errorf("/proc/net/%s: %w", sec.name, err)
		}
		for _, s := range socks {
			if s.State == tcpListen {
				f.Listeners = append(f.Listeners, s)
			}
		}
	}

	if t, res, ok := parseEpoch(kv["time.now"]); ok {
		f.Clock = Clock{Valid: true, Remote: t, Resolution: res}
	}
	return f, nil
}

func unquote(s string) string {
	if len(s) >= 2 && (s[0] == '"' || s[0] == '\'') && s[len(s)-1] == s[0] {
		return s[1 : len(s)-1]
	}
	return s
}

// unescapeMount undoes the octal escapes of /proc/mounts (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func parseSwaps(lines []string) []Swap {
	var out []Swap
	for _, l := range lines {
		fields := strings.Fields(l)
		if len(fields) < 4 || fields[0] == "Filename" {
			continue
		}
		s := Swap{Name: unescapeMount(fields[0]), Type: fields[1]}
		s.SizeKiB, _ = strconv.ParseInt(fields[2], 10, 64)
		s.UsedKiB, _ = strconv.ParseInt(fields[3], 10, 64)
		out = append(out, s)
	}
	return out
}

// dedupeSockets folds /var/run/X into /run/X (the same file on every modern
// distribution) and drops repeats.
func dedupeSockets(in []string) []string {
	var out []string
	seen := map[string]bool{}
	for _, s := range in {
		n := s
		if rest, ok := strings.CutPrefix(s, "/var/run/"); ok {
			n = "/run/" + rest
		}
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	return out
}

// parseEpoch reads `date +%s.%N`; busybox may print a literal "%N".
func parseEpoch(s string) (time.Time, time.Duration, bool) {
	secStr, frac, _ := strings.Cut(strings.TrimSpace(s), ".")
	sec, err := strconv.ParseInt(secStr, 10, 64)
	if err != nil || sec <= 0 {
		return time.Time{}, 0, false
	}
	if len(frac) == 0 || len(frac) > 9 || strings.Trim(frac, "0123456789") != "" {
		return time.Unix(sec, 0), time.Second, true
	}
	ns, _ := strconv.ParseInt((frac + "000000000")[:9], 10, 64)
	return time.Unix(sec, ns), time.Microsecond, true
}

func bigEndianMachine(m string) bool {
	switch m {
	case "s390x", "s390", "ppc64", "ppc", "mips", "mips64", "sparc64", "m68k", "parisc", "parisc64":
		return true
	}
	return false
}

// parseProcNetTCP parses lines of /proc/net/tcp (v6 false) or /proc/net/tcp6.
// The header line, if present, is skipped. The kernel prints each 32-bit word
// of an address as a native-endian hex number, so the host's byte order
// matters; ports are printed in host order and need no swapping.
func parseProcNetTCP(lines []string, v6, bigEndian bool) ([]Socket, error) {
	var out []Socket
	for _, l := range lines {
		fields := strings.Fields(l)
		if len(fields) < 4 || fields[0] == "sl" {
			continue
		}
		if !strings.HasSuffix(fields[0], ":") {
			return nil, fmt.Errorf("unexpected line %q", l)
		}
		local, err := parseHexAddrPort(fields[1], v6, bigEndian)
		if err != nil {
			return nil, fmt.Errorf("local address in %q: %w", l, err)
		}
		remote, err := parseHexAddrPort(fields[2], v6, bigEndian)
		if err != nil {
			return nil, fmt.Errorf("remote address in %q: %w", l, err)
		}
		st, err := strconv.ParseUint(fields[3], 16, 8)
		if err != nil {
			return nil, fmt.Errorf("state in %q: %w", l, err)
		}
		out = append(out, Socket{Local: local, Remote: remote, State: uint8(st)})
	}
	return out, nil
}

func parseHexAddrPort(s string, v6, bigEndian bool) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("no port in %q", s)
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("port %q: %w", p, err)
	}
	want := 8
	if v6 {
		want = 32
	}
	if len(a) != want {
		return netip.AddrPort{}, fmt.Errorf("address %q: want %d hex digits", a, want)
	}
	raw, err := hex.DecodeString(a)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("address %q: %w", a, err)
	}
	if !bigEndian { // each 32-bit word was printed as a little-endian number
		for i := 0; i < len(raw); i += 4 {
			raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
		}
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}
