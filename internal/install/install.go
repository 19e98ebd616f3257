// Package install installs, upgrades, inspects and removes kpfree-agent, the
// eBPF service load balancer, with the Helm SDK and the chart embedded in
// templates/. Releases are stored as Helm secrets in the release namespace,
// so the helm CLI sees them too.
//
// An install or upgrade is atomic: when Helm cannot apply the chart, or when
// the agent does not become ready on every node in time, the release is
// rolled back to its last deployed revision (a first install is removed).
package install

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chart"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/release"
	"helm.sh/helm/v3/pkg/releaseutil"
	"helm.sh/helm/v3/pkg/storage/driver"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/kpfree/kpfree/templates"
)

// Defaults for Options.
const (
	DefaultNamespace   = "kube-system"
	DefaultReleaseName = "kpfree-agent"
	DefaultTimeout     = 5 * time.Minute
	// DefaultMaxHistory is how many revisions an upgrade keeps.
	DefaultMaxHistory = 10
	// DefaultKubeVersion is the Kubernetes version Render assumes.
	DefaultKubeVersion = "v1.34.0"
	// rollbackTimeout bounds a rollback, which runs after Timeout may have
	// been used up by the wait.
	rollbackTimeout = 2 * time.Minute
)

// ErrNotInstalled: there is no kpfree-agent release.
var ErrNotInstalled = errors.New("kpfree-agent is not installed")

// Options say which cluster, which release and which values.
type Options struct {
	// The cluster: a kubeconfig file (Context: empty for its current
	// context), a rest.Config, or a RESTClientGetter. The first set of
	// Getter, RESTConfig, Kubeconfig wins.
	Kubeconfig string
	Context    string
	RESTConfig *rest.Config
	Getter     genericclioptions.RESTClientGetter

	Namespace   string // DefaultNamespace
	ReleaseName string // DefaultReleaseName

	// Values are the typed values; ExtraValues, merged over them, set any
	// other chart value (templates/kpfree-agent/values.yaml).
	Values      Values
	ExtraValues map[string]any

	// Timeout bounds the whole install or upgrade, the wait included
	// (DefaultTimeout).
	Timeout time.Duration
	// DryRun renders the chart and checks it against the cluster (schema,
	// conflicts with existing objects) without changing anything.
	DryRun bool
	// NoWait returns once Helm has applied the chart, without waiting for
	// the agents (and without the rollback a failed wait causes).
	NoWait bool
	// MaxHistory is how many revisions to keep (DefaultMaxHistory).
	MaxHistory int

	// KubeVersion is the Kubernetes version Render assumes
	// (DefaultKubeVersion); Install asks the cluster.
	KubeVersion string

	// Chart replaces the embedded chart (tests).
	Chart *chart.Chart
	// Log receives Helm's debug lines.
	Log func(format string, args ...any)
}

func (o *Options) setDefaults() {
	if o.Namespace == "" {
		o.Namespace = DefaultNamespace
	}
	if o.ReleaseName == "" {
		o.ReleaseName = DefaultReleaseName
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.MaxHistory <= 0 {
		o.MaxHistory = DefaultMaxHistory
	}
	if o.Log == nil {
		o.Log = func(string, ...any) {}
	}
}

func (o *Options) chart() (*chart.Chart, error) {
	if o.Chart != nil {
		return o.Chart, nil
	}
	return templates.AgentChart()
}

// Result of an install or upgrade.
type Result struct {
	Release   string
	Namespace string
	// Action is "install" (no release before) or "upgrade".
	Action   string
	Revision int
	// Status is the Helm release status: "deployed", or "pending-install" /
	// "pending-upgrade" for a dry run.
	Status   string
	DryRun   bool
	Manifest string
	Notes    string
	// DaemonSet is the agent DaemonSet's name.
	DaemonSet string
	// Agents is the state after the wait; nil with DryRun or NoWait.
	Agents *Agents
}

// RolledBackError is returned when an install or upgrade failed and was
// undone. Err is the failure (a *NotReadyError when the agents did not
// become ready).
type RolledBackError struct {
	Err error
	// Revision is the revision the release was rolled back to; 0 means the
	// release was removed (a failed first install).
	Revision int
}

func (e *RolledBackError) Error() string {
	if e.Revision == 0 {
		return fmt.Sprintf("%v\nrolled back: removed the release and everything it created", e.Err)
	}
	return fmt.Sprintf("%v\nrolled back to revision %d", e.Err, e.Revision)
}

func (e *RolledBackError) Unwrap() error { return e.Err }

type client struct {
	o   Options
	cfg *action.Configuration
	cs  kubernetes.Interface
}

func newClient(o Options) (*client, error) {
	getter := o.Getter
	if getter == nil {
		if o.RESTConfig == nil && o.Kubeconfig == "" {
			return nil, errors.New("install: no cluster: set Kubeconfig, RESTConfig or Getter")
		}
		g, err := newGetter(o.Kubeconfig, o.Context, o.RESTConfig, o.Namespace)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", o.Kubeconfig, err)
		}
		getter = g
	}
	cfg := new(action.Configuration)
	if err := cfg.Init(getter, o.Namespace, "secret", o.Log); err != nil {
		return nil, err
	}
	rc, err := getter.ToRESTConfig()
	if err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	return &client{o: o, cfg: cfg, cs: cs}, nil
}

