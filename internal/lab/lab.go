// Package lab builds "lab nodes" on this machine: one network namespace, one
// private mount + UTS namespace and one real OpenSSH sshd per node, so that
// kpfree can be rehearsed and tested against real SSH hosts without VMs.
//
// Layout of a lab with prefix "kpfree" (the default) and N nodes:
//
//	root netns   bridge kpfree-br0 198.18.0.1/24 (no NAT, no forwarding change)
//	             veth kpfree-nodeI <-> eth0 in netns kpfree-nodeI (198.18.0.(10+I)/24)
//	cgroup2      <cgroup2 mount>/kpfree-lab/nodeI holds every process of node I
//	per node     a "holder" process (sleep renamed kpfree-lab-holder:kpfree-nodeI)
//	             owns the node's mount + UTS namespaces: overlays on /etc and /run
//	             (more with Options.ExtraOverlays), private /root and /home,
//	             hostname nodeI, its own /etc/hosts and /etc/machine-id and the
//	             users kpadmin (passwordless sudo) and kpnopw (sudo needs a password)
//	             written into the overlay only; sshd runs in the same namespaces.
//	Dir          state.json, hosts.yaml, ssh/{id_ed25519,known_hosts,authorized_keys},
//	             nodes/nodeI/{overlay upper dirs, host key, sshd_config, logs}
//
// With Options.Kubernetes the nodes can run kubeadm (kubernetes.go): more
// overlays, their own containerd, kubeadm, kubelet and kubectl, a systemctl
// stand-in, the images imported, cgroups <prefix>-lab/nodeI in every cgroup
// v1 hierarchy too; SetupPodNetwork gives them a pod network for tests.
//
// Nothing the host already has is changed: the host's /etc, /root and /home,
// its sysctls, firewall rules, routes and interfaces stay as they were; the lab
// adds only its bridge (with an address inside 198.18.0.0/15), its veths, its
// netns files and its cgroups, and Down removes them.
//
// Up needs root, iproute2 (ip), util-linux (nsenter, unshare, mount), bash,
// coreutils and openssh-server (/usr/sbin/sshd), and a cgroup2 hierarchy.
package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// DefaultDir is where the lab keeps its state when neither Options.Dir nor
	// $KPFREE_LAB_DIR says otherwise.
	DefaultDir = "/var/lib/kpfree-lab"
	// DirEnv names the environment variable that overrides DefaultDir.
	DirEnv = "KPFREE_LAB_DIR"
	// DefaultPrefix prefixes the names of the netns, links and cgroups of a lab.
	DefaultPrefix = "kpfree"
	// DefaultSubnet is the lab network: the bridge gets .1, node I gets .(10+I).
	DefaultSubnet = "198.18.0.0/24"
	// DefaultKubernetesVersion is written to hosts.yaml.
	DefaultKubernetesVersion = "v1.34.4"

	// AdminUser is a non-root user with passwordless sudo on every node.
	AdminUser = "kpadmin"
	// NoPasswordUser is a non-root user whose sudo asks for a password (which
	// it does not have), for tests of "sudo refused".
	NoPasswordUser = "kpnopw"

	// HolderMarker starts argv[0] of every holder process:
	// "kpfree-lab-holder:<netns name>".
	HolderMarker = "kpfree-lab-holder:"

	stateFile   = "state.json"
	stateFormat = 1
	sshdPath    = "/usr/sbin/sshd"
)

// BaseOverlays are the directories every node overlays: /etc carries the
// node's users, hostname, hosts and machine-id, /run its sshd privilege
// separation directory, pid files and sudo timestamps.
var BaseOverlays = []string{"/etc", "/run"}

// allowedRange is the only address range the lab may put on the host.
var allowedRange = netip.MustParsePrefix("198.18.0.0/15")

