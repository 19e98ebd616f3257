// Package kubeproxy runs the real kube-proxy (the binary test/k8s/build.sh
// builds) inside a lab node, against a test control plane (test/kubeenv), so
// that kpfree's migration tests and benchmarks are judged against the real
// thing: its rules, its timings, its leftovers.
//
// Everything kube-proxy changes lands in the lab node's network namespace:
// iptables/ip6tables/nftables rules, conntrack entries, and the few sysctls it
// writes. Start configures it so that it writes no host-global setting:
//
//   - conntrack.maxPerCore and conntrack.min are 0, so it never writes
//     net.netfilter.nf_conntrack_max nor
//     /sys/module/nf_conntrack/parameters/hashsize, the two host-global
//     conntrack knobs (the first is read-only outside the initial netns
//     anyway, the second is a module parameter shared by all namespaces);
//   - the conntrack timeouts it does set by default
//     (net.netfilter.nf_conntrack_tcp_timeout_established = 86400 and
//     ..._close_wait = 3600) and, in iptables mode, net.ipv4.conf.all.route_localnet = 1
//     are per-network-namespace sysctls: written from inside the node they
//     change only the node (the integration test reads both sides).
//
// The configuration goes in a KubeProxyConfiguration file; kube-proxy ignores
// command-line flags such as --conntrack-max-per-core when --config is given,
// so the file is the only place these settings live.
//
// Like the real thing, a stopped kube-proxy leaves its rules behind: Stop sends
// SIGTERM and kube-proxy exits without removing anything. Cleanup runs
// `kube-proxy --cleanup`, which removes what kube-proxy knows it made.
package kubeproxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kpfree/kpfree/internal/lab"
	"github.com/kpfree/kpfree/test/kubeenv"
)

// Proxy modes kube-proxy supports here (the kernel has no IPVS).
const (
	ModeIPTables = "iptables"
	ModeNFTables = "nftables"
)

// Default ports, those of a stock kube-proxy.
const (
	DefaultHealthzPort = 10256
	DefaultMetricsPort = 10249
)

// Options for Start.
type Options struct {
	// Lab and Node say where kube-proxy runs: inside that node's network,
	// mount and UTS namespaces and cgroup.
	Lab  *lab.State
	Node string
	// ControlPlane is the API server kube-proxy watches. It must be
	// reachable from the node: start it with BindAddress = the lab gateway.
	ControlPlane *kubeenv.ControlPlane
	// Mode is ModeIPTables (default) or ModeNFTables.
	Mode string
	// ClusterCIDR is the pod network (default 10.244.0.0/16): traffic to a
	// Service from outside it is masqueraded.
	ClusterCIDR string
	// Dir receives the configuration, the kubeconfig and kube-proxy.log. It
	// must be visible inside the node (not under /etc, /run, /root, /home).
	Dir string
	// HealthzPort and MetricsPort are served on the node's address (reachable
	// from the host through the lab bridge). Defaults 10256 and 10249.
	HealthzPort, MetricsPort int
	// Verbosity is kube-proxy's -v (default 2: one line per sync).
	Verbosity int
	// SyncTimeout bounds the wait for the first full sync (default 2 min).
	SyncTimeout time.Duration
	// Logf, when set, receives progress lines.
	Logf func(format string, args ...any)
}

// Proxy is a kube-proxy running in a lab node.
type Proxy struct {
	Opts Options
	// Address is the node's address (kube-proxy's bindAddress and node IP).
	Address netip.Addr
	// ConfigFile, Kubeconfig and LogFile are the files in Opts.Dir.
	ConfigFile, Kubeconfig, LogFile string
	// HealthzURL and MetricsURL are reachable from the host.
	HealthzURL, MetricsURL string
	// Started is when the process started; SyncTime how long it took from
	// there to its first full sync (healthz reports a sync and the rules
	// are in the node).
	Started  time.Time
	SyncTime time.Duration

	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // its exit status, once done is closed
}

// HealthStatus is kube-proxy's /healthz answer.
type HealthStatus struct {
	LastUpdated  time.Time `json:"lastUpdated"`
	CurrentTime  time.Time `json:"currentTime"`
	NodeEligible *bool     `json:"nodeEligible,omitempty"`
	Healthy      bool      `json:"healthy"`
	// Status holds one entry per IP family ("IPv4", "IPv6") whose proxier
	// has completed at least one sync.
	Status map[string]struct {
		LastUpdated time.Time `json:"lastUpdated"`
		Healthy     bool      `json:"healthy"`
	} `json:"status,omitempty"`
}

