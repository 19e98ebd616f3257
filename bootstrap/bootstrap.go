// Package bootstrap builds a Kubernetes cluster that never runs kube-proxy,
// from bare hosts over SSH (`kpfree init`). It is an ordered list of typed
// steps (internal/runner), each in its own file:
//
//	Preflight checks               preflight.Run with RequireKubeBinaries
//	Render kubeadm configuration   templates/kubeadm by Kubernetes version
//	Initialise control plane X     kubeadm init --config (addon/kube-proxy skipped)
//	Fetch admin kubeconfig         admin.conf -> a local file, mode 0600
//	Join control planes            kubeadm join --config, one at a time
//	Join workers                   kubeadm join --config, in parallel
//	Configure pod networking       agent/podnet's bridge + routes (--cni kpfree)
//	Install kpfree-agent           bpffs on every node, then internal/install
//
// followed by verify.Run. Every step says when it has nothing to do
// (re-running init on a cluster changes nothing), says what it would do under
// --dry-run (each remote command per host, secrets redacted), and undoes its
// work when a later step fails: a failure after `kubeadm init` runs
// `kubeadm reset -f` on that host and on every host joined in this run.
package bootstrap

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kpfree/kpfree/agent/podnet"
	"github.com/kpfree/kpfree/internal/install"
	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/runner"
	"github.com/kpfree/kpfree/internal/ssh"
	"github.com/kpfree/kpfree/internal/ui"
	"github.com/kpfree/kpfree/preflight"
	"github.com/kpfree/kpfree/verify"
)

// Pod networking modes (Options.CNI).
const (
	// CNIKpfree is the built-in pod networking (agent/podnet).
	CNIKpfree = "kpfree"
	// CNINone leaves pod networking to the user: nodes stay NotReady until
	// a CNI plugin is installed.
	CNINone = "none"
)

// DefaultWaitTimeout bounds each wait for the cluster (API server up, Nodes
// registered, pod CIDRs allocated, Nodes Ready).
const DefaultWaitTimeout = 5 * time.Minute

// Options of Init.
type Options struct {
	Inventory *inventory.Inventory
	// Hosts has an Executor for every inventory host, by name (lazy SSH
	// clients from the CLI; fakes in tests).
	Hosts map[string]ssh.Executor
	UI    *ui.UI
	// DryRun changes nothing: read-only checks run, every change is recorded
	// in Result.Plan instead.
	DryRun bool
	// NoRollback leaves what was done in place when a step fails.
	NoRollback bool
	// Concurrency bounds the hosts worked on at once (default 10).
	Concurrency int

	// KubeconfigOut is the local file admin.conf is written to; default
	// ./<cluster name>.kubeconfig.
	KubeconfigOut string
	// CNI is CNIKpfree (default) or CNINone.
	CNI    string
	PodNet podnet.Options
	// Kubelet is merged over the default KubeletConfiguration (see
	// ClusterConfig.Kubelet).
	Kubelet map[string]any
	// PatchesDir is a local directory of kubeadm patches: DIR/*.yaml (or
	// .json) go to every host, DIR/<host name>/* to that host only (winning
	// over a file of the same name). They are uploaded to RemotePatchesDir
	// and named in the init and join configurations.
	PatchesDir string
	// CRISocket is the runtime endpoint for kubeadm; empty: detected.
	CRISocket string
	// IgnorePreflightErrors are passed to kubeadm init and join.
	IgnorePreflightErrors []string

	// Agent says how to install kpfree-agent: Values (image, cgroup, ...),
	// ExtraValues, Timeout. The cluster and the API server (the inventory's
	// controlPlaneEndpoint) are filled in.
	Agent install.Options

	// WaitTimeout bounds each wait for the cluster (DefaultWaitTimeout).
	WaitTimeout time.Duration

	// Verify, when set, runs verify.Run once every step has succeeded (not
	// under DryRun); Client, RESTConfig and Hosts are filled in.
	Verify *verify.Options

	// Seams for tests; nil means the real thing.
	NewClient   func(kubeconfig []byte) (kubernetes.Interface, error)
	Preflight   func(ctx context.Context, hosts []preflight.Host, o preflight.Options) (preflight.Report, error)
	Install     func(ctx context.Context, o install.Options) (*install.Result, error)
	Uninstall   func(ctx context.Context, o install.Options) (bool, error)
	AgentStatus func(ctx context.Context, o install.Options) (*install.ReleaseStatus, error)
	RunVerify   func(ctx context.Context, o verify.Options) verify.Report
	// Rand is the source of the certificate key (crypto/rand).
	Rand io.Reader
	// Poll is the interval of the waits (2s).
	Poll time.Duration
}

