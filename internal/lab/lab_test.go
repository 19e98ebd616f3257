package lab

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kpfree/kpfree/internal/inventory"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// testState is a lab state as Up would build it, without touching the host.
func testState(t *testing.T, nodes int) *State {
	t.Helper()
	s := &State{
		Format: stateFormat, Dir: "/var/lib/kpfree-lab", Prefix: "kpfree", Bridge: "kpfree-br0",
		Subnet: netip.MustParsePrefix("198.18.0.0/24"), Gateway: netip.MustParseAddr("198.18.0.1"),
		CgroupRoot: "/sys/fs/cgroup/unified", Overlays: BaseOverlays, KubernetesVersion: DefaultKubernetesVersion,
	}
	dir := t.TempDir()
	for i := 1; i <= nodes; i++ {
		addr, err := s.nodeAddr(i)
		if err != nil {
			t.Fatal(err)
		}
		pub, err := genKey(filepath.Join(dir, nodeName(i)), "root@"+nodeName(i))
		if err != nil {
			t.Fatal(err)
		}
		s.Nodes = append(s.Nodes, &Node{Name: nodeName(i), Index: i, Address: addr, HostKey: pub})
	}
	return s
}

func TestNodeAddr(t *testing.T) {
	s := &State{Subnet: netip.MustParsePrefix("198.19.7.0/24")}
	for i, want := range map[int]string{1: "198.19.7.11", 2: "198.19.7.12", 244: "198.19.7.254"} {
		got, err := s.nodeAddr(i)
		if err != nil || got.String() != want {
			t.Errorf("nodeAddr(%d) = %v, %v; want %s", i, got, err, want)
		}
	}
	if _, err := s.nodeAddr(245); err == nil {
		t.Error("nodeAddr(245) in a /24: want an error (.255 is broadcast)")
	}
}

func TestOptionsNormalize(t *testing.T) {
	t.Setenv(DirEnv, "")
	o, err := Options{Nodes: 3}.normalize()
	if err != nil {
		t.Fatal(err)
	}
	if o.Dir != DefaultDir || o.Parallel != 8 {
		t.Errorf("defaults: dir %q parallel %d", o.Dir, o.Parallel)
	}
	t.Setenv(DirEnv, "/srv/lab")
	if o, _ := (Options{Nodes: 1}).normalize(); o.Dir != "/srv/lab" {
		t.Errorf("$%s not used: %q", DirEnv, o.Dir)
	}
	bad := map[string]Options{
		"no nodes":          {},
		"subnet outside":    {Nodes: 1, Subnet: netip.MustParsePrefix("10.0.0.0/24")},
		"subnet too wide":   {Nodes: 1, Subnet: netip.MustParsePrefix("198.18.0.0/14")},
		"subnet too narrow": {Nodes: 1, Subnet: netip.MustParsePrefix("198.19.0.0/28")},
		"bad prefix":        {Nodes: 1, Prefix: "Kp-1"},
		"overlay /":         {Nodes: 1, ExtraOverlays: []string{"/"}},
		"overlay /proc":     {Nodes: 1, ExtraOverlays: []string{"/proc/sys"}},
		"dir with comma":    {Nodes: 1, Dir: "/tmp/a,b"},
	}
	for name, o := range bad {
		if _, err := o.normalize(); err == nil {
			t.Errorf("%s: want an error", name)
		}
	}
}