// Start makes sure the Node object exists, issues kube-proxy's client
// certificate (user system:kube-proxy, which the default RBAC binds to
// system:node-proxier), writes its configuration, starts the real kube-proxy
// inside the node and waits for its first full sync.
func Start(ctx context.Context, o Options) (*Proxy, error) {
	if err := o.defaults(); err != nil {
		return nil, err
	}
	n := o.Lab.Node(o.Node)
	bin, err := NodeBinary(o.Lab, "kube-proxy")
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, err
	}
	if _, err := o.Lab.Exec(ctx, o.Node, "test", "-d", o.Dir); err != nil {
		return nil, fmt.Errorf("kube-proxy dir %s is not visible inside %s (pick one outside /etc, /run, /root, /home): %w", o.Dir, o.Node, err)
	}
	p := &Proxy{
		Opts:       o,
		Address:    n.Address,
		ConfigFile: filepath.Join(o.Dir, "kube-proxy.yaml"),
		Kubeconfig: filepath.Join(o.Dir, "kube-proxy.kubeconfig"),
		LogFile:    filepath.Join(o.Dir, "kube-proxy.log"),
		HealthzURL: "http://" + net.JoinHostPort(n.Address.String(), strconv.Itoa(o.HealthzPort)) + "/healthz",
		MetricsURL: "http://" + net.JoinHostPort(n.Address.String(), strconv.Itoa(o.MetricsPort)) + "/metrics",
		done:       make(chan struct{}),
	}

	client, err := NewClient(o.ControlPlane.Kubeconfig)
	if err != nil {
		return nil, err
	}
	if err := EnsureNode(ctx, client, o.Node, n.Address); err != nil {
		return nil, err
	}
	kc, err := o.ControlPlane.IssueUser("kube-proxy-"+o.Node, "system:kube-proxy")
	if err != nil {
		return nil, fmt.Errorf("kube-proxy certificate: %w", err)
	}
	if err := copyFile(kc, p.Kubeconfig); err != nil {
		return nil, err
	}
	cfg, err := renderConfig(o, n.Address, p.Kubeconfig)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.ConfigFile, cfg, 0o644); err != nil {
		return nil, err
	}

	logf, err := os.Create(p.LogFile)
	if err != nil {
		return nil, err
	}
	// The process outlives ctx, which only bounds the start.
	cmd, err := o.Lab.Command(context.WithoutCancel(ctx), o.Node, bin,
		"--config="+p.ConfigFile, "--v="+strconv.Itoa(o.Verbosity),
		// Ignored next to --config (the file says the same); it keeps the
		// FLAG: line of the log from showing the 32768 default.
		"--conntrack-max-per-core=0")
	if err != nil {
		logf.Close()
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	// The shell and nsenter exec, so this is kube-proxy's own PID; it dies
	// with the test process however that ends.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.Started = time.Now()
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start kube-proxy in %s: %w", o.Node, err)
	}
	p.cmd = cmd
	go func() {
		p.err = cmd.Wait()
		logf.Close()
		close(p.done)
	}()
	o.logf("%s: kube-proxy (%s mode) started, pid %d, log %s", o.Node, o.Mode, cmd.Process.Pid, p.LogFile)

	sctx, cancel := context.WithTimeout(ctx, o.SyncTimeout)
	defer cancel()
	if err := p.waitFirstSync(sctx); err != nil {
		p.Stop()
		return nil, fmt.Errorf("%s: kube-proxy did not sync: %w\n%s", o.Node, err, p.LogTail(20))
	}
	p.SyncTime = time.Since(p.Started)
	o.logf("%s: kube-proxy synced in %s", o.Node, p.SyncTime.Round(time.Millisecond))
	return p, nil
}