// Options says what lab Up builds. Zero values take the defaults; when a lab
// already exists in Dir, zero values take the lab's recorded settings and
// non-zero ones must match them.
type Options struct {
	// Nodes is how many nodes the lab has (node1..nodeN), at least 1.
	Nodes int
	// Dir is the state directory: DefaultDir, or $KPFREE_LAB_DIR when set.
	// It must not lie under /etc, nor under /root or /home, which the nodes
	// see replaced by their own. Under an overlaid directory (the default
	// dir with /var/lib overlaid) the nodes see the real dir.
	Dir string
	// Prefix names the lab's netns (<prefix>-nodeI), veths (<prefix>-nodeI),
	// bridge (<prefix>-br0) and cgroup (<prefix>-lab). Default "kpfree".
	// Tests use their own prefix so they never collide with a user's lab.
	Prefix string
	// Bridge is the bridge's name, default <prefix>-br0.
	Bridge string
	// Subnet is the lab network, inside 198.18.0.0/15; default 198.18.0.0/24.
	Subnet netip.Prefix
	// ExtraOverlays are directories overlaid in every node on top of
	// BaseOverlays, e.g. "/var/lib" for kubeadm, kubelet and containerd.
	ExtraOverlays []string
	// CgroupRoot is the cgroup2 mount point; default: /sys/fs/cgroup/unified
	// on a hybrid layout, else /sys/fs/cgroup.
	CgroupRoot string
	// KubernetesVersion is written to hosts.yaml; default v1.34.4.
	KubernetesVersion string
	// Kubernetes makes nodes that can run kubeadm (see KubernetesOverlays,
	// KubernetesBinaries and docs/lab.md): their own containerd, kubelet,
	// systemctl stand-in and cgroups in every hierarchy, images imported.
	Kubernetes bool
	// K8sBinDir holds kubeadm, kubelet and kubectl for Kubernetes nodes;
	// default DefaultK8sBinDir(KubernetesVersion).
	K8sBinDir string
	// Images is the docker-archive tarball imported into every Kubernetes
	// node's containerd; default DefaultImages(KubernetesVersion). BuildImages
	// writes it.
	Images string
	// Parallel bounds how many nodes are built at once; default 8.
	Parallel int
	// Logf, when set, receives one line per step ("node3: sshd ready").
	Logf func(format string, args ...any)
}

// State is a lab as recorded in Dir/state.json.
type State struct {
	Format            int          `json:"format"`
	Dir               string       `json:"dir"`
	Prefix            string       `json:"prefix"`
	Bridge            string       `json:"bridge"`
	Subnet            netip.Prefix `json:"subnet"`
	Gateway           netip.Addr   `json:"gateway"`
	CgroupRoot        string       `json:"cgroupRoot"`
	Overlays          []string     `json:"overlays"`
	KubernetesVersion string       `json:"kubernetesVersion"`
	// Kubernetes, K8sBinDir and Images: see Options. CgroupV1 lists the
	// cgroup v1 hierarchies in which Kubernetes nodes have cgroups too.
	Kubernetes bool     `json:"kubernetes,omitempty"`
	K8sBinDir  string   `json:"k8sBinDir,omitempty"`
	Images     string   `json:"images,omitempty"`
	CgroupV1   []string `json:"cgroupV1,omitempty"`
	Nodes      []*Node  `json:"nodes"`

	mu   sync.Mutex
	logf func(format string, args ...any)
}

// Node is one lab node.
type Node struct {
	Name    string     `json:"name"`
	Index   int        `json:"index"`
	Address netip.Addr `json:"address"`
	// NetNS is the path of the node's network namespace, /run/netns/<prefix>-nodeI.
	NetNS string `json:"netns"`
	// Veth is the root-namespace end of the node's veth (eth0 in the node).
	Veth string `json:"veth"`
	// Cgroup is the node's cgroup2 directory.
	Cgroup string `json:"cgroup"`
	// HolderPID owns the node's mount and UTS namespaces; 0 when not running.
	HolderPID int `json:"holderPID"`
	// SSHDPID is the node's sshd listener; 0 when stopped.
	SSHDPID int `json:"sshdPID"`
	// HostKey is the sshd host public key in authorized_keys format.
	HostKey string `json:"hostKey"`
}

// ResolveDir returns dir, else $KPFREE_LAB_DIR, else DefaultDir.
func ResolveDir(dir string) string {
	if dir != "" {
		return dir
	}
	if d := os.Getenv(DirEnv); d != "" {
		return d
	}
	return DefaultDir
}