// history returns the release's revisions, oldest first; none when there is
// no release.
func (c *client) history() ([]*release.Release, error) {
	h, err := c.cfg.Releases.History(c.o.ReleaseName)
	if errors.Is(err, driver.ErrReleaseNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read release %s/%s: %w", c.o.Namespace, c.o.ReleaseName, err)
	}
	releaseutil.SortByRevision(h)
	return h, nil
}

// lastGood returns the newest revision that was deployed (deployed or
// superseded), or 0.
func lastGood(h []*release.Release) int {
	for i := len(h) - 1; i >= 0; i-- {
		if s := h[i].Info.Status; s == release.StatusDeployed || s == release.StatusSuperseded {
			return h[i].Version
		}
	}
	return 0
}

// Install installs kpfree-agent, or upgrades it when a release exists, then
// waits until the agent is ready on every node. On failure it rolls back
// (see RolledBackError). Helm applies the chart with its own wait and
// atomic mode off: Helm's DaemonSet wait tolerates maxUnavailable pods that
// are not ready, and its rollback would not cover kpfree's wait, so kpfree
// does both, for every failure, in one place.
//
// Helm's API calls take no context: ctx is checked between the steps and
// bounds the wait. When ctx is cancelled during the wait, Install returns
// without rolling back.
func Install(ctx context.Context, o Options) (*Result, error) {
	o.setDefaults()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(o.Timeout)
	ch, err := o.chart()
	if err != nil {
		return nil, err
	}
	vals := values(o.Values, o.ExtraValues)
	c, err := newClient(o)
	if err != nil {
		return nil, err
	}
	hist, err := c.history()
	if err != nil {
		return nil, err
	}
	res := &Result{Release: o.ReleaseName, Namespace: o.Namespace, DryRun: o.DryRun}
	var rel *release.Release
	lastVersion := 0
	if n := len(hist); n > 0 {
		last := hist[n-1]
		lastVersion = last.Version
		if last.Info.Status.IsPending() {
			return nil, fmt.Errorf("release %s/%s revision %d is %s: an earlier install, upgrade or rollback was interrupted; roll it back (helm rollback) or uninstall it first",
				o.Namespace, o.ReleaseName, last.Version, last.Info.Status)
		}
	}
	if lastVersion == 0 || hist[len(hist)-1].Info.Status == release.StatusUninstalled {
		res.Action = "install"
		in := action.NewInstall(c.cfg)
		in.ReleaseName, in.Namespace = o.ReleaseName, o.Namespace
		in.Timeout = o.Timeout
		in.Replace = lastVersion != 0 // reuse a name whose history was kept
		in.Description = "Install complete"
		if o.DryRun {
			in.DryRun, in.DryRunOption = true, "server"
		}
		rel, err = in.Run(ch, vals)
	} else {
		res.Action = "upgrade"
		up := action.NewUpgrade(c.cfg)
		up.Namespace = o.Namespace
		up.Timeout = o.Timeout
		up.ResetValues = true // the values given are the whole configuration
		up.MaxHistory = o.MaxHistory
		up.Description = "Upgrade complete"
		if o.DryRun {
			up.DryRun, up.DryRunOption = true, "server"
		}
		rel, err = up.Run(o.ReleaseName, ch, vals)
	}
	if err != nil {
		err = fmt.Errorf("%s kpfree-agent (%s/%s): %w", res.Action, o.Namespace, o.ReleaseName, shorten(err))
		if o.DryRun {
			return nil, err
		}
		return nil, c.rollback(err, lastVersion, lastGood(hist))
	}
	res.fill(rel)
	if o.DryRun || o.NoWait {
		return res, nil
	}
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("interrupted before the wait; %s revision %d is applied, the agents are not verified: %w", o.ReleaseName, res.Revision, err)
	}
	res.Agents, err = WaitForAgents(ctx, c.cs, o.Namespace, res.DaemonSet, time.Until(deadline))
	if err != nil {
		if ctx.Err() != nil && !errors.Is(err, context.DeadlineExceeded) && !isNotReady(err) {
			return res, fmt.Errorf("interrupted while waiting; %s revision %d is applied, the agents are not verified: %w", o.ReleaseName, res.Revision, err)
		}
		return res, c.rollback(err, lastVersion, lastGood(hist))
	}
	return res, nil
}

