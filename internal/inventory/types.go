// Package inventory reads and validates hosts.yaml: the cluster settings and
// the hosts kpfree reaches over SSH. Parsing is strict: an unknown field, a
// duplicate host or a bad CIDR is an error that names the file, the line and
// the field.
package inventory

import (
	"strings"
	"time"
)

// APIVersion and Kind are the values hosts.yaml must declare at the top.
const (
	APIVersion = "kpfree.io/v1alpha1"
	Kind       = "Inventory"
)

// Role is what a host does in the cluster.
type Role string

const (
	RoleControlPlane Role = "control-plane"
	RoleWorker       Role = "worker"
)

// Inventory is a parsed, validated hosts.yaml.
//
// The yaml tags name the fields of the file; Parse reads them with its own
// strict decoder and Marshal writes them with goccy/go-yaml.
type Inventory struct {
	// Path is the file the inventory was read from ("" when parsed from bytes).
	Path       string  `yaml:"-"`
	APIVersion string  `yaml:"apiVersion"`
	Kind       string  `yaml:"kind"`
	Cluster    Cluster `yaml:"cluster"`
	SSH        SSH     `yaml:"ssh"`
	Hosts      []Host  `yaml:"hosts"`
}

// Cluster holds the settings kubeadm and the agent need.
type Cluster struct {
	Name                 string `yaml:"name,omitempty"`
	KubernetesVersion    string `yaml:"kubernetesVersion,omitempty"`
	PodCIDR              string `yaml:"podCIDR,omitempty"`
	ServiceCIDR          string `yaml:"serviceCIDR,omitempty"`
	ControlPlaneEndpoint string `yaml:"controlPlaneEndpoint,omitempty"`
}

// SSH holds the connection defaults shared by every host.
type SSH struct {
	User              string    `yaml:"user,omitempty"`
	Port              int       `yaml:"port,omitempty"`
	IdentityFile      string    `yaml:"identityFile,omitempty"`
	UseAgent          *bool     `yaml:"useAgent,omitempty"`
	KnownHostsFile    string    `yaml:"knownHostsFile,omitempty"`
	AcceptNewHostKeys bool      `yaml:"acceptNewHostKeys,omitempty"`
	ConnectTimeout    Duration  `yaml:"connectTimeout,omitempty"`
	CommandTimeout    Duration  `yaml:"commandTimeout,omitempty"`
	Bastion           *Endpoint `yaml:"bastion,omitempty"`
}

// Endpoint is an SSH server other than a cluster host (a bastion).
type Endpoint struct {
	Address      string `yaml:"address"`
	Port         int    `yaml:"port,omitempty"`
	User         string `yaml:"user,omitempty"`
	IdentityFile string `yaml:"identityFile,omitempty"`
}

// Host is one machine of the cluster. Port, User, IdentityFile and Bastion
// override the shared ssh: defaults.
type Host struct {
	Name         string    `yaml:"name"`
	Address      string    `yaml:"address"`
	Role         Role      `yaml:"role"`
	Port         int       `yaml:"port,omitempty"`
	User         string    `yaml:"user,omitempty"`
	IdentityFile string    `yaml:"identityFile,omitempty"`
	Bastion      *Endpoint `yaml:"bastion,omitempty"`
	// Line is where the host starts in the file, for error messages.
	Line int `yaml:"-"`
}

// Duration is a time.Duration written as "10s" in YAML.
type Duration struct{ time.Duration }

// MarshalYAML writes the duration as Go duration text without zero units
// ("10s", "20m", "1h30m").
func (d Duration) MarshalYAML() (any, error) {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s, nil
}

// Target is everything needed to open an SSH session to one host, with the
// shared defaults and the host's overrides merged.
type Target struct {
	Name              string
	Address           string
	Role              Role // "" for a bastion
	Port              int
	User              string
	IdentityFile      string // "" means: ssh-agent only
	UseAgent          bool
	KnownHostsFile    string
	AcceptNewHostKeys bool
	ConnectTimeout    time.Duration
	CommandTimeout    time.Duration
	Bastion           *Target // nil for a direct connection
}