// Result is what Init did; with -o json it is the one document on stdout.
type Result struct {
	OK bool `json:"ok"`
	// Changed is false when every step had nothing to do.
	Changed    bool                `json:"changed"`
	DryRun     bool                `json:"dryRun,omitempty"`
	Cluster    string              `json:"cluster"`
	Kubeconfig string              `json:"kubeconfig,omitempty"`
	Steps      []runner.StepResult `json:"steps"`
	// Plan lists every change made, or under DryRun every change that would
	// be made.
	Plan []Action `json:"plan"`
	// Preflight holds the findings that failed or warned.
	Preflight []preflight.Finding `json:"preflight,omitempty"`
	Verify    *verify.Report      `json:"verify,omitempty"`
	Error     string              `json:"error,omitempty"`
}

// cluster is the state the steps share.
type cluster struct {
	o       Options
	inv     *inventory.Inventory
	cfg     ClusterConfig
	hosts   []*host // inventory order
	byName  map[string]*host
	first   *host
	journal *journal
	certKey string
	// patches per host name: file name -> data.
	patches map[string]map[string][]byte

	mu            sync.Mutex
	adminConf     []byte
	client        kubernetes.Interface
	certsUploaded bool
	preflight     []preflight.Finding
	kubeconfig    string
}

func (o *Options) setDefaults() {
	if o.UI == nil {
		o.UI = ui.Discard()
	}
	if o.Concurrency <= 0 {
		o.Concurrency = 10
	}
	if o.CNI == "" {
		o.CNI = CNIKpfree
	}
	if o.WaitTimeout <= 0 {
		o.WaitTimeout = DefaultWaitTimeout
	}
	if o.NewClient == nil {
		o.NewClient = NewClient
	}
	if o.Preflight == nil {
		o.Preflight = preflight.Run
	}
	if o.Install == nil {
		o.Install = install.Install
	}
	if o.Uninstall == nil {
		o.Uninstall = install.Uninstall
	}
	if o.AgentStatus == nil {
		o.AgentStatus = install.Status
	}
	if o.RunVerify == nil {
		o.RunVerify = verify.Run
	}
	if o.Rand == nil {
		o.Rand = rand.Reader
	}
	if o.Poll <= 0 {
		o.Poll = 2 * time.Second
	}
	if o.KubeconfigOut == "" && o.Inventory != nil {
		o.KubeconfigOut = o.Inventory.Cluster.Name + ".kubeconfig"
	}
}

// RESTConfig reads a kubeconfig (admin.conf) for client-go, with a request
// timeout.
func RESTConfig(kubeconfig []byte) (*rest.Config, error) {
	rc, err := clientcmd.RESTConfigFromKubeConfig(kubeconfig)
	if err != nil {
		return nil, err
	}
	if rc.Timeout == 0 {
		rc.Timeout = 30 * time.Second
	}
	return rc, nil
}

// NewClient is a clientset for a kubeconfig (admin.conf).
func NewClient(kubeconfig []byte) (kubernetes.Interface, error) {
	rc, err := RESTConfig(kubeconfig)
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(rc)
}

// buildSteps returns the steps of Init for o, in order, sharing one state.
func buildSteps(o Options) ([]runner.Step, *cluster, error) {
	c, err := newCluster(o)
	if err != nil {
		return nil, nil, err
	}
	steps := []runner.Step{
		&preflightStep{c: c},
		&renderStep{c: c},
		&initStep{c: c},
		&kubeconfigStep{c: c},
	}
	if len(c.inv.ControlPlanes()) > 1 {
		steps = append(steps, &joinStep{c: c, role: inventory.RoleControlPlane})
	}
	if len(c.inv.Workers()) > 0 {
		steps = append(steps, &joinStep{c: c, role: inventory.RoleWorker})
	}
	if o.CNI == CNIKpfree {
		steps = append(steps, &podnetStep{c: c})
	}
	steps = append(steps, &agentStep{c: c})
	for _, s := range steps {
		c.journal.addStep(s.Title())
	}
	return steps, c, nil
}