// longQuoted matches a long quoted string in an API error: the API server
// quotes the whole object in "Invalid value" errors of a patch.
var longQuoted = regexp.MustCompile(`"(?:[^"\\]|\\.){200,}"`)

// shortError is an error with a shorter message.
type shortError struct {
	msg string
	err error
}

func (e *shortError) Error() string { return e.msg }
func (e *shortError) Unwrap() error { return e.err }

// shorten replaces long quoted values in err's message with "...".
func shorten(err error) error {
	msg := longQuoted.ReplaceAllString(err.Error(), `"..."`)
	msg = strings.TrimSpace(strings.ReplaceAll(msg, "\n\n", "\n"))
	if msg == err.Error() {
		return err
	}
	return &shortError{msg: msg, err: err}
}

func isNotReady(err error) bool {
	var nr *NotReadyError
	return errors.As(err, &nr)
}

// rollback undoes a failed install or upgrade: back to revision good, or
// uninstalled when there is none. lastVersion is the newest revision before
// the attempt: when nothing newer was recorded, there is nothing to undo.
func (c *client) rollback(cause error, lastVersion, good int) error {
	hist, err := c.history()
	if err != nil {
		return fmt.Errorf("%w\nrollback: %v", cause, err)
	}
	if len(hist) == 0 || hist[len(hist)-1].Version <= lastVersion {
		return cause // refused before anything was recorded or applied
	}
	name := c.o.ReleaseName
	if good == 0 {
		c.o.Log("rolling back: uninstalling %s", name)
		un := action.NewUninstall(c.cfg)
		un.Timeout = rollbackTimeout
		un.Wait = true
		un.Description = "rolled back"
		if _, err := un.Run(name); err != nil {
			return fmt.Errorf("%w\nrollback (uninstall %s) failed too: %v", cause, name, err)
		}
		return &RolledBackError{Err: cause}
	}
	c.o.Log("rolling back %s to revision %d", name, good)
	rb := action.NewRollback(c.cfg)
	rb.Version = good
	rb.Timeout = rollbackTimeout
	rb.CleanupOnFail = true
	rb.MaxHistory = c.o.MaxHistory
	if err := rb.Run(name); err != nil {
		return fmt.Errorf("%w\nrollback to revision %d failed too: %v", cause, good, err)
	}
	return &RolledBackError{Err: cause, Revision: good}
}

func (r *Result) fill(rel *release.Release) {
	r.Revision = rel.Version
	r.Status = rel.Info.Status.String()
	r.Manifest = rel.Manifest
	r.Notes = rel.Info.Notes
	r.DaemonSet = daemonSetName(rel.Manifest)
}

// daemonSetName finds the DaemonSet in a rendered manifest.
func daemonSetName(manifest string) string {
	for _, doc := range releaseutil.SplitManifests(manifest) {
		var m struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if yaml.Unmarshal([]byte(doc), &m) == nil && m.Kind == "DaemonSet" {
			return m.Metadata.Name
		}
	}
	return ""
}