// Load reads the state of the lab in dir ("" means ResolveDir("")).
// It returns an error wrapping fs.ErrNotExist when there is no lab.
func Load(dir string) (*State, error) {
	dir, err := filepath.Abs(ResolveDir(dir))
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, fmt.Errorf("no lab in %s: %w", dir, err)
	}
	s := &State{}
	if err := json.Unmarshal(data, s); err != nil {
		return nil, fmt.Errorf("lab state %s: %w", filepath.Join(dir, stateFile), err)
	}
	if s.Format != stateFormat {
		return nil, fmt.Errorf("lab state %s: format %d, want %d", filepath.Join(dir, stateFile), s.Format, stateFormat)
	}
	s.Dir = dir
	return s, nil
}

// Node returns the node called name (e.g. "node2"), or nil.
func (s *State) Node(name string) *Node {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.Nodes {
		if n.Name == name {
			c := *n
			return &c
		}
	}
	return nil
}

// NodeNames lists the nodes in order.
func (s *State) NodeNames() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	names := make([]string, len(s.Nodes))
	for i, n := range s.Nodes {
		names[i] = n.Name
	}
	return names
}

// InventoryFile is Dir/hosts.yaml.
func (s *State) InventoryFile() string { return filepath.Join(s.Dir, "hosts.yaml") }

// IdentityFile is the private key authorized for root, kpadmin and kpnopw on every node.
func (s *State) IdentityFile() string { return filepath.Join(s.Dir, "ssh", "id_ed25519") }

// KnownHostsFile lists every node's host key by address.
func (s *State) KnownHostsFile() string { return filepath.Join(s.Dir, "ssh", "known_hosts") }

func (s *State) nodeDir(name string) string { return filepath.Join(s.Dir, "nodes", name) }

func (s *State) cgroupParent() string { return filepath.Join(s.CgroupRoot, s.Prefix+"-lab") }

func (s *State) node(name string) (*Node, error) {
	for _, n := range s.Nodes {
		if n.Name == name {
			return n, nil
		}
	}
	return nil, fmt.Errorf("lab %s has no node %q", s.Dir, name)
}

func (s *State) log(format string, args ...any) {
	if s.logf != nil {
		s.logf(format, args...)
	}
}

// save writes state.json atomically. The caller holds s.mu.
func (s *State) save() error {
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(s.Dir, stateFile), append(data, '\n'), 0o644)
}

func (s *State) saveLocked() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.save()
}

var prefixRE = regexp.MustCompile(`^[a-z][a-z0-9]*$`)

// normalize fills in defaults and checks the options that do not depend on an
// existing lab.
func (o Options) normalize() (Options, error) {
	if o.Nodes < 1 {
		return o, fmt.Errorf("lab needs at least 1 node, got %d", o.Nodes)
	}
	dir, err := filepath.Abs(ResolveDir(o.Dir))
	if err != nil {
		return o, err
	}
	o.Dir = dir
	if o.Parallel <= 0 {
		o.Parallel = 8
	}
	if o.Prefix != "" && !prefixRE.MatchString(o.Prefix) {
		return o, fmt.Errorf("lab prefix %q: use lower-case letters and digits, starting with a letter", o.Prefix)
	}
	if o.Subnet.IsValid() {
		o.Subnet = o.Subnet.Masked()
		if !o.Subnet.Addr().Is4() || o.Subnet.Bits() < allowedRange.Bits() || !allowedRange.Contains(o.Subnet.Addr()) {
			return o, fmt.Errorf("lab subnet %s must lie inside %s", o.Subnet, allowedRange)
		}
		if o.Subnet.Bits() > 27 {
			return o, fmt.Errorf("lab subnet %s is too small (at most /27)", o.Subnet)
		}
	}
	for i, d := range o.ExtraOverlays {
		c := filepath.Clean(d)
		if !filepath.IsAbs(c) || c == "/" {
			return o, fmt.Errorf("overlay %q: want an absolute directory other than /", d)
		}
		for _, bad := range []string{"/proc", "/sys", "/dev", "/root", "/home"} {
			if within(c, bad) {
				return o, fmt.Errorf("overlay %q: %s cannot be overlaid", d, bad)
			}
		}
		if fi, err := os.Stat(c); err != nil || !fi.IsDir() {
			return o, fmt.Errorf("overlay %q: not a directory on this machine", d)
		}
		o.ExtraOverlays[i] = c
	}
	if o.K8sBinDir != "" {
		if o.K8sBinDir, err = filepath.Abs(o.K8sBinDir); err != nil {
			return o, err
		}
	}
	if o.Images != "" {
		if o.Images, err = filepath.Abs(o.Images); err != nil {
			return o, err
		}
	}
	if strings.ContainsAny(o.Dir, " \t\n,:\"'\\") {
		return o, fmt.Errorf("lab dir %q: no spaces, quotes, commas or colons please (they end up in mount options and sshd_config)", o.Dir)
	}
	return o, nil
}

