package bootstrap

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"

	"github.com/kpfree/kpfree/internal/install"
	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/ssh"
	"github.com/kpfree/kpfree/preflight"
	"github.com/kpfree/kpfree/templates"
	"github.com/kpfree/kpfree/verify"
)

// fakeHost is a scripted ssh.Executor (k0sctl's style): commands are
// answered by the first rule whose pattern matches; every command and
// upload is recorded.
type fakeHost struct {
	name  string
	mu    sync.Mutex
	rules []rule
	log   []string
	files map[string][]byte
}

type rule struct {
	re *regexp.Regexp
	fn func(cmd string) ssh.Result
}

func newFakeHost(name string) *fakeHost { return &fakeHost{name: name, files: map[string][]byte{}} }

// on answers commands matching pattern (a regexp) with fn.
func (f *fakeHost) on(pattern string, fn func(cmd string) ssh.Result) {
	f.rules = append(f.rules, rule{regexp.MustCompile(pattern), fn})
}

func ok(out string) ssh.Result { return ssh.Result{Stdout: []byte(out)} }

func (f *fakeHost) Name() string { return f.name }
func (f *fakeHost) Close() error { return nil }

func (f *fakeHost) Run(_ context.Context, cmd string) (ssh.Result, error) {
	f.mu.Lock()
	f.log = append(f.log, cmd)
	rules := f.rules
	f.mu.Unlock()
	for _, r := range rules {
		if r.re.MatchString(cmd) {
			return r.fn(cmd), nil
		}
	}
	return ssh.Result{ExitCode: 127, Stderr: []byte("fake: no rule for " + cmd)}, nil
}

func (f *fakeHost) Upload(_ context.Context, data []byte, path string, mode fs.FileMode) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, fmt.Sprintf("upload %s %04o", path, uint32(mode)))
	f.files[path] = bytes.Clone(data)
	return nil
}

func (f *fakeHost) commands() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.log...)
}

// ran reports whether a command matching pattern was run.
func (f *fakeHost) ran(pattern string) bool {
	re := regexp.MustCompile(pattern)
	for _, c := range f.commands() {
		if re.MatchString(c) {
			return true
		}
	}
	return false
}

// world fakes hosts that behave like kubeadm hosts and the cluster they
// make: kubeadm init and join create Nodes (with pod CIDRs) in a fake
// clientset, reset removes the host's files, the podnet script's routes and
// the bpffs mount are remembered.
type world struct {
	t     *testing.T
	inv   *inventory.Inventory
	cs    *fake.Clientset
	hosts map[string]*fakeHost

	mu       sync.Mutex
	files    map[string]*hostState
	routes   map[string][]string
	mounted  map[string]bool
	failJoin map[string]string // host -> kubeadm join's error
	nextCIDR int
	release  *install.ReleaseStatus
	installs []install.Options
	removed  int
	verified int
}

func newWorld(t *testing.T, inv *inventory.Inventory) *world {
	w := &world{t: t, inv: inv, cs: fake.NewClientset(), hosts: map[string]*fakeHost{}, files: map[string]*hostState{},
		routes: map[string][]string{}, mounted: map[string]bool{}, failJoin: map[string]string{}}
	for _, tg := range inv.Targets() {
		w.files[tg.Name] = &hostState{}
		w.hosts[tg.Name] = w.fakeKubeadmHost(tg)
	}
	return w
}

func (w *world) addNode(tg inventory.Target) {
	w.mu.Lock()
	cidr := fmt.Sprintf("10.244.%d.0/24", w.nextCIDR)
	w.nextCIDR++
	w.mu.Unlock()
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: tg.Name},
		Spec:       corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
		Status: corev1.NodeStatus{
			Addresses:  []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: tg.Address}},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}},
		},
	}
	if _, err := w.cs.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
		w.t.Errorf("create Node %s: %v", tg.Name, err)
	}
}

