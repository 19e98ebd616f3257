package bootstrap

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"

	"helm.sh/helm/v3/pkg/chartutil"

	"github.com/kpfree/kpfree/internal/install"
	"github.com/kpfree/kpfree/templates"
)

// agentStep mounts bpffs on every node (the agent's pod is not privileged
// and cannot mount it for the host) and installs kpfree-agent with Helm
// (internal/install), which waits for a ready agent on every node.
type agentStep struct {
	c *cluster
	// installed: this run made a first install, which a rollback removes (a
	// failed upgrade is rolled back by install.Install itself).
	installed bool
}

func (s *agentStep) Title() string { return "Install kpfree-agent" }

// DefaultBPFFS is where the agent pins its maps and links.
const DefaultBPFFS = "/sys/fs/bpf"

func (s *agentStep) bpffs() string {
	if p := s.c.o.Agent.Values.BPFFS; p != "" {
		return p
	}
	return DefaultBPFFS
}

// MountBPFFSCommand mounts a BPF file system at dir unless one is there, and
// makes the mount shared unless it is shared or a slave already: the agent's
// pod mounts it with HostToContainer propagation, which the runtime refuses
// on a private mount. (systemd hosts have it shared; a host whose / is
// private, like a lab node's mount namespace, does not.)
func MountBPFFSCommand(dir string) string {
	return fmt.Sprintf("{ mountpoint -q %[1]s || { mkdir -p %[1]s && mount -t bpf bpf %[1]s; }; } && "+
		"{ findmnt -no PROPAGATION %[1]s | grep -qE 'shared|slave' || mount --make-shared %[1]s; }", dir)
}

// bpffsReadyCommand prints yes when dir is a shared (or slave) mount.
func bpffsReadyCommand(dir string) string {
	return fmt.Sprintf("if mountpoint -q %[1]s && findmnt -no PROPAGATION %[1]s | grep -qE 'shared|slave'; then echo yes; else echo no; fi", dir)
}

// options are the install options: the cluster from admin.conf, the API
// server from the controlPlaneEndpoint unless set.
func (s *agentStep) options(ctx context.Context) (install.Options, error) {
	c := s.c
	o := c.o.Agent
	host, port := c.apiEndpoint()
	if o.Values.APIServerHost == "" {
		o.Values.APIServerHost = host
	}
	if o.Values.APIServerPort == 0 {
		o.Values.APIServerPort = port
	}
	if o.Log == nil {
		o.Log = c.o.UI.Debugf
	}
	if o.Getter == nil && o.RESTConfig == nil && o.Kubeconfig == "" && !c.o.DryRun {
		if _, err := c.api(ctx); err != nil {
			return o, err
		}
		c.mu.Lock()
		conf := c.adminConf
		c.mu.Unlock()
		if conf == nil {
			return o, errors.New("no admin.conf: the cluster is not initialised")
		}
		rc, err := RESTConfig(conf)
		if err != nil {
			return o, err
		}
		rc.Timeout = 0 // Helm's waits are longer than a request timeout
		o.RESTConfig = rc
	}
	return o, nil
}

// wantValues are the chart values an install with o sets, as
// install.Status reports them.
func wantValues(o install.Options) map[string]any {
	base := o.Values.Map()
	if len(o.ExtraValues) == 0 {
		return normalize(base)
	}
	extra := normalize(o.ExtraValues) // a copy: CoalesceTables changes its dst
	return normalize(chartutil.CoalesceTables(extra, base))
}

// normalize round-trips v through JSON so that values compare equal
// whatever their Go types (int and float64, []string and []any).
func normalize(v map[string]any) map[string]any {
	b, err := json.Marshal(v)
	if err != nil {
		return v
	}
	out := map[string]any{}
	if json.Unmarshal(b, &out) != nil {
		return v
	}
	return out
}