func TestNewStateChecks(t *testing.T) {
	root := "/sys/fs/cgroup/unified" // not read: CgroupRoot is given
	if _, err := newState(Options{Nodes: 2, Dir: "/var/lib/kpfree-lab", CgroupRoot: root}); err != nil {
		t.Errorf("default layout: %v", err)
	}
	for _, dir := range []string{"/etc/kpfree-lab", "/root/lab", "/home/me/lab"} {
		if _, err := newState(Options{Nodes: 1, Dir: dir, CgroupRoot: root}); err == nil {
			t.Errorf("dir %s: want an error (the nodes do not see it)", dir)
		}
	}
	if _, err := newState(Options{Nodes: 100, Dir: "/srv/lab", Prefix: "kpfreelab", CgroupRoot: root}); err == nil {
		t.Error("link kpfreelab-node100 is 17 characters: want an error")
	}
	if _, err := newState(Options{Nodes: 30, Dir: "/srv/lab", Subnet: netip.MustParsePrefix("198.19.0.0/27"), CgroupRoot: root}); err == nil {
		t.Error("30 nodes in a /27: want an error")
	}
	s, err := newState(Options{Nodes: 1, Dir: "/srv/lab", Prefix: "kpt", CgroupRoot: root})
	if err != nil {
		t.Fatal(err)
	}
	if s.Bridge != "kpt-br0" || s.netnsName("node1") != "kpt-node1" || s.cgroupParent() != root+"/kpt-lab" || s.Gateway.String() != "198.18.0.1" {
		t.Errorf("names: bridge %s netns %s cgroup %s gateway %s", s.Bridge, s.netnsName("node1"), s.cgroupParent(), s.Gateway)
	}
}

func TestReconcile(t *testing.T) {
	s := testState(t, 3)
	if err := s.reconcile(Options{Nodes: 5}); err != nil {
		t.Errorf("growing: %v", err)
	}
	if err := s.reconcile(Options{Nodes: 2}); err == nil || !strings.Contains(err.Error(), "shrinking") {
		t.Errorf("shrinking: %v", err)
	}
	if err := s.reconcile(Options{Nodes: 3, Prefix: "other"}); err == nil || !strings.Contains(err.Error(), "prefix") {
		t.Errorf("other prefix: %v", err)
	}
}

// TestInventoryParses checks hosts.yaml against the real inventory parser.
func TestInventoryParses(t *testing.T) {
	s := testState(t, 3)
	data, err := s.inventory()
	if err != nil {
		t.Fatal(err)
	}
	inv, err := inventory.Parse("hosts.yaml", data)
	if err != nil {
		t.Fatalf("%v\n%s", err, data)
	}
	type host struct{ Name, Address, Role string }
	var got []host
	for _, h := range inv.Hosts {
		got = append(got, host{h.Name, h.Address, string(h.Role)})
	}
	want := []host{{"node1", "198.18.0.11", "control-plane"}, {"node2", "198.18.0.12", "worker"}, {"node3", "198.18.0.13", "worker"}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("hosts (-want +got):\n%s", diff)
	}
	if inv.SSH.User != "root" || inv.SSH.IdentityFile != s.IdentityFile() || inv.SSH.KnownHostsFile != s.KnownHostsFile() || inv.SSH.AcceptNewHostKeys {
		t.Errorf("ssh: %+v", inv.SSH)
	}
	if inv.Cluster.ControlPlaneEndpoint != "198.18.0.11:6443" || inv.Cluster.KubernetesVersion != DefaultKubernetesVersion {
		t.Errorf("cluster: %+v", inv.Cluster)
	}
}

func TestInventoryGolden(t *testing.T) {
	s := testState(t, 2)
	got, err := s.inventory()
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "hosts.yaml")
	if os.Getenv("UPDATE_GOLDEN") != "" {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(want), string(got)); diff != "" {
		t.Errorf("hosts.yaml (-want +got; UPDATE_GOLDEN=1 rewrites):\n%s", diff)
	}
}

func TestKnownHosts(t *testing.T) {
	s := testState(t, 2)
	data, err := s.knownHosts()
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "known_hosts")
	if err := os.WriteFile(f, data, 0o644); err != nil {
		t.Fatal(err)
	}
	cb, err := knownhosts.New(f)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(data), "198.18.0.11 ssh-ed25519 ") {
		t.Errorf("known_hosts does not start with the bare address: %q", data)
	}
	for _, n := range s.Nodes {
		pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(n.HostKey))
		if err != nil {
			t.Fatal(err)
		}
		addr := &netAddr{n.Address.String() + ":22"}
		if err := cb(n.Address.String()+":22", addr, pub); err != nil {
			t.Errorf("%s: %v", n.Name, err)
		}
	}
	other := s.Nodes[1].HostKey
	pub, _, _, _, _ := ssh.ParseAuthorizedKey([]byte(other))
	if err := cb("198.18.0.11:22", &netAddr{"198.18.0.11:22"}, pub); err == nil {
		t.Error("node2's key accepted for node1")
	}
}