func newCluster(o Options) (*cluster, error) {
	if o.Inventory == nil {
		return nil, errors.New("bootstrap: no inventory")
	}
	if o.CNI != CNIKpfree && o.CNI != CNINone {
		return nil, fmt.Errorf("--cni %q: want %s or %s", o.CNI, CNIKpfree, CNINone)
	}
	inv := o.Inventory
	if _, err := KubeadmAPIVersion(inv.Cluster.KubernetesVersion); err != nil {
		return nil, err
	}
	c := &cluster{o: o, inv: inv, cfg: ClusterConfigFrom(inv), byName: map[string]*host{}}
	c.cfg.CRISocket = o.CRISocket
	c.cfg.IgnorePreflightErrors = o.IgnorePreflightErrors
	c.cfg.Kubelet = o.Kubelet
	var names []string
	for _, t := range inv.Targets() {
		e := o.Hosts[t.Name]
		if e == nil {
			return nil, fmt.Errorf("bootstrap: no executor for host %s", t.Name)
		}
		h := &host{t: t, exec: e, c: c, dryRun: o.DryRun}
		c.hosts = append(c.hosts, h)
		c.byName[t.Name] = h
		names = append(names, t.Name)
	}
	c.first = c.byName[inv.FirstControlPlane().Name]
	if c.first == nil {
		return nil, errors.New("bootstrap: the inventory has no control-plane host")
	}
	c.journal = newJournal()
	key := make([]byte, 32)
	if _, err := io.ReadFull(o.Rand, key); err != nil {
		return nil, fmt.Errorf("certificate key: %w", err)
	}
	c.certKey = hex.EncodeToString(key)
	if o.PatchesDir != "" {
		p, err := loadPatches(o.PatchesDir, names)
		if err != nil {
			return nil, err
		}
		c.patches = p
		c.cfg.Patches = true
	}
	return c, nil
}

// Init builds the cluster: it runs the steps, then verify (Options.Verify).
// The error is a *runner.StepError when a step failed (the Result says which
// and what was rolled back); a failed verify is not an error, Result.OK is
// false and Result.Verify says why.
func Init(ctx context.Context, o Options) (*Result, error) {
	o.setDefaults()
	res := &Result{DryRun: o.DryRun, Plan: []Action{}}
	if o.Inventory != nil {
		res.Cluster = o.Inventory.Cluster.Name
	}
	steps, c, err := buildSteps(o)
	if err != nil {
		return res, err
	}
	r := &runner.Runner{UI: o.UI, DryRun: o.DryRun, NoRollback: o.NoRollback}
	rep, runErr := r.Run(ctx, steps...)
	res.OK, res.Steps, res.Changed = rep.OK, rep.Steps, rep.Changed()
	res.Plan = c.journal.list()
	res.Preflight = c.preflight
	if !o.DryRun && runErr == nil {
		if p, err := filepath.Abs(o.KubeconfigOut); err == nil {
			res.Kubeconfig = p
		}
	}
	if runErr != nil {
		res.Error = runErr.Error()
		return res, runErr
	}
	if o.Verify != nil && !o.DryRun {
		vo := *o.Verify
		cs, err := c.api(ctx)
		if err != nil || cs == nil {
			return res, fmt.Errorf("verify: no API client: %v", err)
		}
		vo.Client = cs
		if vo.RESTConfig == nil && c.adminConf != nil {
			if rc, err := RESTConfig(c.adminConf); err == nil {
				vo.RESTConfig = rc
			}
		}
		if vo.Hosts == nil {
			vo.Hosts = c.verifyHosts()
		}
		if vo.Concurrency == 0 {
			vo.Concurrency = o.Concurrency
		}
		st := o.UI.Start("Verify the cluster")
		vr := o.RunVerify(ctx, vo)
		if vr.OK {
			st.End(nil)
		} else {
			st.End(fmt.Errorf("%d of %d checks failed: %s", len(vr.Failed()), len(vr.Checks), vr.FailedNames()))
		}
		res.Verify = &vr
		res.OK = vr.OK
	}
	return res, nil
}

func (c *cluster) verifyHosts() []verify.Host {
	out := make([]verify.Host, len(c.hosts))
	for i, h := range c.hosts {
		out[i] = verify.Host{Name: h.name(), Address: h.t.Address, Exec: h.exec}
	}
	return out
}