func (s *agentStep) bpffsMounted(ctx context.Context) (bool, error) {
	for _, h := range s.c.hosts {
		out, err := h.query(ctx, bpffsReadyCommand(s.bpffs()))
		if err != nil {
			return false, err
		}
		if strings.TrimSpace(out) != "yes" {
			return false, nil
		}
	}
	return true, nil
}

func (s *agentStep) Skip(ctx context.Context) (string, bool, error) {
	c := s.c
	if cs, err := c.api(ctx); err != nil || cs == nil {
		return "", false, err
	}
	if ok, err := s.bpffsMounted(ctx); err != nil || !ok {
		return "", false, err
	}
	o, err := s.options(ctx)
	if err != nil {
		return "", false, err
	}
	st, err := c.o.AgentStatus(ctx, o)
	if errors.Is(err, install.ErrNotInstalled) {
		return "", false, nil
	}
	if err != nil {
		return "", false, err
	}
	if st.Status != "deployed" || st.Agents == nil || !st.Agents.Ok() {
		return "", false, nil
	}
	if !reflect.DeepEqual(normalize(st.Values), wantValues(o)) {
		return "", false, nil
	}
	if ch, err := templates.AgentChart(); err == nil && st.Chart != ch.Metadata.Name+"-"+ch.Metadata.Version {
		return "", false, nil
	}
	return fmt.Sprintf("release %s/%s revision %d is deployed with these values, agents ready on %d nodes",
		st.Namespace, st.Release, st.Revision, len(st.Agents.Nodes)), true, nil
}

func (s *agentStep) mount(ctx context.Context) error {
	return s.c.forEach(ctx, s.c.hosts, func(ctx context.Context, h *host) error {
		_, err := h.run(ctx, s.Title(), MountBPFFSCommand(s.bpffs()), "")
		return err
	})
}

func (s *agentStep) describe(o install.Options) string {
	ns, rel := o.Namespace, o.ReleaseName
	if ns == "" {
		ns = install.DefaultNamespace
	}
	if rel == "" {
		rel = install.DefaultReleaseName
	}
	vals, _ := json.Marshal(wantValues(o))
	return fmt.Sprintf("install or upgrade the kpfree-agent chart as release %s/%s with values %s, then wait for a ready agent on every node", ns, rel, vals)
}

func (s *agentStep) DryRun(ctx context.Context) error {
	if err := s.mount(ctx); err != nil {
		return err
	}
	o, err := s.options(ctx)
	if err != nil {
		return err
	}
	// Render the chart without a cluster: bad values fail now.
	if _, err := install.Render(o); err != nil {
		return err
	}
	s.c.journal.record(s.Title(), HostAPI, "api", s.describe(o))
	return nil
}

func (s *agentStep) Run(ctx context.Context) error {
	c := s.c
	if err := s.mount(ctx); err != nil {
		return err
	}
	o, err := s.options(ctx)
	if err != nil {
		return err
	}
	_, serr := c.o.AgentStatus(ctx, o)
	fresh := errors.Is(serr, install.ErrNotInstalled)
	c.journal.record(s.Title(), HostAPI, "api", s.describe(o))
	res, err := c.o.Install(ctx, o)
	if err != nil {
		return err
	}
	s.installed = fresh
	if res != nil {
		msg := fmt.Sprintf("kpfree-agent: %s of %s/%s revision %d", res.Action, res.Namespace, res.Release, res.Revision)
		if res.Agents != nil {
			msg += fmt.Sprintf(", ready on %d nodes", len(res.Agents.Nodes))
		}
		c.o.UI.Infof("%s", msg)
	}
	return nil
}

// Rollback uninstalls a release this run installed.
func (s *agentStep) Rollback(ctx context.Context) error {
	if !s.installed {
		return nil
	}
	o, err := s.options(ctx)
	if err != nil {
		return err
	}
	s.c.journal.record("Roll back: "+s.Title(), HostAPI, "api", "uninstall kpfree-agent")
	_, err = s.c.o.Uninstall(ctx, o)
	return err
}
