package bootstrap

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"text/template"

	"sigs.k8s.io/yaml"

	"github.com/kpfree/kpfree/internal/inventory"
	"github.com/kpfree/kpfree/templates"
)

// kubeadm config API versions.
const (
	KubeadmV1beta3 = "kubeadm.k8s.io/v1beta3"
	KubeadmV1beta4 = "kubeadm.k8s.io/v1beta4"
)

// Where kpfree keeps its files on a host.
const (
	RemoteDir        = "/etc/kubernetes/kpfree"
	RemotePatchesDir = RemoteDir + "/patches"
	InitConfigPath   = RemoteDir + "/kubeadm-init.yaml"
	JoinConfigPath   = RemoteDir + "/kubeadm-join.yaml"
	AdminConfPath    = "/etc/kubernetes/admin.conf"
	KubeletConfPath  = "/etc/kubernetes/kubelet.conf"
	APIServerPath    = "/etc/kubernetes/manifests/kube-apiserver.yaml"
	DefaultAPIPort   = 6443
)

// DefaultCgroupDriver is the kubelet's cgroupDriver unless the kubelet
// configuration says otherwise: systemd, as kubeadm and containerd expect on
// systemd hosts.
const DefaultCgroupDriver = "systemd"

var versionRE = regexp.MustCompile(`^v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+].*)?$`)

// KubeadmAPIVersion returns the kubeadm config API for a Kubernetes version:
// v1beta4 from 1.31 on (where kubeadm introduced it), v1beta3 below (1.22 and
// later).
func KubeadmAPIVersion(kubernetesVersion string) (string, error) {
	m := versionRE.FindStringSubmatch(kubernetesVersion)
	if m == nil {
		return "", fmt.Errorf("kubernetes version %q: want vMAJOR.MINOR[.PATCH]", kubernetesVersion)
	}
	major, _ := strconv.Atoi(m[1])
	minor, _ := strconv.Atoi(m[2])
	switch {
	case major != 1:
		return "", fmt.Errorf("kubernetes version %q: only 1.x is supported", kubernetesVersion)
	case minor >= 31:
		return KubeadmV1beta4, nil
	case minor >= 22:
		return KubeadmV1beta3, nil
	}
	return "", fmt.Errorf("kubernetes version %q: kubeadm before 1.22 (config API v1beta2) is not supported", kubernetesVersion)
}

// ClusterConfig is what every host's kubeadm configuration shares.
type ClusterConfig struct {
	Name                 string
	KubernetesVersion    string
	ControlPlaneEndpoint string // host:port
	PodSubnet            string
	ServiceSubnet        string
	// CRISocket is the runtime endpoint (unix:///run/containerd/containerd.sock);
	// empty lets kubeadm detect it.
	CRISocket string
	// IgnorePreflightErrors are kubeadm preflight checks to ignore on init
	// and join (e.g. "SystemVerification"); kpfree's own preflight still runs.
	IgnorePreflightErrors []string
	// Kubelet is merged over the default KubeletConfiguration
	// (cgroupDriver: systemd): any kubelet.config.k8s.io/v1beta1 field, e.g.
	// {cgroupDriver: cgroupfs, failCgroupV1: false}. kubeadm stores it for
	// the whole cluster; per-host differences go in kubeadm patches.
	Kubelet map[string]any
	// Patches says whether a kubeadm patches directory is uploaded to the
	// hosts (RemotePatchesDir) and named in the configuration.
	Patches bool
}

// ClusterConfigFrom takes the cluster settings from an inventory.
func ClusterConfigFrom(inv *inventory.Inventory) ClusterConfig {
	c := inv.Cluster
	return ClusterConfig{
		Name:                 c.Name,
		KubernetesVersion:    c.KubernetesVersion,
		ControlPlaneEndpoint: c.ControlPlaneEndpoint,
		PodSubnet:            c.PodCIDR,
		ServiceSubnet:        c.ServiceCIDR,
	}
}

// LoadKubeletConfig reads a KubeletConfiguration fragment: a YAML mapping of
// kubelet.config.k8s.io/v1beta1 fields. apiVersion and kind may be present
// (a whole KubeletConfiguration document) and must then be the right ones.
func LoadKubeletConfig(path string) (map[string]any, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseKubeletConfig(data)
}

// ParseKubeletConfig parses a KubeletConfiguration fragment (see
// LoadKubeletConfig).
func ParseKubeletConfig(data []byte) (map[string]any, error) {
	m := map[string]any{}
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("kubelet configuration: %w", err)
	}
	if v, ok := m["apiVersion"]; ok && v != "kubelet.config.k8s.io/v1beta1" {
		return nil, fmt.Errorf("kubelet configuration: apiVersion %v: want kubelet.config.k8s.io/v1beta1", v)
	}
	if v, ok := m["kind"]; ok && v != "KubeletConfiguration" {
		return nil, fmt.Errorf("kubelet configuration: kind %v: want KubeletConfiguration", v)
	}
	delete(m, "apiVersion")
	delete(m, "kind")
	return m, nil
}

