package bootstrap

import (
	"context"
	"fmt"
	"strings"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/internal/ssh"
)

// renderStep renders the kubeadm configuration from templates/kubeadm for
// the cluster's Kubernetes version, so that a template or value problem
// stops init before any host is touched. Files are uploaded by the init and
// join steps.
type renderStep struct {
	c *cluster
	// init is the rendered configuration of the first control plane.
	init []byte
}

func (s *renderStep) Title() string { return "Render kubeadm configuration" }

func (s *renderStep) Skip(ctx context.Context) (string, bool, error) {
	ok, err := s.c.allMembers(ctx)
	if err != nil || !ok {
		return "", false, err
	}
	return "every host is already in the cluster", true, nil
}

func (s *renderStep) Run(ctx context.Context) error    { return s.render() }
func (s *renderStep) DryRun(ctx context.Context) error { return s.render() }

func (s *renderStep) render() error {
	c := s.c
	api, err := KubeadmAPIVersion(c.cfg.KubernetesVersion)
	if err != nil {
		return err
	}
	if s.init, err = RenderInit(c.cfg, c.first.t, c.certKey); err != nil {
		return err
	}
	// The join configurations need a token, made right before the joins:
	// render them now with placeholders to find problems early.
	var joins []string
	for _, h := range c.hosts {
		if h == c.first {
			continue
		}
		if _, err := RenderJoin(c.cfg, h.t, placeholderJoin(c)); err != nil {
			return err
		}
		joins = append(joins, h.name())
	}
	what := fmt.Sprintf("%s for Kubernetes %s: init on %s", api, c.cfg.KubernetesVersion, c.first.name())
	if len(joins) > 0 {
		what += ", join on " + strings.Join(joins, ", ")
	}
	if c.cfg.Patches {
		what += fmt.Sprintf("; kubeadm patches from %s", c.o.PatchesDir)
	}
	c.journal.record(s.Title(), HostLocal, "render", "render "+what)
	c.o.UI.Debugf("kubeadm configuration of %s:\n%s", c.first.name(), ssh.Redact(string(s.init)))
	return nil
}

// placeholderJoin stands for the join data a dry run cannot have.
func placeholderJoin(c *cluster) JoinParams {
	return JoinParams{
		APIServerEndpoint: c.cfg.ControlPlaneEndpoint,
		Token:             "<token>",
		CACertHashes:      []string{"sha256:<ca-cert-hash>"},
		CertificateKey:    c.certKey,
	}
}

// uploadKubeadmFiles writes a host's kubeadm patches (replacing earlier
// ones) and a configuration file.
func (c *cluster) uploadKubeadmFiles(ctx context.Context, step string, h *host, config []byte, path string) error {
	if _, err := h.run(ctx, step, "mkdir -p "+RemoteDir+" && chmod 0700 "+RemoteDir, ""); err != nil {
		return err
	}
	if c.cfg.Patches {
		if _, err := h.run(ctx, step, "rm -rf "+RemotePatchesDir+" && mkdir -p "+RemotePatchesDir, ""); err != nil {
			return err
		}
		for _, name := range sortedKeys(c.patches[h.name()]) {
			if err := h.upload(ctx, step, c.patches[h.name()][name], RemotePatchesDir+"/"+name, 0o600); err != nil {
				return err
			}
		}
	}
	return h.upload(ctx, step, config, path, 0o600)
}

func isControlPlane(h *host) bool { return h.t.Role == inventory.RoleControlPlane }
