package inventory

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Defaults for the fields hosts.yaml may leave out.
const (
	DefaultClusterName       = "kpfree"
	DefaultKubernetesVersion = "v1.34.4"
	DefaultPodCIDR           = "10.244.0.0/16"
	DefaultServiceCIDR       = "10.96.0.0/12"
	DefaultAPIServerPort     = 6443
	DefaultUser              = "root"
	DefaultPort              = 22
	DefaultKnownHostsFile    = "~/.ssh/known_hosts"
	DefaultConnectTimeout    = 10 * time.Second
	DefaultCommandTimeout    = 10 * time.Minute
)

// applyDefaults fills what the file left out and makes file paths absolute:
// a leading "~/" is $HOME, a relative path is relative to the directory of
// the inventory file name. It runs after validate, so the hosts are sound.
func (d *decoder) applyDefaults(inv *Inventory, name string) {
	c := &inv.Cluster
	setDefault(&c.Name, DefaultClusterName)
	setDefault(&c.KubernetesVersion, DefaultKubernetesVersion)
	setDefault(&c.PodCIDR, DefaultPodCIDR)
	setDefault(&c.ServiceCIDR, DefaultServiceCIDR)
	apiPort := strconv.Itoa(DefaultAPIServerPort)
	switch {
	case c.ControlPlaneEndpoint == "":
		for _, h := range inv.Hosts {
			if h.Role == RoleControlPlane {
				c.ControlPlaneEndpoint = net.JoinHostPort(h.Address, apiPort)
				break
			}
		}
	case checkAddress(c.ControlPlaneEndpoint) == "": // a host without a port
		c.ControlPlaneEndpoint = net.JoinHostPort(c.ControlPlaneEndpoint, apiPort)
	}

	s := &inv.SSH
	setDefault(&s.User, DefaultUser)
	if s.Port == 0 {
		s.Port = DefaultPort
	}
	if s.UseAgent == nil {
		// The ssh layer skips the agent when SSH_AUTH_SOCK is unset.
		useAgent := true
		s.UseAgent = &useAgent
	}
	setDefault(&s.KnownHostsFile, DefaultKnownHostsFile)
	if s.ConnectTimeout.Duration == 0 {
		s.ConnectTimeout.Duration = DefaultConnectTimeout
	}
	if s.CommandTimeout.Duration == 0 {
		s.CommandTimeout.Duration = DefaultCommandTimeout
	}

	base := filepath.Dir(name)
	if abs, err := filepath.Abs(base); err == nil {
		base = abs
	}
	d.expand(&s.IdentityFile, "ssh.identityFile", base)
	d.expand(&s.KnownHostsFile, "ssh.knownHostsFile", base)
	d.defaultBastion(s.Bastion, "ssh.bastion", base)
	for i := range inv.Hosts {
		h := &inv.Hosts[i]
		p := fmt.Sprintf("hosts[%d]", i)
		d.expand(&h.IdentityFile, p+".identityFile", base)
		d.defaultBastion(h.Bastion, p+".bastion", base)
	}
}

// defaultBastion sets the port; user and identity file stay empty so that
// Targets gives the bastion the shared ssh: ones.
func (d *decoder) defaultBastion(b *Endpoint, field, base string) {
	if b == nil {
		return
	}
	if b.Port == 0 {
		b.Port = DefaultPort
	}
	d.expand(&b.IdentityFile, field+".identityFile", base)
}

func (d *decoder) expand(path *string, field, base string) {
	p := *path
	switch {
	case p == "":
		return
	case p == "~" || strings.HasPrefix(p, "~/"):
		home := os.Getenv("HOME")
		if home == "" {
			d.fieldf(field, "cannot expand %q: $HOME is not set", p)
			return
		}
		*path = filepath.Join(home, p[1:])
	case !filepath.IsAbs(p):
		*path = filepath.Join(base, p)
	}
}

func setDefault(s *string, def string) {
	if *s == "" {
		*s = def
	}
}
