package preflight

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/kpfree/kpfree/internal/inventory"
)

// TestGatherScriptHere runs the real script on this machine under every POSIX
// shell available (no root needed) and parses its output.
func TestGatherScriptHere(t *testing.T) {
	release, err := exec.Command("uname", "-r").Output()
	if err != nil {
		t.Skipf("uname: %v", err)
	}
	hostname, _ := os.Hostname()

	// A listener the parser must find in /proc/net/tcp.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)

	shells := [][]string{{"sh"}, {"dash"}, {"bash", "--posix"}, {"busybox", "sh"}}
	ran := 0
	for _, sh := range shells {
		if _, err := exec.LookPath(sh[0]); err != nil {
			continue
		}
		t.Run(strings.Join(sh, " "), func(t *testing.T) {
			ran++
			var stdout, stderr bytes.Buffer
			cmd := exec.Command(sh[0], append(sh[1:], "-c", Script)...)
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			if err := cmd.Run(); err != nil {
				t.Fatalf("script: %v\n%s", err, stderr.String())
			}
			if stderr.Len() > 0 {
				t.Errorf("script wrote to stderr:\n%s", stderr.String())
			}
			f, err := ParseFacts(stdout.Bytes())
			if err != nil {
				t.Fatalf("ParseFacts: %v\n%s", err, stdout.String())
			}
			if f.KernelRelease != strings.TrimSpace(string(release)) || !f.KernelParsed || f.Kernel.Major < 3 {
				t.Errorf("kernel %q (%s), uname -r says %q", f.KernelRelease, f.Kernel, release)
			}
			if f.Hostname == "" || (hostname != "" && f.Hostname != hostname) {
				t.Errorf("hostname %q, os.Hostname %q", f.Hostname, hostname)
			}
			if !f.Clock.Valid || time.Since(f.Clock.Remote).Abs() > time.Minute {
				t.Errorf("clock %+v", f.Clock)
			}
			found := false
			for _, l := range f.Listeners {
				if l.Local == netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), port) {
					found = true
				}
			}
			if !found {
				t.Errorf("listener 127.0.0.1:%d not found in %v", port, f.Listeners)
			}
			if len(f.Filesystems) == 0 {
				t.Error("no filesystems")
			}
			t.Logf("kernel %s (%s), config %q, %d mounts, %d listeners, cgroup2 at %q",
				f.KernelRelease, f.Kernel, f.ConfigSource, len(f.Mounts), len(f.Listeners), f.cgroup2Path())
		})
	}
	if ran == 0 {
		t.Skip("no POSIX shell found")
	}
}

// TestLocal runs Local on this machine. As root it probes the kernel; as
// anyone else it must say it did not.
func TestLocal(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	rep, err := Local(ctx, inventory.RoleWorker, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Hosts) != 1 || rep.Hosts[0].Facts == nil {
		t.Fatalf("hosts %+v", rep.Hosts)
	}
	byCheck := map[string]Finding{}
	for _, f := range rep.Findings {
		byCheck[f.Check] = f
		t.Logf("%-28s %-4s %-8s %s", f.Check, f.Status, f.Evidence, f.Seen)
	}
	probe, ok := byCheck[CheckProbe]
	if !ok {
		t.Fatal("no bpf.probe finding")
	}
	if os.Geteuid() != 0 {
		if probe.Status != Warn || !strings.Contains(probe.Seen, "not root") {
			t.Errorf("non-root probe finding %+v", probe)
		}
		return
	}
	if !rep.Hosts[0].Facts.Probe.Ran {
		t.Fatalf("root, but probes did not run: %+v", rep.Hosts[0].Facts.Probe)
	}
	// Where the probe was conclusive, the verdict says so.
	if r := rep.Hosts[0].Facts.Probe.Results[ProbeConnect4]; r.Err == "" {
		if byCheck[CheckConnect].Evidence != EvidenceProbed {
			t.Errorf("connect evidence %q, want probed", byCheck[CheckConnect].Evidence)
		}
	}
	if f := rep.Hosts[0].Facts; f.KernelParsed && f.Kernel.AtLeast(ver(6, 6, 0)) {
		if r := f.Probe.Results[ProbeTCX]; r.Err == "" && !r.Supported {
			t.Errorf("kernel %s but tcx probe says unsupported", f.Kernel)
		}
	}
}