var routeRE = regexp.MustCompile(`ip -[46] route replace (\S+) via (\S+) proto 201`)

func (w *world) fakeKubeadmHost(tg inventory.Target) *fakeHost {
	h := newFakeHost(tg.Name)
	st := func() *hostState { return w.files[tg.Name] }
	h.on(`^`+regexp.QuoteMeta(StateCommand)+`$`, func(string) ssh.Result {
		w.mu.Lock()
		defer w.mu.Unlock()
		s := *st()
		var out []string
		if s.AdminConf {
			out = append(out, AdminConfPath)
		}
		if s.KubeletConf {
			out = append(out, KubeletConfPath)
		}
		if s.APIServer {
			out = append(out, APIServerPath)
		}
		if s.PKI {
			out = append(out, caCertPath)
		}
		return ok(strings.Join(out, "\n") + "\n")
	})
	h.on(`^cat /etc/kubernetes/admin.conf$`, func(string) ssh.Result {
		w.mu.Lock()
		defer w.mu.Unlock()
		if !st().AdminConf {
			return ssh.Result{ExitCode: 1, Stderr: []byte("cat: /etc/kubernetes/admin.conf: No such file or directory")}
		}
		return ok("apiVersion: v1\nkind: Config\n# fake admin.conf of cp1\n")
	})
	h.on(`^kubeadm init --config `, func(string) ssh.Result {
		w.mu.Lock()
		*st() = hostState{AdminConf: true, KubeletConf: true, APIServer: true, PKI: true}
		w.mu.Unlock()
		w.addNode(tg)
		return ok("Your Kubernetes control-plane has initialized successfully!\n")
	})
	h.on(`^kubeadm token create`, func(string) ssh.Result {
		return ok("kubeadm join 10.0.0.11:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:" + strings.Repeat("1", 64) + " \n")
	})
	h.on(`^kubeadm token delete abcdef$`, func(string) ssh.Result { return ok("bootstrap token \"abcdef\" deleted\n") })
	h.on(`^kubeadm init phase upload-certs`, func(string) ssh.Result { return ok("[upload-certs] done\n") })
	h.on(`^kubeadm join --config `, func(string) ssh.Result {
		w.mu.Lock()
		msg := w.failJoin[tg.Name]
		// A failed join gets as far as the kubelet's TLS bootstrap.
		*st() = hostState{KubeletConf: true, PKI: true, APIServer: tg.Role == inventory.RoleControlPlane}
		w.mu.Unlock()
		if msg != "" {
			return ssh.Result{ExitCode: 1, Stderr: []byte(msg + "\n")}
		}
		w.addNode(tg)
		return ok("This node has joined the cluster\n")
	})
	h.on(`^kubeadm reset -f`, func(string) ssh.Result {
		w.mu.Lock()
		*st() = hostState{}
		w.mu.Unlock()
		return ok("[reset] done\n")
	})
	h.on(`^(mkdir|rm) `, func(string) ssh.Result { return ok("") })
	h.on(`^set -e\n`, func(cmd string) ssh.Result { // podnet's route script
		var rs []string
		for _, m := range routeRE.FindAllStringSubmatch(cmd, -1) {
			rs = append(rs, m[1]+" via "+m[2]+" dev eth0 proto 201")
		}
		w.mu.Lock()
		w.routes[tg.Name] = rs
		w.mu.Unlock()
		return ok("")
	})
	h.on(`^if \[ -e /etc/cni/net.d/05-kpfree.conflist \]`, func(string) ssh.Result { // podnet's observation
		h.mu.Lock()
		conf, have := h.files["/etc/cni/net.d/05-kpfree.conflist"]
		h.mu.Unlock()
		out := "@@kpfree:missing@@\n"
		if have {
			out = string(conf)
		}
		w.mu.Lock()
		out += "@@kpfree:routes@@\n" + strings.Join(w.routes[tg.Name], "\n") + "\n@@kpfree:bridge@@\n"
		w.mu.Unlock()
		return ok(out)
	})
	h.on(`^\{ mountpoint -q /sys/fs/bpf \|\|`, func(string) ssh.Result {
		w.mu.Lock()
		w.mounted[tg.Name] = true
		w.mu.Unlock()
		return ok("")
	})
	h.on(`^if mountpoint -q /sys/fs/bpf && findmnt`, func(string) ssh.Result {
		w.mu.Lock()
		defer w.mu.Unlock()
		if w.mounted[tg.Name] {
			return ok("yes\n")
		}
		return ok("no\n")
	})
	return h
}

