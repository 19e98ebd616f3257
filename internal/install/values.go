package install

import (
	"helm.sh/helm/v3/pkg/chartutil"
)

// Values are the chart values kpfree sets. A zero field keeps the chart's
// default (templates/kpfree-agent/values.yaml); Options.ExtraValues sets
// anything else.
type Values struct {
	// APIServerHost and APIServerPort are where the agent reaches the API
	// server directly (k8sServiceHost, k8sServicePort): an IP address or a
	// name the nodes resolve without cluster DNS. Required in strict mode.
	APIServerHost string
	APIServerPort int
	// Strict is the kube-proxy replacement mode (default true); false runs
	// the agent beside kube-proxy.
	Strict *bool

	Image Image

	// CgroupMount is the host's cgroup2 mount (default /sys/fs/cgroup; on a
	// hybrid cgroup v1 host /sys/fs/cgroup/unified). CgroupRoot is the
	// directory the socket programs attach to, CgroupMount or below it; it
	// may contain $(NODE_NAME) (default: CgroupMount).
	CgroupMount string
	CgroupRoot  string
	// BPFFS is the host's BPF filesystem (default /sys/fs/bpf).
	BPFFS string

	ForceProgAttach bool
	ProxyName       string
	// Devices, NodePortRange (FIRST-LAST) and LBAlgorithm (random or maglev)
	// configure NodePort.
	Devices       []string
	NodePortRange string
	LBAlgorithm   string
	HealthPort    int

	// Privileged runs the agent as a privileged container (kernels < 5.8,
	// or when the agent must mount bpffs itself). RaiseMemlock adds
	// CAP_SYS_RESOURCE (kernels < 5.11).
	Privileged   bool
	RaiseMemlock bool

	ExtraArgs []string
}

// Image is the agent's image. Empty fields keep the chart's defaults:
// ghcr.io/kpfree/kpfree-agent:<appVersion>, IfNotPresent.
type Image struct {
	Repository string
	Tag        string
	Digest     string
	// PullPolicy: Always, IfNotPresent or Never (an image imported into
	// containerd, as in the lab).
	PullPolicy string
}

// Bool returns a pointer to b, for Values.Strict.
func Bool(b bool) *bool { return &b }

// Map returns the chart values v sets.
func (v Values) Map() map[string]any {
	m := map[string]any{}
	setString := func(m map[string]any, k, s string) {
		if s != "" {
			m[k] = s
		}
	}
	setString(m, "k8sServiceHost", v.APIServerHost)
	if v.APIServerPort != 0 {
		m["k8sServicePort"] = v.APIServerPort
	}
	if v.Strict != nil {
		m["strict"] = *v.Strict
	}
	img := map[string]any{}
	setString(img, "repository", v.Image.Repository)
	setString(img, "tag", v.Image.Tag)
	setString(img, "digest", v.Image.Digest)
	setString(img, "pullPolicy", v.Image.PullPolicy)
	if len(img) > 0 {
		m["image"] = img
	}
	setString(m, "cgroupMount", v.CgroupMount)
	setString(m, "cgroupRoot", v.CgroupRoot)
	if v.CgroupMount != "" && v.CgroupRoot == "" {
		m["cgroupRoot"] = v.CgroupMount
	}
	setString(m, "bpffs", v.BPFFS)
	if v.ForceProgAttach {
		m["forceProgAttach"] = true
	}
	setString(m, "proxyName", v.ProxyName)
	if len(v.Devices) > 0 {
		m["devices"] = toAny(v.Devices)
	}
	setString(m, "nodePortRange", v.NodePortRange)
	setString(m, "lbAlgorithm", v.LBAlgorithm)
	if v.HealthPort != 0 {
		m["healthPort"] = v.HealthPort
	}
	if v.Privileged {
		m["privileged"] = true
	}
	if v.RaiseMemlock {
		m["raiseMemlock"] = true
	}
	if len(v.ExtraArgs) > 0 {
		m["extraArgs"] = toAny(v.ExtraArgs)
	}
	return m
}

func toAny(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}

// values merges extra over the typed values: extra wins.
func values(v Values, extra map[string]any) map[string]any {
	base := v.Map()
	if len(extra) == 0 {
		return base
	}
	// CoalesceTables(dst, src) keeps dst's values and fills in from src; it
	// changes dst, so work on a copy.
	out := chartutil.CoalesceTables(deepCopy(extra), base)
	return out
}

func deepCopy(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		switch t := v.(type) {
		case map[string]any:
			out[k] = deepCopy(t)
		case []any:
			out[k] = append([]any(nil), t...)
		default:
			out[k] = v
		}
	}
	return out
}