func (o *Options) defaults() error {
	if o.Lab == nil || o.ControlPlane == nil || o.Dir == "" {
		return errors.New("kubeproxy: Lab, ControlPlane and Dir are required")
	}
	if o.Lab.Node(o.Node) == nil {
		return fmt.Errorf("kubeproxy: lab %s has no node %q", o.Lab.Dir, o.Node)
	}
	switch o.Mode {
	case "":
		o.Mode = ModeIPTables
	case ModeIPTables, ModeNFTables:
	default:
		return fmt.Errorf("kubeproxy: mode %q: want %s or %s (this kernel has no IPVS)", o.Mode, ModeIPTables, ModeNFTables)
	}
	if o.ClusterCIDR == "" {
		o.ClusterCIDR = "10.244.0.0/16"
	}
	if _, err := netip.ParsePrefix(o.ClusterCIDR); err != nil {
		return fmt.Errorf("kubeproxy: cluster CIDR: %w", err)
	}
	if o.HealthzPort == 0 {
		o.HealthzPort = DefaultHealthzPort
	}
	if o.MetricsPort == 0 {
		o.MetricsPort = DefaultMetricsPort
	}
	if o.Verbosity == 0 {
		o.Verbosity = 2
	}
	if o.SyncTimeout == 0 {
		o.SyncTimeout = 2 * time.Minute
	}
	abs, err := filepath.Abs(o.Dir)
	if err != nil {
		return err
	}
	o.Dir = abs
	return nil
}

func (o *Options) logf(format string, args ...any) {
	if o.Logf != nil {
		o.Logf(format, args...)
	}
}

// config is the part of kube-proxy's KubeProxyConfiguration (v1alpha1) that
// Start sets; everything else keeps kube-proxy's defaults. It is written as
// JSON, which kube-proxy's (strict) YAML loader reads.
type config struct {
	APIVersion       string `json:"apiVersion"`
	Kind             string `json:"kind"`
	ClientConnection struct {
		Kubeconfig string `json:"kubeconfig"`
	} `json:"clientConnection"`
	HostnameOverride   string `json:"hostnameOverride"`
	BindAddress        string `json:"bindAddress"`
	HealthzBindAddress string `json:"healthzBindAddress"`
	MetricsBindAddress string `json:"metricsBindAddress"`
	Mode               string `json:"mode"`
	DetectLocalMode    string `json:"detectLocalMode"`
	ClusterCIDR        string `json:"clusterCIDR"`
	Conntrack          struct {
		MaxPerCore int32 `json:"maxPerCore"`
		Min        int32 `json:"min"`
	} `json:"conntrack"`
}