func TestParseProcNetTCP(t *testing.T) {
	// Real lines from an x86_64 host (header included, as in the file).
	v4 := []string{
		"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
		"   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1682 1 00000000132f2eff 100 0 0 10 0",
		"   1: 0100007F:094B 00000000:0000 0A 00000000:00000000 00:00000000 00000000   997        0 20311 1 0000000000000000 100 0 0 10 0",
		"   2: 020200C0:90B8 507100CB:01BB 06 00000000:00000000 03:0000022E 00000000     0        0 0 3 0000000059cada06",
	}
	got, err := parseProcNetTCP(v4, false, false)
	if err != nil {
		t.Fatal(err)
	}
	want := []Socket{
		{Local: netip.MustParseAddrPort("0.0.0.0:2024"), Remote: netip.MustParseAddrPort("0.0.0.0:0"), State: 0x0A},
		{Local: netip.MustParseAddrPort("127.0.0.1:2379"), Remote: netip.MustParseAddrPort("0.0.0.0:0"), State: 0x0A},
		{Local: netip.MustParseAddrPort("192.0.2.2:37048"), Remote: netip.MustParseAddrPort("203.0.113.80:443"), State: 0x06},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d sockets: %v", len(got), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("socket %d: %v, want %v", i, got[i], want[i])
		}
	}

	v6 := []string{
		"  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
		"   0: 00000000000000000000000000000000:192B 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 24512 1 0000000000000000 100 0 0 10 0",
		"   1: 00000000000000000000000001000000:0CEA 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 24519 1 0000000000000000 100 0 0 10 0",
		"   2: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 99 1 0000000000000000 20 4 30 10 -1",
		"   3: B80D0120000000000000000001000000:0016 B80D0120000000000000000002000000:D431 01 00000000:00000000 02:000A7D5F 00000000     0        0 77 2 0000000000000000 20 4 31 10 -1",
	}
	got, err = parseProcNetTCP(v6, true, false)
	if err != nil {
		t.Fatal(err)
	}
	want = []Socket{
		{Local: netip.MustParseAddrPort("[::]:6443"), Remote: netip.MustParseAddrPort("[::]:0"), State: 0x0A},
		{Local: netip.MustParseAddrPort("[::1]:3306"), Remote: netip.MustParseAddrPort("[::]:0"), State: 0x0A},
		{Local: netip.MustParseAddrPort("[::ffff:127.0.0.1]:8080"), Remote: netip.MustParseAddrPort("[::ffff:127.0.0.1]:50000"), State: 0x01},
		{Local: netip.MustParseAddrPort("[2001:db8::1]:22"), Remote: netip.MustParseAddrPort("[2001:db8::2]:54321"), State: 0x01},
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("v6 socket %d: %v, want %v", i, got[i], want[i])
		}
	}

	// s390x prints addresses in network order.
	got, err = parseProcNetTCP([]string{"   0: 7F000001:094B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0"}, false, true)
	if err != nil || got[0].Local != netip.MustParseAddrPort("127.0.0.1:2379") {
		t.Errorf("big endian: %v, %v", got, err)
	}

	for _, bad := range []string{
		"   0: 0100007F 00000000:0000 0A",
		"   0: 0100007F:XYZ 00000000:0000 0A",
		"   0: 01007F:0947 00000000:0000 0A",
		"   0: 0100007F:094B 00000000:0000 ZZ",
		"garbage line here x",
	} {
		if _, err := parseProcNetTCP([]string{bad}, false, false); err == nil {
			t.Errorf("no error for %q", bad)
		}
	}
}

func TestParseFactsRobust(t *testing.T) {
	out := goodHost("h").render()
	for name, text := range map[string]string{
		"empty":      "",
		"no begin":   strings.Replace(out, "kpfree.begin=1\n", "", 1),
		"no end":     strings.Replace(out, "kpfree.end=1\n", "", 1),
		"no release": strings.Replace(out, "kernel.release=6.1.0-28-cloud-amd64\n", "", 1),
	} {
		if _, err := ParseFacts([]byte(text)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	// CRLF line ends (a PTY in between) and a mount path with a space.
	s := goodHost("h")
	s.mounts = append(s.mounts, `bpf /run/my\040bpf bpf rw 0 0`)
	f, err := ParseFacts([]byte(strings.ReplaceAll(s.render(), "\n", "\r\n")))
	if err != nil {
		t.Fatal(err)
	}
	if f.Hostname != "h" || f.OS != "Debian GNU/Linux 12 (bookworm)" || f.Mounts[2].Path != "/run/my bpf" ||
		f.Config["CONFIG_NET_CLS_BPF"] != "m" || f.Binaries["kubeadm"] != "/usr/bin/kubeadm" {
		t.Errorf("facts %+v", f)
	}
}

func TestParseEpoch(t *testing.T) {
	for in, want := range map[string]struct {
		ok  bool
		res time.Duration
		ns  int
	}{
		"1795600140.513339600": {true, time.Microsecond, 513339600},
		"1795600140.%N":        {true, time.Second, 0},
		"1795600140.N":         {true, time.Second, 0},
		"1795600140":           {true, time.Second, 0},
		"":                     {false, 0, 0},
		"%s.%N":                {false, 0, 0},
	} {
		tm, res, ok := parseEpoch(in)
		if ok != want.ok || res != want.res || (ok && (tm.Unix() != 1795600140 || tm.Nanosecond() != want.ns)) {
			t.Errorf("parseEpoch(%q) = %v, %v, %v", in, tm, res, ok)
		}
	}
}

func TestScriptIsReadOnly(t *testing.T) {
	// A guard against edits: nothing in the script may write, mount, load or restart.
	for _, bad := range []string{"modprobe", "insmod", "mount -", "sysctl -w", "swapoff", "systemctl", " > /", ">/", "rm ", "tee ", "echo 1 >"} {
		for _, line := range strings.Split(Script, "\n") {
			if strings.HasPrefix(strings.TrimSpace(line), "#") {
				continue
			}
			if strings.Contains(line, bad) && !strings.Contains(line, "/dev/null") {
				t.Errorf("script line %q contains %q", line, bad)
			}
		}
	}
}