// newState builds the state of a lab that does not exist yet.
func newState(o Options) (*State, error) {
	s := &State{
		Format:            stateFormat,
		Dir:               o.Dir,
		Prefix:            o.Prefix,
		Bridge:            o.Bridge,
		Subnet:            o.Subnet,
		CgroupRoot:        o.CgroupRoot,
		KubernetesVersion: o.KubernetesVersion,
		Overlays:          overlays(o.Kubernetes, o.ExtraOverlays),
		Kubernetes:        o.Kubernetes,
		K8sBinDir:         o.K8sBinDir,
		Images:            o.Images,
	}
	if s.Prefix == "" {
		s.Prefix = DefaultPrefix
	}
	if s.Bridge == "" {
		s.Bridge = s.Prefix + "-br0"
	}
	if !s.Subnet.IsValid() {
		s.Subnet = netip.MustParsePrefix(DefaultSubnet)
	}
	if s.KubernetesVersion == "" {
		s.KubernetesVersion = DefaultKubernetesVersion
	}
	if s.Kubernetes {
		if s.K8sBinDir == "" {
			s.K8sBinDir = DefaultK8sBinDir(s.KubernetesVersion)
		}
		if s.Images == "" {
			s.Images = DefaultImages(s.KubernetesVersion)
		}
		roots, err := cgroupV1Roots()
		if err != nil {
			return nil, err
		}
		s.CgroupV1 = roots
	}
	if s.CgroupRoot == "" {
		root, err := findCgroup2()
		if err != nil {
			return nil, err
		}
		s.CgroupRoot = root
	}
	s.Gateway = s.Subnet.Addr().Next()
	if err := s.checkNames(o.Nodes); err != nil {
		return nil, err
	}
	if within(s.Dir, "/etc") {
		return nil, fmt.Errorf("lab dir %s lies under /etc: the lab leaves the host's /etc alone, choose another dir", s.Dir)
	}
	for _, d := range []string{"/root", "/home"} {
		if within(s.Dir, d) {
			return nil, fmt.Errorf("lab dir %s lies under %s, which every node replaces with its own: choose another dir", s.Dir, d)
		}
	}
	return s, nil
}

// checkNames checks that a lab of n nodes fits: link names, addresses.
func (s *State) checkNames(n int) error {
	if len(s.Bridge) > unix.IFNAMSIZ-1 {
		return fmt.Errorf("bridge name %q is longer than %d characters", s.Bridge, unix.IFNAMSIZ-1)
	}
	if v := s.vethName(nodeName(n)); len(v) > unix.IFNAMSIZ-1 {
		return fmt.Errorf("prefix %q is too long for %d nodes: link name %q is longer than %d characters", s.Prefix, n, v, unix.IFNAMSIZ-1)
	}
	if _, err := s.nodeAddr(n); err != nil {
		return err
	}
	return nil
}