// Render renders the chart without a cluster, like `helm template`: the
// manifest Install would apply, for a dry run before the cluster exists.
// Only Values, ExtraValues, Namespace, ReleaseName, KubeVersion and Chart
// are used.
func Render(o Options) (*Result, error) {
	o.setDefaults()
	ch, err := o.chart()
	if err != nil {
		return nil, err
	}
	in := action.NewInstall(&action.Configuration{Log: o.Log})
	in.ClientOnly, in.DryRun, in.Replace = true, true, true
	in.ReleaseName, in.Namespace = o.ReleaseName, o.Namespace
	kv := o.KubeVersion
	if kv == "" {
		kv = DefaultKubeVersion
	}
	if in.KubeVersion, err = chartutil.ParseKubeVersion(kv); err != nil {
		return nil, fmt.Errorf("render kpfree-agent: %w", err)
	}
	rel, err := in.Run(ch, values(o.Values, o.ExtraValues))
	if err != nil {
		return nil, fmt.Errorf("render kpfree-agent: %w", err)
	}
	res := &Result{Release: o.ReleaseName, Namespace: o.Namespace, Action: "install", DryRun: true}
	res.fill(rel)
	return res, nil
}

// Uninstall removes the release and everything it created. It reports
// whether there was a release; no release is not an error.
func Uninstall(ctx context.Context, o Options) (bool, error) {
	o.setDefaults()
	if err := ctx.Err(); err != nil {
		return false, err
	}
	c, err := newClient(o)
	if err != nil {
		return false, err
	}
	un := action.NewUninstall(c.cfg)
	un.Timeout = o.Timeout
	un.Wait = !o.NoWait
	un.DryRun = o.DryRun
	if _, err := un.Run(o.ReleaseName); err != nil {
		if errors.Is(err, driver.ErrReleaseNotFound) || strings.Contains(err.Error(), driver.ErrReleaseNotFound.Error()) {
			return false, nil
		}
		return false, fmt.Errorf("uninstall kpfree-agent (%s/%s): %w", o.Namespace, o.ReleaseName, err)
	}
	return true, nil
}

// ReleaseStatus is what Status reports.
type ReleaseStatus struct {
	Release     string
	Namespace   string
	Revision    int
	Status      string // Helm's: deployed, failed, pending-upgrade, ...
	Description string
	Updated     time.Time
	Chart       string // name-version
	AppVersion  string
	// Values are the values kpfree set (not the chart's defaults).
	Values map[string]any
	// Agents is the DaemonSet and every node's agent now; nil when the
	// DaemonSet does not exist.
	Agents *Agents
}

// Status reports the release and the agents, without waiting. It returns
// ErrNotInstalled when there is no release.
func Status(ctx context.Context, o Options) (*ReleaseStatus, error) {
	o.setDefaults()
	c, err := newClient(o)
	if err != nil {
		return nil, err
	}
	hist, err := c.history()
	if err != nil {
		return nil, err
	}
	if len(hist) == 0 {
		return nil, fmt.Errorf("%w (no release %s in namespace %s)", ErrNotInstalled, o.ReleaseName, o.Namespace)
	}
	rel := hist[len(hist)-1]
	st := &ReleaseStatus{
		Release:     rel.Name,
		Namespace:   rel.Namespace,
		Revision:    rel.Version,
		Status:      rel.Info.Status.String(),
		Description: rel.Info.Description,
		Updated:     rel.Info.LastDeployed.Time,
		Values:      rel.Config,
	}
	if rel.Chart != nil && rel.Chart.Metadata != nil {
		st.Chart = rel.Chart.Metadata.Name + "-" + rel.Chart.Metadata.Version
		st.AppVersion = rel.Chart.Metadata.AppVersion
	}
	if ds := daemonSetName(rel.Manifest); ds != "" {
		a, err := GetAgents(ctx, c.cs, o.Namespace, ds)
		switch {
		case apierrors.IsNotFound(err):
		case err != nil:
			return st, err
		default:
			st.Agents = a
		}
	}
	return st, nil
}

// ChartValues returns the chart's default values merged with o's, as Install
// would pass them (for a "show values" command).
func ChartValues(o Options) (map[string]any, error) {
	ch, err := o.chart()
	if err != nil {
		return nil, err
	}
	return chartutil.CoalesceValues(ch, values(o.Values, o.ExtraValues))
}