func renderConfig(o Options, addr netip.Addr, kubeconfig string) ([]byte, error) {
	c := config{
		APIVersion:         "kubeproxy.config.k8s.io/v1alpha1",
		Kind:               "KubeProxyConfiguration",
		HostnameOverride:   o.Node,
		BindAddress:        addr.String(),
		HealthzBindAddress: net.JoinHostPort(addr.String(), strconv.Itoa(o.HealthzPort)),
		MetricsBindAddress: net.JoinHostPort(addr.String(), strconv.Itoa(o.MetricsPort)),
		Mode:               o.Mode,
		DetectLocalMode:    "ClusterCIDR",
		ClusterCIDR:        o.ClusterCIDR,
	}
	c.ClientConnection.Kubeconfig = kubeconfig
	// 0: never touch the host-global nf_conntrack_max / hashsize.
	c.Conntrack.MaxPerCore, c.Conntrack.Min = 0, 0
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// waitFirstSync waits until every proxier kube-proxy runs (IPv4, and IPv6
// too in dual-stack mode, which kube-proxy picks when the node can do IPv6
// rules) has synced once, according to healthz, and its base rules are in
// the node.
func (p *Proxy) waitFirstSync(ctx context.Context) error {
	var last string
	for {
		if ok, why, err := p.firstSyncDone(ctx); err != nil {
			return err
		} else if ok {
			return nil
		} else {
			last = why
		}
		select {
		case <-p.done:
			return fmt.Errorf("kube-proxy exited: %v", p.err)
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %s)", ctx.Err(), last)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (p *Proxy) firstSyncDone(ctx context.Context) (bool, string, error) {
	families := p.Families()
	if families == nil {
		return false, "kube-proxy has not logged its stack mode yet", nil
	}
	h, err := p.Health(ctx)
	if err != nil {
		return false, err.Error(), nil
	}
	for _, f := range families {
		if h.Status[f].LastUpdated.IsZero() {
			return false, "healthz: " + f + " proxier not synced yet", nil
		}
	}
	r, err := p.Rules(ctx)
	if err != nil {
		return false, "", err
	}
	for _, f := range families {
		if !r.HasBaseRules(p.Opts.Mode, f) {
			return false, f + " rules not in the node yet", nil
		}
	}
	return true, "", nil
}

// Families returns the IP families kube-proxy runs proxiers for, primary
// first, as it logged them at start ("running in dual-stack mode" or
// "single-stack mode"), or nil before it has logged them.
func (p *Proxy) Families() []string {
	data, _ := os.ReadFile(p.LogFile)
	for line := range strings.Lines(string(data)) {
		var mode string
		switch {
		case strings.Contains(line, `"kube-proxy running in dual-stack mode"`):
			mode = "dual"
		case strings.Contains(line, `"kube-proxy running in single-stack mode"`):
			mode = "single"
		default:
			continue
		}
		primary := "IPv4"
		if strings.Contains(line, "=\"IPv6\"") {
			primary = "IPv6"
		}
		if mode == "single" {
			return []string{primary}
		}
		if primary == "IPv6" {
			return []string{"IPv6", "IPv4"}
		}
		return []string{"IPv4", "IPv6"}
	}
	return nil
}

// Health returns kube-proxy's /healthz answer (200 or 503 both decode).
func (p *Proxy) Health(ctx context.Context) (*HealthStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.HealthzURL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hostHTTP.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	h := &HealthStatus{}
	if err := json.NewDecoder(resp.Body).Decode(h); err != nil {
		return nil, fmt.Errorf("healthz %s: %s: %w", p.HealthzURL, resp.Status, err)
	}
	return h, nil
}

// Rules dumps the node's rules (see Dump).
func (p *Proxy) Rules(ctx context.Context) (Ruleset, error) {
	return Dump(ctx, p.Opts.Lab, p.Opts.Node)
}

// WaitSynced polls the node's rules until ok accepts them, and returns
// them. It fails when ctx ends or kube-proxy exits first.
func (p *Proxy) WaitSynced(ctx context.Context, ok func(Ruleset) bool) (Ruleset, error) {
	for {
		r, err := p.Rules(ctx)
		if err != nil {
			return r, err
		}
		if ok(r) {
			return r, nil
		}
		select {
		case <-p.done:
			return r, fmt.Errorf("kube-proxy exited: %v\n%s", p.err, p.LogTail(20))
		case <-ctx.Done():
			return r, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// PID is kube-proxy's process ID (for RSS or CPU readings).
func (p *Proxy) PID() int { return p.cmd.Process.Pid }

// Exited is closed when kube-proxy has exited.
func (p *Proxy) Exited() <-chan struct{} { return p.done }

// Stop sends SIGTERM to kube-proxy (the process Start started, by PID) and
// waits for it to exit, killing it after 10 s. Its rules stay in the node,
// as a real kube-proxy leaves them: use Cleanup or a scrubber to remove them.
// Stop is safe to call more than once.
func (p *Proxy) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	lab.StopStarted(p.cmd.Process, p.done, 10*time.Second)
	p.Opts.logf("%s: kube-proxy stopped (%v)", p.Opts.Node, p.err)
}

// SysctlLog returns kube-proxy's log lines about the sysctls it set
// ("Set sysctl" for conntrack settings, route_localnet in iptables mode).
func (p *Proxy) SysctlLog() []string {
	data, _ := os.ReadFile(p.LogFile)
	var out []string
	for line := range strings.Lines(string(data)) {
		if strings.Contains(line, "FLAG:") {
			continue
		}
		if strings.Contains(line, `"Set sysctl"`) || strings.Contains(line, "route_localnet") || strings.Contains(line, "conntrack") && strings.Contains(line, "max") {
			out = append(out, strings.TrimSpace(line))
		}
	}
	return out
}

// LogTail returns the last n lines of kube-proxy's log.
func (p *Proxy) LogTail(n int) string {
	data, _ := os.ReadFile(p.LogFile)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Cleanup runs `kube-proxy --cleanup` inside node: the real kube-proxy's
// own removal of its iptables (IPv4 and IPv6), IPVS and nftables rules. It
// needs no API server. It returns kube-proxy's output.
func Cleanup(ctx context.Context, s *lab.State, node string) (string, error) {
	bin, err := NodeBinary(s, "kube-proxy")
	if err != nil {
		return "", err
	}
	cmd, err := s.Command(ctx, node, bin, "--cleanup", "--v=2")
	if err != nil {
		return "", err
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s: kube-proxy --cleanup: %w\n%s", node, err, out.String())
	}
	return out.String(), nil
}

func copyFile(from, to string) error {
	data, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	return os.WriteFile(to, data, 0o600)
}
