package bootstrap

import (
	"context"
	"fmt"
	"strings"

	"github.com/kpfree/kpfree/preflight"
)

// preflightStep runs kpfree's read-only host checks, with kubeadm, kubelet
// and a container runtime required, on every host that is not in the
// cluster yet.
type preflightStep struct{ c *cluster }

func (s *preflightStep) Title() string { return "Preflight checks" }

// allMembers reports whether every host is already where the inventory
// wants it (and so has nothing left to do).
func (c *cluster) allMembers(ctx context.Context) (bool, error) {
	m := c.members(ctx)
	if !m.Known {
		return false, m.Err
	}
	for _, h := range c.hosts {
		d, err := c.decide(ctx, h, m)
		if err != nil {
			return false, err
		}
		if !d.Skip {
			return false, nil
		}
	}
	return true, nil
}

// decide returns the decision for one host.
func (c *cluster) decide(ctx context.Context, h *host, m membership) (decision, error) {
	st, err := h.getState(ctx)
	if err != nil {
		return decision{}, err
	}
	if h == c.first {
		return decideInit(h.name(), st, m), nil
	}
	return decideJoin(h.name(), h.t.Role, st, m), nil
}

func (s *preflightStep) Skip(ctx context.Context) (string, bool, error) {
	ok, err := s.c.allMembers(ctx)
	if err != nil || !ok {
		return "", false, err
	}
	return "every host is already in the cluster", true, nil
}

func (s *preflightStep) Run(ctx context.Context) error    { return s.check(ctx) }
func (s *preflightStep) DryRun(ctx context.Context) error { return s.check(ctx) }

func (s *preflightStep) check(ctx context.Context) error {
	c := s.c
	m := c.members(ctx)
	var hosts []preflight.Host
	resetting := map[string]bool{}
	for _, h := range c.hosts {
		d, err := c.decide(ctx, h, m)
		if err == nil && d.Skip {
			continue
		}
		if err == nil && d.Reset {
			resetting[h.name()] = true
		}
		hosts = append(hosts, preflight.Host{Exec: h.exec, Role: h.t.Role})
	}
	if len(hosts) == 0 {
		return nil
	}
	rep, err := c.o.Preflight(ctx, hosts, preflight.Options{RequireKubeBinaries: true, Parallel: c.o.Concurrency})
	if err != nil && len(rep.Findings) == 0 {
		return err
	}
	var fails []string
	for _, f := range rep.Findings {
		// A host about to be reset still runs the kubelet (and maybe a
		// control plane) of the earlier attempt: its ports are expected to
		// be in use.
		if f.Check == preflight.CheckPorts && f.Status == preflight.Fail && resetting[f.Host] {
			f.Status = preflight.Warn
			f.Seen += " (an earlier attempt's; kubeadm reset -f runs first)"
		}
		switch f.Status {
		case preflight.Pass:
			continue
		case preflight.Warn:
			c.o.UI.Warnf("%s: %s: %s", f.Host, f.Check, f.Seen)
		default:
			line := fmt.Sprintf("%s: %s: %s", f.Host, f.Check, f.Seen)
			if f.Remedy != "" {
				line += " -> " + f.Remedy
			}
			fails = append(fails, line)
		}
		c.preflight = append(c.preflight, f)
	}
	if len(fails) > 0 {
		return fmt.Errorf("%d preflight checks failed (see `kpfree preflight --require-kube-binaries`):\n  - %s", len(fails), strings.Join(fails, "\n  - "))
	}
	return err
}