// reconcile checks that the options asked of an existing lab match it.
func (s *State) reconcile(o Options) error {
	var diffs []string
	if o.Prefix != "" && o.Prefix != s.Prefix {
		diffs = append(diffs, fmt.Sprintf("prefix %q (lab has %q)", o.Prefix, s.Prefix))
	}
	if o.Bridge != "" && o.Bridge != s.Bridge {
		diffs = append(diffs, fmt.Sprintf("bridge %q (lab has %q)", o.Bridge, s.Bridge))
	}
	if o.Subnet.IsValid() && o.Subnet != s.Subnet {
		diffs = append(diffs, fmt.Sprintf("subnet %s (lab has %s)", o.Subnet, s.Subnet))
	}
	if o.CgroupRoot != "" && o.CgroupRoot != s.CgroupRoot {
		diffs = append(diffs, fmt.Sprintf("cgroup root %s (lab has %s)", o.CgroupRoot, s.CgroupRoot))
	}
	if o.KubernetesVersion != "" && o.KubernetesVersion != s.KubernetesVersion {
		diffs = append(diffs, fmt.Sprintf("Kubernetes version %s (lab has %s)", o.KubernetesVersion, s.KubernetesVersion))
	}
	if o.Kubernetes && !s.Kubernetes {
		diffs = append(diffs, "Kubernetes nodes (the lab's nodes are not)")
	}
	if o.K8sBinDir != "" && o.K8sBinDir != s.K8sBinDir {
		diffs = append(diffs, fmt.Sprintf("Kubernetes binaries from %s (lab has %q)", o.K8sBinDir, s.K8sBinDir))
	}
	if o.Images != "" && o.Images != s.Images {
		diffs = append(diffs, fmt.Sprintf("images from %s (lab has %q)", o.Images, s.Images))
	}
	if len(o.ExtraOverlays) > 0 {
		want := overlays(s.Kubernetes, o.ExtraOverlays)
		if strings.Join(want, ",") != strings.Join(s.Overlays, ",") {
			diffs = append(diffs, fmt.Sprintf("overlays %v (lab has %v)", want, s.Overlays))
		}
	}
	if len(diffs) > 0 {
		return fmt.Errorf("a lab with other settings exists in %s: asked for %s; run lab down first", s.Dir, strings.Join(diffs, ", "))
	}
	if o.Nodes < len(s.Nodes) {
		return fmt.Errorf("the lab in %s has %d nodes; shrinking to %d is not supported: run lab down first", s.Dir, len(s.Nodes), o.Nodes)
	}
	return s.checkNames(o.Nodes)
}

// overlays lists a node's overlaid dirs: BaseOverlays, KubernetesOverlays
// (those this machine has) for Kubernetes nodes, then extra, each once.
func overlays(kubernetes bool, extra []string) []string {
	all := append([]string{}, BaseOverlays...)
	if kubernetes {
		for _, d := range KubernetesOverlays {
			if fi, err := os.Stat(d); err == nil && fi.IsDir() {
				all = append(all, d)
			}
		}
	}
	for _, d := range extra {
		if !slices.Contains(all, d) {
			all = append(all, d)
		}
	}
	return all
}

func nodeName(i int) string { return fmt.Sprintf("node%d", i) }

func (s *State) netnsName(node string) string { return s.Prefix + "-" + node }
func (s *State) vethName(node string) string  { return s.Prefix + "-" + node }

// nodeAddr is the address of node i: the subnet's base + 10 + i. The
// gateway takes .1, .2-.10 stay free for other lab services.
func (s *State) nodeAddr(i int) (netip.Addr, error) {
	room := 1<<(32-s.Subnet.Bits()) - 12 // network, .1-.10, broadcast
	if i < 1 || i > room {
		return netip.Addr{}, fmt.Errorf("subnet %s has room for %d nodes, not %d", s.Subnet, room, i)
	}
	a := s.Subnet.Addr()
	for range 10 + i {
		a = a.Next()
	}
	return a, nil
}

// within reports whether path is dir or lies under it.
func within(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// lockDir takes an exclusive flock on dir, so that two Up/Down on one lab
// run one after the other. The returned function releases it.
func lockDir(ctx context.Context, dir string) (func(), error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: another lab up/down is running: %w", dir, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// SetLogf sets where progress lines of this state's operations go.
func (s *State) SetLogf(f func(format string, args ...any)) { s.logf = f }
