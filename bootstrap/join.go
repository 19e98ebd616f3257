package bootstrap

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kpfree/kpfree/internal/inventory"
)

// joinStep joins the hosts of one role: control planes one at a time (etcd
// grows one member at a time), workers in parallel.
type joinStep struct {
	c    *cluster
	role inventory.Role

	mu sync.Mutex
	// attempted are the hosts this run reset or joined (or tried to): a
	// rollback resets them.
	attempted []*host
}

func (s *joinStep) Title() string {
	if s.role == inventory.RoleControlPlane {
		return "Join control planes"
	}
	return "Join workers"
}

func (s *joinStep) hosts() []*host { return s.c.hostsOf(s.role) }

func (s *joinStep) Skip(ctx context.Context) (string, bool, error) {
	m := s.c.members(ctx)
	if !m.Known {
		return "", false, m.Err
	}
	var names []string
	for _, h := range s.hosts() {
		d, err := s.c.decide(ctx, h, m)
		if err != nil || !d.Skip {
			return "", false, err
		}
		names = append(names, h.name())
	}
	return strings.Join(names, ", ") + " already joined", true, nil
}

func (s *joinStep) Run(ctx context.Context) error    { return s.join(ctx) }
func (s *joinStep) DryRun(ctx context.Context) error { return s.join(ctx) }

// JoinCommand is the kubeadm join command line (the token is in the file).
const JoinCommand = "kubeadm join --config " + JoinConfigPath

// tokenCommand makes a bootstrap token for the joins; it expires in an hour
// and is deleted once they are done.
const tokenCommand = "kubeadm token create --print-join-command --ttl 1h --description 'kpfree init'"

// parseJoinCommand reads `kubeadm token create --print-join-command`:
// kubeadm join ENDPOINT --token ID.SECRET --discovery-token-ca-cert-hash sha256:HEX
func parseJoinCommand(out string) (JoinParams, error) {
	var j JoinParams
	f := strings.Fields(out)
	for i := 0; i < len(f); i++ {
		switch {
		case f[i] == "join" && i+1 < len(f) && !strings.HasPrefix(f[i+1], "-"):
			j.APIServerEndpoint = f[i+1]
		case f[i] == "--token" && i+1 < len(f):
			j.Token = f[i+1]
		case f[i] == "--discovery-token-ca-cert-hash" && i+1 < len(f):
			j.CACertHashes = append(j.CACertHashes, f[i+1])
		}
	}
	if j.Token == "" || len(j.CACertHashes) == 0 || j.APIServerEndpoint == "" {
		return j, errors.New("cannot read the join command kubeadm printed (want: kubeadm join ENDPOINT --token ... --discovery-token-ca-cert-hash ...)")
	}
	return j, nil
}

func (s *joinStep) join(ctx context.Context) error {
	c, first := s.c, s.c.first
	m := c.members(ctx)
	var todo []*host
	decisions := map[*host]decision{}
	var errs []error
	for _, h := range s.hosts() {
		d, err := c.decide(ctx, h, m)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: %w", h.name(), err))
		case d.Err != nil:
			errs = append(errs, d.Err)
		case d.Skip:
			c.o.UI.Infof("%s", d.Reason)
		default:
			decisions[h] = d
			todo = append(todo, h)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if len(todo) == 0 {
		return nil
	}

	out, err := first.run(ctx, s.Title(), tokenCommand,
		"kubeadm join "+c.cfg.ControlPlaneEndpoint+" --token <token-id>.<token-secret> --discovery-token-ca-cert-hash sha256:<ca-cert-hash>")
	if err != nil {
		return fmt.Errorf("bootstrap token: %w", err)
	}
	jp, err := parseJoinCommand(out)
	if err != nil {
		return err
	}
	tokenID, _, _ := strings.Cut(jp.Token, ".")
	defer func() {
		// Best effort: the token expires in an hour anyway.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if _, err := first.run(dctx, s.Title(), "kubeadm token delete "+tokenID, ""); err != nil {
			c.o.UI.Warnf("%s: delete bootstrap token %s: %v", first.name(), tokenID, err)
		}
	}()

	if s.role == inventory.RoleControlPlane {
		jp.CertificateKey = c.certKey
		c.mu.Lock()
		uploaded := c.certsUploaded
		c.mu.Unlock()
		if !uploaded {
			// kubeadm init ran in an earlier run (or its certificates have
			// expired, after 2 hours): upload them again with this run's key.
			if _, err := first.run(ctx, s.Title(), "kubeadm init phase upload-certs --upload-certs --certificate-key "+c.certKey, ""); err != nil {
				return fmt.Errorf("upload control-plane certificates: %w", err)
			}
			c.mu.Lock()
			c.certsUploaded = true
			c.mu.Unlock()
		}
	}

	joinOne := func(ctx context.Context, h *host) error {
		d := decisions[h]
		cfg, err := RenderJoin(c.cfg, h.t, jp)
		if err != nil {
			return err
		}
		if !h.dryRun {
			s.mu.Lock()
			s.attempted = append(s.attempted, h)
			s.mu.Unlock()
		}
		if d.Reset {
			c.o.UI.Infof("%s", d.Reason)
			if _, err := h.run(ctx, s.Title(), c.resetCommand(), ""); err != nil {
				return err
			}
		}
		if err := c.uploadKubeadmFiles(ctx, s.Title(), h, cfg, JoinConfigPath); err != nil {
			return err
		}
		_, err = h.run(ctx, s.Title(), JoinCommand, "")
		// The file holds the token (and the certificate key): remove it
		// whatever happened.
		if _, rerr := h.run(context.WithoutCancel(ctx), s.Title(), "rm -f "+JoinConfigPath, ""); rerr != nil && err == nil {
			err = rerr
		}
		return err
	}
	if s.role == inventory.RoleControlPlane {
		for _, h := range todo {
			if err := joinOne(ctx, h); err != nil {
				return fmt.Errorf("%s: %w", h.name(), err)
			}
		}
	} else if err := c.forEach(ctx, todo, joinOne); err != nil {
		return err
	}
	if first.dryRun {
		return nil
	}
	c.forget()
	return c.wait(ctx, "the joined nodes to register", func(ctx context.Context) (bool, error) {
		m := c.members(ctx)
		for _, h := range todo {
			if !m.has(h.name()) {
				return false, m.Err
			}
		}
		return true, nil
	})
}

// Rollback resets every host this run joined or tried to join and removes
// their Node objects.
func (s *joinStep) Rollback(ctx context.Context) error {
	s.mu.Lock()
	hosts := append([]*host(nil), s.attempted...)
	s.mu.Unlock()
	if len(hosts) == 0 {
		return nil
	}
	c := s.c
	title := "Roll back: " + s.Title()
	err := c.forEach(ctx, hosts, func(ctx context.Context, h *host) error {
		_, err := h.run(ctx, title, c.resetCommand(), "")
		return err
	})
	// A reset host's Node would stay NotReady for good: remove it, while
	// the API server is there (init's rollback comes after this one).
	if cs, aerr := c.api(ctx); aerr == nil && cs != nil {
		for _, h := range hosts {
			c.journal.record(title, HostAPI, "api", "delete Node "+h.name())
			dctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			derr := cs.CoreV1().Nodes().Delete(dctx, h.name(), metav1.DeleteOptions{})
			cancel()
			if derr != nil && !apierrors.IsNotFound(derr) {
				c.o.UI.Warnf("delete Node %s: %v", h.name(), derr)
			}
		}
	}
	c.forget()
	return err
}