// options are Init's options over the world's fakes.
func (w *world) options() Options {
	hosts := map[string]ssh.Executor{}
	for n, h := range w.hosts {
		hosts[n] = h
	}
	return Options{
		Inventory:     w.inv,
		Hosts:         hosts,
		KubeconfigOut: w.t.TempDir() + "/demo.kubeconfig",
		Rand:          bytes.NewReader(bytes.Repeat([]byte{0x42}, 64)),
		Poll:          1,
		NewClient:     func([]byte) (kubernetes.Interface, error) { return w.cs, nil },
		Agent:         install.Options{RESTConfig: &rest.Config{Host: "https://10.0.0.11:6443"}},
		Verify:        &verify.Options{},
		Preflight: func(_ context.Context, hosts []preflight.Host, _ preflight.Options) (preflight.Report, error) {
			var rep preflight.Report
			for _, h := range hosts {
				rep.Findings = append(rep.Findings, preflight.Finding{Host: h.Exec.Name(), Check: preflight.CheckSwap, Status: preflight.Pass})
			}
			return rep, nil
		},
		Install: func(_ context.Context, o install.Options) (*install.Result, error) {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.installs = append(w.installs, o)
			ch, err := templates.AgentChart()
			if err != nil {
				return nil, err
			}
			w.release = &install.ReleaseStatus{Release: "kpfree-agent", Namespace: "kube-system", Revision: len(w.installs),
				Status: "deployed", Chart: ch.Metadata.Name + "-" + ch.Metadata.Version, Values: wantValues(o), Agents: w.agents()}
			return &install.Result{Release: "kpfree-agent", Namespace: "kube-system", Action: "install", Revision: len(w.installs), Agents: w.agents()}, nil
		},
		AgentStatus: func(context.Context, install.Options) (*install.ReleaseStatus, error) {
			w.mu.Lock()
			defer w.mu.Unlock()
			if w.release == nil {
				return nil, install.ErrNotInstalled
			}
			r := *w.release
			return &r, nil
		},
		Uninstall: func(context.Context, install.Options) (bool, error) {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.removed++
			had := w.release != nil
			w.release = nil
			return had, nil
		},
		RunVerify: func(context.Context, verify.Options) verify.Report {
			w.mu.Lock()
			w.verified++
			w.mu.Unlock()
			return verify.Report{OK: true}
		},
	}
}

// agents is every Node with a ready agent.
func (w *world) agents() *install.Agents {
	list, _ := w.cs.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
	a := &install.Agents{DaemonSet: "kube-system/kpfree-agent"}
	for _, n := range list.Items {
		a.Nodes = append(a.Nodes, install.NodeAgent{Node: n.Name, NodeReady: true, Pod: "kpfree-agent-" + n.Name, Ready: true})
	}
	sort.Slice(a.Nodes, func(i, j int) bool { return a.Nodes[i].Node < a.Nodes[j].Node })
	return a
}

// nodeNames lists the Nodes of the fake cluster.
func (w *world) nodeNames() []string {
	list, _ := w.cs.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
	var out []string
	for _, n := range list.Items {
		out = append(out, n.Name)
	}
	sort.Strings(out)
	return out
}

func regexpMatch(pattern, s string) bool { return regexp.MustCompile(pattern).MatchString(s) }