// api returns a client for the cluster, reading admin.conf from the first
// control plane; nil without an error when there is no cluster yet.
func (c *cluster) api(ctx context.Context) (kubernetes.Interface, error) {
	c.mu.Lock()
	if c.client != nil {
		defer c.mu.Unlock()
		return c.client, nil
	}
	c.mu.Unlock()
	st, err := c.first.getState(ctx)
	if err != nil {
		return nil, err
	}
	if !st.AdminConf {
		return nil, nil
	}
	conf, err := c.first.query(ctx, "cat "+AdminConfPath)
	if err != nil {
		return nil, err
	}
	cs, err := c.o.NewClient([]byte(conf))
	if err != nil {
		return nil, fmt.Errorf("%s on %s: %w", AdminConfPath, c.first.name(), err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.adminConf, c.client = []byte(conf), cs
	return cs, nil
}

// forget drops what is known of the cluster and the hosts (after a change).
func (c *cluster) forget() {
	c.mu.Lock()
	c.adminConf, c.client = nil, nil
	c.mu.Unlock()
	for _, h := range c.hosts {
		h.forget()
	}
}

// members lists the Nodes of the cluster.
func (c *cluster) members(ctx context.Context) membership {
	cs, err := c.api(ctx)
	if err != nil {
		return membership{Err: err}
	}
	if cs == nil {
		return membership{}
	}
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	list, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return membership{Err: err}
	}
	m := membership{Known: true, Nodes: map[string]bool{}}
	for _, n := range list.Items {
		m.Nodes[n.Name] = true
	}
	return m
}

// hostsOf returns the hosts with a role, in inventory order.
func (c *cluster) hostsOf(role inventory.Role) []*host {
	var out []*host
	for _, h := range c.hosts {
		if h.t.Role == role && h != c.first {
			out = append(out, h)
		}
	}
	return out
}

// apiEndpoint splits the controlPlaneEndpoint.
func (c *cluster) apiEndpoint() (string, int) {
	h, p, err := net.SplitHostPort(c.cfg.ControlPlaneEndpoint)
	if err != nil {
		return c.cfg.ControlPlaneEndpoint, DefaultAPIPort
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		return h, DefaultAPIPort
	}
	return h, n
}

// forEach runs fn on hosts in parallel (Concurrency at once), collecting
// every host's error. A dry run goes one host at a time, in inventory order,
// so that its plan reads the same on every run.
func (c *cluster) forEach(ctx context.Context, hosts []*host, fn func(ctx context.Context, h *host) error) error {
	n := c.o.Concurrency
	if c.o.DryRun {
		n = 1
	}
	return ssh.ForEach(ctx, hosts, n, (*host).name, fn)
}

// wait polls cond every Poll until it is true, ctx ends or WaitTimeout
// passes; what describes the wait in the error, with cond's last error.
func (c *cluster) wait(ctx context.Context, what string, cond func(ctx context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, c.o.WaitTimeout)
	defer cancel()
	var last error
	for {
		ok, err := cond(ctx)
		if ok {
			return nil
		}
		if err != nil {
			last = err
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return fmt.Errorf("timed out after %s waiting for %s: %w", c.o.WaitTimeout, what, last)
			}
			return fmt.Errorf("timed out after %s waiting for %s", c.o.WaitTimeout, what)
		case <-time.After(c.o.Poll):
		}
	}
}

// loadPatches reads a kubeadm patches directory: top-level files for every
// host, DIR/<host>/ files for one host.
func loadPatches(dir string, hosts []string) (map[string]map[string][]byte, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("kubeadm patches: %w", err)
	}
	common := map[string][]byte{}
	known := map[string]bool{}
	for _, h := range hosts {
		known[h] = true
	}
	out := map[string]map[string][]byte{}
	for _, h := range hosts {
		out[h] = map[string][]byte{}
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if e.IsDir() {
			if !known[e.Name()] {
				return nil, fmt.Errorf("kubeadm patches: %s: no host %s in the inventory", p, e.Name())
			}
			files, err := os.ReadDir(p)
			if err != nil {
				return nil, fmt.Errorf("kubeadm patches: %w", err)
			}
			for _, f := range files {
				if f.IsDir() {
					continue
				}
				data, err := os.ReadFile(filepath.Join(p, f.Name()))
				if err != nil {
					return nil, fmt.Errorf("kubeadm patches: %w", err)
				}
				out[e.Name()][f.Name()] = data
			}
			continue
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("kubeadm patches: %w", err)
		}
		common[e.Name()] = data
	}
	for _, h := range hosts {
		for name, data := range common {
			if _, ok := out[h][name]; !ok {
				out[h][name] = data
			}
		}
	}
	return out, nil
}
