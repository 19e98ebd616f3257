// Package inventory reads and validates hosts.yaml: the cluster settings and
// the hosts kpfree reaches over SSH. Parsing is strict: an unknown field, a
// duplicate host or a bad CIDR is an error that names the file, the line and
// the field.
package inventory

import "time"

// Role is what a host does in the cluster.
type Role string

const (
	RoleControlPlane Role = "control-plane"
	RoleWorker       Role = "worker"
)

// Inventory is a parsed, validated hosts.yaml.
type Inventory struct {
	// Path is the file the inventory was read from ("" when parsed from bytes).
	Path    string  `yaml:"-"`
	Cluster Cluster `yaml:"cluster"`
	SSH     SSH     `yaml:"ssh"`
	Hosts   []Host  `yaml:"hosts"`
}

// Cluster holds the settings kubeadm and the agent need.
type Cluster struct {
	Name                 string `yaml:"name"`
	KubernetesVersion    string `yaml:"kubernetesVersion"`
	PodCIDR              string `yaml:"podCIDR"`
	ServiceCIDR          string `yaml:"serviceCIDR"`
	ControlPlaneEndpoint string `yaml:"controlPlaneEndpoint"`
}

// SSH holds the connection defaults shared by every host.
type SSH struct {
	User              string    `yaml:"user"`
	Port              int       `yaml:"port"`
	IdentityFile      string    `yaml:"identityFile"`
	UseAgent          *bool     `yaml:"useAgent"`
	KnownHostsFile    string    `yaml:"knownHostsFile"`
	AcceptNewHostKeys bool      `yaml:"acceptNewHostKeys"`
	ConnectTimeout    Duration  `yaml:"connectTimeout"`
	CommandTimeout    Duration  `yaml:"commandTimeout"`
	Bastion           *Endpoint `yaml:"bastion"`
}

// Endpoint is an SSH server other than a cluster host (a bastion).
type Endpoint struct {
	Address      string `yaml:"address"`
	Port         int    `yaml:"port"`
	User         string `yaml:"user"`
	IdentityFile string `yaml:"identityFile"`
}

// Host is one machine of the cluster. Port, User, IdentityFile and Bastion
// override the shared ssh: defaults.
type Host struct {
	Name         string    `yaml:"name"`
	Address      string    `yaml:"address"`
	Role         Role      `yaml:"role"`
	Port         int       `yaml:"port"`
	User         string    `yaml:"user"`
	IdentityFile string    `yaml:"identityFile"`
	Bastion      *Endpoint `yaml:"bastion"`
	// Line is where the host starts in the file, for error messages.
	Line int `yaml:"-"`
}

// Duration is a time.Duration written as "10s" in YAML.
type Duration struct{ time.Duration }

// Target is everything needed to open an SSH session to one host, with the
// shared defaults and the host's overrides merged.
type Target struct {
	Name              string
	Address           string
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