type netAddr struct{ s string }

func (a *netAddr) Network() string { return "tcp" }
func (a *netAddr) String() string  { return a.s }

func TestLoadUsers(t *testing.T) {
	etc := t.TempDir()
	write := func(name, data string) {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("passwd", "root:x:0:0:root:/root:/bin/bash\nalice:x:2000:2000::/home/alice:/bin/bash\n")
	write("shadow", "root:!:19000:0:99999:7:::\nalice:*:19000:0:99999:7:::") // no final newline
	write("group", "root:x:0:\nalice:x:2000:\nstaff:x:2001:\n")
	db, err := loadUsers(etc)
	if err != nil {
		t.Fatal(err)
	}
	want := []labUser{{AdminUser, 2002, 2002}, {NoPasswordUser, 2003, 2003}}
	if diff := cmp.Diff(want, db.added, cmp.AllowUnexported(labUser{})); diff != "" {
		t.Errorf("added users (-want +got):\n%s", diff)
	}
	if !strings.Contains(string(db.passwd), "\nkpadmin:x:2002:2002:kpfree lab:/home/kpadmin:/bin/bash\n") {
		t.Errorf("passwd:\n%s", db.passwd)
	}
	if !strings.HasPrefix(string(db.shadow), "root:*:19000:") {
		t.Errorf("root not unlocked in the node's shadow:\n%s", db.shadow)
	}
	if !strings.Contains(string(db.shadow), ":99999:7:::\nkpadmin:*:") {
		t.Errorf("shadow lines not separated:\n%s", db.shadow)
	}
	if _, ok := db.files()["gshadow"]; ok {
		t.Error("gshadow written although the host has none")
	}
	write("group", "root:x:0:\nkpadmin:x:3000:\n")
	if _, err := loadUsers(etc); err == nil {
		t.Error("a host group kpadmin: want an error")
	}
}

func TestYAMLString(t *testing.T) {
	for in, want := range map[string]string{
		"node1": "node1", "/var/lib/kpfree-lab/ssh/id_ed25519": "/var/lib/kpfree-lab/ssh/id_ed25519",
		"v1.34.4": "v1.34.4", "yes": `"yes"`, "1.2": `"1.2"`, "a b": `"a b"`, "#x": `"#x"`, "": `""`,
	} {
		if got := yamlString(in); got != want {
			t.Errorf("yamlString(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestSSHDConfig(t *testing.T) {
	s := testState(t, 1)
	cfg := s.sshdConfig(s.Nodes[0])
	for _, want := range []string{
		"ListenAddress 0.0.0.0:22\n", "PermitRootLogin prohibit-password\n", "PasswordAuthentication no\n",
		"UsePAM no\n", "AuthorizedKeysFile /etc/ssh/authorized_keys.d/kpfree-lab\n",
		"HostKey /var/lib/kpfree-lab/nodes/node1/ssh_host_ed25519_key\n", "PidFile /var/lib/kpfree-lab/nodes/node1/sshd.pid\n",
	} {
		if !strings.Contains(cfg, want) {
			t.Errorf("sshd_config lacks %q", want)
		}
	}
}

func TestMountArgs(t *testing.T) {
	s := testState(t, 1)
	s.Overlays = append(append([]string{}, BaseOverlays...), "/var/lib")
	args := strings.Join(s.mountArgs(s.Nodes[0]), " ")
	if !strings.HasPrefix(args, "open /var/lib/kpfree-lab overlay ") || !strings.HasSuffix(args, " rebind /var/lib/kpfree-lab") {
		t.Errorf("the lab dir under the /var/lib overlay is not shown as it is: %s", args)
	}
	// Sources in the lab dir are reached through the fd opened before the
	// overlays, not through the /var/lib overlay.
	fd := "/proc/self/fd/4/nodes/node1"
	for _, want := range []string{
		"overlay /etc " + fd + "/overlay/etc/upper " + fd + "/overlay/etc/work",
		"overlay /run " + fd + "/overlay/run/upper",
		"overlay /var/lib " + fd + "/overlay/var_lib/upper",
		"bind " + fd + "/root /root", "bind " + fd + "/home /home",
	} {
		if !strings.Contains(args, want) {
			t.Errorf("mount args lack %q:\n%s", want, args)
		}
	}
}

func TestWithin(t *testing.T) {
	for _, c := range []struct {
		path, dir string
		want      bool
	}{{"/etc", "/etc", true}, {"/etc/x", "/etc", true}, {"/etcetera", "/etc", false}, {"/", "/etc", false}, {"/var/lib/x", "/var/lib", true}} {
		if got := within(c.path, c.dir); got != c.want {
			t.Errorf("within(%q, %q) = %v", c.path, c.dir, got)
		}
	}
}

func TestHostsFile(t *testing.T) {
	s := testState(t, 2)
	got := string(s.hostsFile())
	if !strings.Contains(got, "127.0.0.1\tlocalhost\n") || !strings.HasSuffix(got, "198.18.0.11\tnode1\n198.18.0.12\tnode2\n") {
		t.Errorf("hosts:\n%s", got)
	}
}

func TestLeftoversOfUnusedPrefix(t *testing.T) {
	if got := Leftovers("kpunused"); len(got) != 0 {
		t.Errorf("Leftovers(kpunused) = %v", got)
	}
}

func TestMountArgsKubernetes(t *testing.T) {
	s := testState(t, 2)
	s.Dir = "/srv/lab"
	s.Kubernetes = true
	s.K8sBinDir = "/root/.cache/kpfree/k8s/v1.34.4/bin"
	s.Overlays = overlays(true, nil)
	args := strings.Join(s.mountArgs(s.Nodes[1]), " ")
	nd := "/srv/lab/nodes/node2"
	if strings.Contains(args, "/proc/self/fd/4") || strings.Contains(args, "rebind") {
		t.Errorf("the lab dir is not under an overlay, yet is reached through an fd: %s", args)
	}
	var order []string
	for _, want := range []string{
		"overlay /etc ", "overlay /var/lib " + nd + "/overlay/var_lib/upper", "overlay /usr " + nd + "/overlay/usr/upper",
		// Binaries before /root is replaced: their dir may be under /root.
		"bindro /root/.cache/kpfree/k8s/v1.34.4/bin/kubelet /usr/local/bin/kubelet",
		"bind " + nd + "/root /root",
		"bind " + nd + "/private/var_lib_containerd /var/lib/containerd",
		"bind " + nd + "/private/var_lib_kubelet /var/lib/kubelet",
		"bind " + nd + "/private/var_log_pods /var/log/pods",
		"rshared /var/lib/kubelet",
		"bind " + nd + "/sysctl/vm.overcommit_memory /proc/sys/vm/overcommit_memory",
		"bind " + nd + "/sysctl/kernel.keys.root_maxkeys /proc/sys/kernel/keys/root_maxkeys",
	} {
		i := strings.Index(args, want)
		if i < 0 {
			t.Errorf("mount args lack %q:\n%s", want, args)
			continue
		}
		order = append(order, fmt.Sprintf("%06d %s", i, want))
	}
	if !sort.StringsAreSorted(order) {
		t.Errorf("mounts out of order: %q", order)
	}
}

func TestOverlays(t *testing.T) {
	if got := overlays(false, []string{"/var/lib", "/etc"}); strings.Join(got, " ") != "/etc /run /var/lib" {
		t.Errorf("overlays(false, /var/lib /etc) = %v", got)
	}
	got := strings.Join(overlays(true, []string{"/var/lib", "/srv"}), " ")
	if !strings.HasPrefix(got, "/etc /run /var/lib /var/log /usr") || !strings.HasSuffix(got, " /srv") || strings.Count(got, "/var/lib") != 1 {
		t.Errorf("overlays(true, /var/lib /srv) = %v", got)
	}
}

func TestReconcileKubernetes(t *testing.T) {
	s := testState(t, 2)
	if err := s.reconcile(Options{Nodes: 2, Kubernetes: true}); err == nil || !strings.Contains(err.Error(), "Kubernetes") {
		t.Errorf("Kubernetes nodes asked of a plain lab: %v", err)
	}
	s.Kubernetes, s.K8sBinDir, s.Images = true, "/a/bin", "/a/images.tar"
	if err := s.reconcile(Options{Nodes: 2}); err != nil {
		t.Errorf("zero options on a Kubernetes lab: %v", err)
	}
	if err := s.reconcile(Options{Nodes: 2, Kubernetes: true, K8sBinDir: "/b/bin"}); err == nil {
		t.Error("other binaries: want an error")
	}
}

func TestCgroupDirs(t *testing.T) {
	s := testState(t, 1)
	n := s.Nodes[0]
	n.Cgroup = "/sys/fs/cgroup/unified/kpfree-lab/node1"
	if got := s.cgroupDirs(n); len(got) != 1 {
		t.Errorf("plain lab: %v", got)
	}
	if got := s.inV1Cgroups(n, []string{"sleep", "1"}); strings.Join(got, " ") != "sleep 1" {
		t.Errorf("plain lab wraps daemons: %v", got)
	}
	s.CgroupV1 = []string{"/sys/fs/cgroup/memory", "/sys/fs/cgroup/systemd"}
	got := strings.Join(s.inCgroups(n, []string{"nsenter", "x"}), " ")
	want := "/bin/sh -c " + joinCgroups + " sh /sys/fs/cgroup/unified/kpfree-lab/node1 /sys/fs/cgroup/memory/kpfree-lab/node1 /sys/fs/cgroup/systemd/kpfree-lab/node1 -- nsenter x"
	if got != want {
		t.Errorf("inCgroups:\n got %s\nwant %s", got, want)
	}
	if p := s.CgroupPath("node1"); p != "/kpfree-lab/node1" {
		t.Errorf("CgroupPath = %s", p)
	}
}

func TestCgroupV1Roots(t *testing.T) {
	roots, err := cgroupV1Roots()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range roots {
		if !strings.HasPrefix(r, "/") {
			t.Errorf("root %q", r)
		}
	}
	t.Logf("cgroup v1 hierarchies here: %v", roots)
}

func TestPodNetworkConfig(t *testing.T) {
	data, err := podNetworkConfig(netip.MustParsePrefix("10.244.1.0/24"))
	if err != nil {
		t.Fatal(err)
	}
	var conf struct {
		CNIVersion string `json:"cniVersion"`
		Plugins    []struct {
			Type, Bridge      string
			IsGateway, IPMasq bool
			IPAM              struct {
				Type   string
				Ranges [][]struct{ Subnet string }
			}
		}
	}
	if err := json.Unmarshal(data, &conf); err != nil {
		t.Fatal(err)
	}
	p := conf.Plugins[0]
	if len(conf.Plugins) != 1 || p.Type != "bridge" || p.Bridge != "cni0" || !p.IsGateway || p.IPMasq ||
		p.IPAM.Type != "host-local" || p.IPAM.Ranges[0][0].Subnet != "10.244.1.0/24" {
		t.Errorf("CNI config:\n%s", data)
	}
}

func TestContainerdConfig(t *testing.T) {
	for _, want := range []string{
		"restrict_oom_score_adj = true", "SystemdCgroup = false", `sandbox_image = "registry.k8s.io/pause:3.10.1"`,
		`bin_dir = "/usr/lib/cni"`, `conf_dir = "/etc/cni/net.d"`, `path = "/var/lib/containerd/opt"`,
	} {
		if !strings.Contains(containerdConfig, want) {
			t.Errorf("containerd config lacks %q", want)
		}
	}
}