// kubeletDocument renders the KubeletConfiguration document: the defaults
// with c.Kubelet merged over them, keys sorted.
func (c ClusterConfig) kubeletDocument() (string, error) {
	merged := mergeMaps(map[string]any{"cgroupDriver": DefaultCgroupDriver}, c.Kubelet)
	body, err := yaml.Marshal(merged)
	if err != nil {
		return "", fmt.Errorf("kubelet configuration: %w", err)
	}
	return "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n" + string(body), nil
}

// mergeMaps returns base with over merged in: nested maps merge, anything
// else in over replaces base's value.
func mergeMaps(base, over map[string]any) map[string]any {
	out := make(map[string]any, len(base)+len(over))
	for k, v := range base {
		out[k] = v
	}
	for k, v := range over {
		if bm, ok := out[k].(map[string]any); ok {
			if om, ok := v.(map[string]any); ok {
				out[k] = mergeMaps(bm, om)
				continue
			}
		}
		out[k] = v
	}
	return out
}

// Arg is a kubelet command-line flag set through kubeletExtraArgs.
type Arg struct{ Name, Value string }

// JoinParams are the secrets and discovery data of a join.
type JoinParams struct {
	// APIServerEndpoint is host:port of the API server the node discovers
	// the cluster from (the controlPlaneEndpoint).
	APIServerEndpoint string
	Token             string
	CACertHashes      []string
	// CertificateKey decrypts the control-plane certificates uploaded by
	// kubeadm init --upload-certs; only for a control-plane join.
	CertificateKey string
}

type kubeadmData struct {
	ClusterConfig
	NodeName             string
	AdvertiseAddress     string
	BindPort             int
	KubeletExtraArgs     []Arg
	PatchesDir           string
	CertificateKey       string
	KubeletConfiguration string
	ControlPlane         bool
	APIServerEndpoint    string
	Token                string
	CACertHashes         []string
}

// nodeData fills what depends on the host: its name, and, when its address
// is an IP address, the kubelet's --node-ip and a control plane's API server
// advertise address.
func (c ClusterConfig) nodeData(host inventory.Target) kubeadmData {
	d := kubeadmData{ClusterConfig: c, NodeName: host.Name, BindPort: DefaultAPIPort}
	if a, err := netip.ParseAddr(host.Address); err == nil {
		d.KubeletExtraArgs = append(d.KubeletExtraArgs, Arg{"node-ip", a.String()})
		if host.Role == inventory.RoleControlPlane {
			d.AdvertiseAddress = a.String()
		}
	}
	// The API server listens on the endpoint's port when the endpoint is this
	// host itself (no load balancer in front).
	if h, p, err := net.SplitHostPort(c.ControlPlaneEndpoint); err == nil && h == host.Address {
		if n, err := strconv.Atoi(p); err == nil {
			d.BindPort = n
		}
	}
	if c.Patches {
		d.PatchesDir = RemotePatchesDir
	}
	return d
}

// RenderInit renders the configuration of `kubeadm init` on host (the first
// control plane): InitConfiguration (skipPhases addon/kube-proxy),
// ClusterConfiguration (proxy disabled where the API has it) and
// KubeletConfiguration. A non-empty certificateKey is used by
// --upload-certs for the other control planes.
func RenderInit(c ClusterConfig, host inventory.Target, certificateKey string) ([]byte, error) {
	d := c.nodeData(host)
	d.CertificateKey = certificateKey
	return render("init", d)
}

// RenderJoin renders the JoinConfiguration of host: a control plane when
// host.Role says so (then j.CertificateKey is required).
func RenderJoin(c ClusterConfig, host inventory.Target, j JoinParams) ([]byte, error) {
	d := c.nodeData(host)
	d.ControlPlane = host.Role == inventory.RoleControlPlane
	if d.ControlPlane && j.CertificateKey == "" {
		return nil, fmt.Errorf("join %s as a control plane: no certificate key", host.Name)
	}
	if j.Token == "" || len(j.CACertHashes) == 0 || j.APIServerEndpoint == "" {
		return nil, fmt.Errorf("join %s: token, CA certificate hash and API server endpoint are required", host.Name)
	}
	d.CertificateKey, d.APIServerEndpoint, d.Token, d.CACertHashes = j.CertificateKey, j.APIServerEndpoint, j.Token, j.CACertHashes
	return render("join", d)
}

func render(kind string, d kubeadmData) ([]byte, error) {
	api, err := KubeadmAPIVersion(d.KubernetesVersion)
	if err != nil {
		return nil, err
	}
	if kind == "init" {
		if d.KubeletConfiguration, err = d.kubeletDocument(); err != nil {
			return nil, err
		}
	}
	name := kind + "-" + strings.TrimPrefix(api, "kubeadm.k8s.io/") + ".yaml.tmpl"
	text, err := templates.KubeadmTemplate(name)
	if err != nil {
		return nil, err
	}
	t, err := template.New(name).Option("missingkey=error").Funcs(template.FuncMap{"q": strconv.Quote}).Parse(text)
	if err != nil {
		return nil, fmt.Errorf("kubeadm template %s: %w", name, err)
	}
	var b bytes.Buffer
	if err := t.Execute(&b, d); err != nil {
		return nil, fmt.Errorf("kubeadm template %s: %w", name, err)
	}
	return b.Bytes(), nil
}
