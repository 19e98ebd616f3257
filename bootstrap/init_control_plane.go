package bootstrap

import (
	"context"
	"maps"
	"slices"

	"github.com/kpfree/kpfree/internal/inventory"
)

// initStep runs `kubeadm init` on the first control plane.
type initStep struct {
	c *cluster
	// attempted: kubeadm init (or the reset before it) ran in this run, so a
	// rollback resets the host.
	attempted bool
}

func (s *initStep) Title() string { return "Initialise control plane " + s.c.first.name() }

func (s *initStep) Skip(ctx context.Context) (string, bool, error) {
	d, err := s.c.decide(ctx, s.c.first, s.c.members(ctx))
	if err != nil || !d.Skip {
		return "", false, err
	}
	return d.Reason, true, nil
}

func (s *initStep) Run(ctx context.Context) error    { return s.init(ctx) }
func (s *initStep) DryRun(ctx context.Context) error { return s.init(ctx) }

// InitCommand is the kubeadm init command line. The certificate key is in
// the configuration file; kubeadm prints neither it nor the token.
func InitCommand(uploadCerts bool) string {
	cmd := "kubeadm init --config " + InitConfigPath + " --skip-token-print"
	if uploadCerts {
		cmd += " --upload-certs --skip-certificate-key-print"
	}
	return cmd
}

func (s *initStep) init(ctx context.Context) error {
	c, h := s.c, s.c.first
	d, err := c.decide(ctx, h, c.members(ctx))
	if err != nil {
		return err
	}
	if d.Err != nil {
		return d.Err
	}
	if d.Skip {
		return nil
	}
	uploadCerts := len(c.hostsOf(inventory.RoleControlPlane)) > 0
	config, err := RenderInit(c.cfg, h.t, c.certKey)
	if err != nil {
		return err
	}
	s.attempted = !h.dryRun
	if d.Reset {
		c.o.UI.Infof("%s: %s", h.name(), d.Reason)
		if _, err := h.run(ctx, s.Title(), c.resetCommand(), ""); err != nil {
			return err
		}
	}
	if err := c.uploadKubeadmFiles(ctx, s.Title(), h, config, InitConfigPath); err != nil {
		return err
	}
	if _, err := h.run(ctx, s.Title(), InitCommand(uploadCerts), ""); err != nil {
		return err
	}
	c.mu.Lock()
	c.certsUploaded = uploadCerts
	c.mu.Unlock()
	if h.dryRun {
		return nil
	}
	c.forget()
	// The API server must answer kpfree (through the controlPlaneEndpoint)
	// and list this node before the next steps.
	return c.wait(ctx, "the API server to list node "+h.name(), func(ctx context.Context) (bool, error) {
		m := c.members(ctx)
		if m.Err != nil {
			c.forget() // read admin.conf again
		}
		return m.has(h.name()), m.Err
	})
}

// Rollback resets the host when this run initialised it.
func (s *initStep) Rollback(ctx context.Context) error {
	if !s.attempted {
		return nil
	}
	h := s.c.first
	_, err := h.run(ctx, "Roll back: "+s.Title(), s.c.resetCommand(), "")
	s.c.forget()
	return err
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
