package templates

import (
	"bufio"
	"bytes"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/lint/support"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes/scheme"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden")

// required are the values without defaults.
func required() map[string]any {
	return map[string]any{"k8sServiceHost": "198.18.0.11"}
}

// render renders the embedded chart the way `helm template` does: client-only,
// no cluster. It returns the manifest and NOTES.txt.
func render(t *testing.T, vals map[string]any) (string, string, error) {
	t.Helper()
	ch, err := AgentChart()
	if err != nil {
		t.Fatal(err)
	}
	in := action.NewInstall(&action.Configuration{Log: func(string, ...any) {}})
	in.ClientOnly, in.DryRun, in.Replace = true, true, true
	in.ReleaseName, in.Namespace = "kpfree-agent", "kube-system"
	in.KubeVersion = &chartutil.KubeVersion{Version: "v1.34.4", Major: "1", Minor: "34"}
	rel, err := in.Run(ch, vals)
	if err != nil {
		return "", "", err
	}
	return rel.Manifest, rel.Info.Notes, nil
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if d := cmp.Diff(string(want), got); d != "" {
		t.Errorf("%s differs (-want +got, go test -update rewrites it):\n%s", path, d)
	}
}

// objects decodes a manifest strictly (unknown fields are errors) into typed objects.
func objects(t *testing.T, manifest string) map[string]runtime.Object {
	t.Helper()
	codecs := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict)
	dec := codecs.UniversalDeserializer()
	out := map[string]runtime.Object{}
	r := yaml.NewYAMLReader(bufio.NewReader(strings.NewReader(manifest)))
	for {
		doc, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, gvk, err := dec.Decode(doc, nil, nil)
		if err != nil {
			t.Fatalf("decode %s: %v", doc, err)
		}
		out[gvk.Kind] = obj
	}
	return out
}

func stripComments(b []byte) []byte {
	var out []byte
	for _, l := range bytes.Split(b, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(out, l...)
			out = append(out, '\n')
		}
	}
	return out
}

func TestAgentChartMetadata(t *testing.T) {
	ch, err := AgentChart()
	if err != nil {
		t.Fatal(err)
	}
	if ch.Name() != "kpfree-agent" || ch.Metadata.Version != "0.1.0" || ch.Metadata.APIVersion != "v2" || ch.AppVersion() == "" {
		t.Errorf("metadata: %+v", ch.Metadata)
	}
	var names []string
	for _, f := range ch.Templates {
		names = append(names, f.Name)
	}
	if !strings.Contains(strings.Join(names, " "), "templates/_helpers.tpl") {
		t.Errorf("_helpers.tpl not embedded (go:embed needs all:): %v", names)
	}
	if ch.Schema == nil {
		t.Error("values.schema.json not loaded")
	}
}

func TestRenderGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		vals map[string]any
	}{
		{"default", required()},
		{"lab", map[string]any{
			"k8sServiceHost": "198.18.0.11",
			"k8sServicePort": 6443,
			"image":          map[string]any{"repository": "localhost/kpfree-agent", "tag": "dev", "pullPolicy": "Never"},
			"cgroupMount":    "/sys/fs/cgroup/unified",
			"cgroupRoot":     "/sys/fs/cgroup/unified/kpfree-lab/$(NODE_NAME)",
			"devices":        []any{"eth0", "eth1"},
			"nodePortRange":  "30000-30100",
			"lbAlgorithm":    "random",
			"proxyName":      "kpfree",
			"raiseMemlock":   true,
			"extraArgs":      []any{"--v=2"},
			"resources":      map[string]any{"requests": map[string]any{"cpu": "50m"}, "limits": map[string]any{"memory": "512Mi"}},
			"podAnnotations": map[string]any{"example.com/note": "lab"},
		}},
		{"privileged-ipv6", map[string]any{
			"k8sServiceHost":  "fd00::11",
			"privileged":      true,
			"forceProgAttach": true,
			"image":           map[string]any{"digest": "sha256:" + strings.Repeat("ab", 32)},
			"dnsPolicy":       "Default",
			"maxUnavailable":  "10%",
		}},
		{"non-strict", map[string]any{"strict": false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			manifest, notes, err := render(t, tc.vals)
			if err != nil {
				t.Fatal(err)
			}
			golden(t, tc.name+".golden", manifest+"\n# NOTES.txt\n"+commentLines(notes))
			objs := objects(t, manifest)
			for _, kind := range []string{"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "DaemonSet"} {
				if objs[kind] == nil {
					t.Errorf("no %s rendered", kind)
				}
			}
		})
	}
}

func commentLines(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(strings.TrimRight("# "+l, " ") + "\n")
	}
	return b.String()
}

// TestRenderDaemonSet checks the properties the agent relies on, beyond the golden file.
func TestRenderDaemonSet(t *testing.T) {
	manifest, _, err := render(t, map[string]any{
		"k8sServiceHost": "198.18.0.11",
		"cgroupMount":    "/sys/fs/cgroup/unified",
		"cgroupRoot":     "/sys/fs/cgroup/unified/kpfree-lab/$(NODE_NAME)",
	})
	if err != nil {
		t.Fatal(err)
	}
	objs := objects(t, manifest)
	ds := objs["DaemonSet"].(*appsv1.DaemonSet)
	pod := ds.Spec.Template.Spec
	c := pod.Containers[0]
	if !pod.HostNetwork || pod.HostPID || pod.DNSPolicy != corev1.DNSClusterFirstWithHostNet || pod.PriorityClassName != "system-node-critical" {
		t.Errorf("pod spec: hostNetwork %v hostPID %v dns %s priority %s", pod.HostNetwork, pod.HostPID, pod.DNSPolicy, pod.PriorityClassName)
	}
	if len(pod.Tolerations) != 1 || pod.Tolerations[0].Operator != corev1.TolerationOpExists || pod.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v: want one Exists toleration for every taint", pod.Tolerations)
	}
	if u := ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate.MaxUnavailable.IntValue() != 1 || u.RollingUpdate.MaxSurge.IntValue() != 0 {
		t.Errorf("update strategy %+v", u)
	}
	wantArgs := []string{"run", "--k8s-api-server=https://198.18.0.11:6443", "--node-name=$(NODE_NAME)",
		"--cgroup-root=/run/kpfree/cgroupv2/kpfree-lab/$(NODE_NAME)", "--bpffs=/sys/fs/bpf", "--strict=true",
		"--force-prog-attach=false", "--health-addr=:9876", "--nodeport=true", "--proc-sys=/host/proc/sys",
		"--nodeport-range=30000-32767", "--lb-algorithm=random", "--lb-map-max=65536", "--ct-map-max=131072"}
	if d := cmp.Diff(wantArgs, c.Args); d != "" {
		t.Errorf("args (-want +got):\n%s", d)
	}
	if c.Env[0].Name != "NODE_NAME" || c.Env[0].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("env %+v", c.Env)
	}
	sc := c.SecurityContext
	if *sc.Privileged || *sc.AllowPrivilegeEscalation {
		t.Error("privileged or privilege escalation by default")
	}
	if d := cmp.Diff([]corev1.Capability{"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"}, sc.Capabilities.Add); d != "" {
		t.Errorf("capabilities (-want +got):\n%s", d)
	}
	if d := cmp.Diff([]corev1.Capability{"ALL"}, sc.Capabilities.Drop); d != "" {
		t.Errorf("dropped capabilities (-want +got):\n%s", d)
	}
	if c.ReadinessProbe.HTTPGet.Path != "/readyz" || c.LivenessProbe.HTTPGet.Path != "/healthz" || c.Ports[0].ContainerPort != 9876 {
		t.Error("probes or health port wrong")
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m
	}
	hostPaths := map[string]string{}
	for _, v := range pod.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
	}
	if m := mounts["bpffs"]; m.MountPath != "/sys/fs/bpf" || *m.MountPropagation != corev1.MountPropagationHostToContainer || hostPaths["bpffs"] != "/sys/fs/bpf" {
		t.Errorf("bpffs mount %+v from %s", m, hostPaths["bpffs"])
	}
	if m := mounts["cgroup2"]; !m.ReadOnly || m.MountPath != "/run/kpfree/cgroupv2" || hostPaths["cgroup2"] != "/sys/fs/cgroup/unified" {
		t.Errorf("cgroup2 mount %+v from %s", m, hostPaths["cgroup2"])
	}
	if m := mounts["host-proc-sys-net"]; m.ReadOnly || hostPaths["host-proc-sys-net"] != "/proc/sys/net" {
		t.Errorf("/proc/sys/net mount %+v", m)
	}

	// Privileged: Bidirectional bpffs (only allowed for privileged containers), no capability list.
	manifest, _, err = render(t, map[string]any{"k8sServiceHost": "api.example", "privileged": true})
	if err != nil {
		t.Fatal(err)
	}
	c = objects(t, manifest)["DaemonSet"].(*appsv1.DaemonSet).Spec.Template.Spec.Containers[0]
	if !*c.SecurityContext.Privileged || c.SecurityContext.AllowPrivilegeEscalation != nil || c.SecurityContext.Capabilities != nil {
		t.Errorf("privileged security context %+v", c.SecurityContext)
	}
	for _, m := range c.VolumeMounts {
		if m.Name == "bpffs" && *m.MountPropagation != corev1.MountPropagationBidirectional {
			t.Errorf("privileged bpffs propagation %s", *m.MountPropagation)
		}
	}
}

func TestRenderClusterRoleLeastPrivilege(t *testing.T) {
	manifest, _, err := render(t, required())
	if err != nil {
		t.Fatal(err)
	}
	cr := objects(t, manifest)["ClusterRole"].(*rbacv1.ClusterRole)
	allowed := map[string]bool{}
	for _, r := range cr.Rules {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					allowed[g+"/"+res+":"+v] = true
				}
			}
		}
	}
	want := map[string]bool{}
	for _, s := range []string{"/services", "/nodes", "discovery.k8s.io/endpointslices"} {
		for _, v := range []string{"get", "list", "watch"} {
			want[s+":"+v] = true
		}
	}
	for _, s := range []string{"/events", "events.k8s.io/events"} {
		for _, v := range []string{"create", "patch"} {
			want[s+":"+v] = true
		}
	}
	if d := cmp.Diff(want, allowed); d != "" {
		t.Errorf("ClusterRole grants (-want +got):\n%s", d)
	}
}

// TestValuesRejected: bad values fail before anything is rendered, with a
// message that names the value.
func TestValuesRejected(t *testing.T) {
	for _, tc := range []struct {
		name string
		vals map[string]any
		want []string // all must appear in the error
	}{
		{"pull policy", map[string]any{"image": map[string]any{"pullPolicy": "Sometimes"}}, []string{"/image/pullPolicy", "IfNotPresent"}},
		{"host missing in strict mode", map[string]any{"k8sServiceHost": ""}, []string{"/k8sServiceHost", "minLength"}},
		{"host with scheme", map[string]any{"k8sServiceHost": "https://198.18.0.11"}, []string{"/k8sServiceHost"}},
		{"host with port", map[string]any{"k8sServiceHost": "api:6443"}, []string{"/k8sServiceHost"}},
		{"port zero", map[string]any{"k8sServicePort": 0}, []string{"/k8sServicePort", "minimum"}},
		{"port too big", map[string]any{"k8sServicePort": 65536}, []string{"/k8sServicePort", "maximum"}},
		{"port not a number", map[string]any{"k8sServicePort": "6443"}, []string{"/k8sServicePort", "integer"}},
		{"node port range format", map[string]any{"nodePortRange": "30000:32767"}, []string{"/nodePortRange"}},
		{"node port range reversed", map[string]any{"nodePortRange": "32767-30000"}, []string{"nodePortRange", "FIRST < LAST"}},
		{"node port range too high", map[string]any{"nodePortRange": "30000-70000"}, []string{"nodePortRange", "65535"}},
		{"lb algorithm", map[string]any{"lbAlgorithm": "round-robin"}, []string{"/lbAlgorithm", "maglev"}},
		{"resources type", map[string]any{"resources": "100m"}, []string{"/resources", "object"}},
		{"resources key", map[string]any{"resources": map[string]any{"request": map[string]any{}}}, []string{"/resources", "request"}},
		{"cgroup root relative", map[string]any{"cgroupRoot": "sys/fs/cgroup"}, []string{"/cgroupRoot"}},
		{"cgroup root dotdot", map[string]any{"cgroupRoot": "/sys/fs/cgroup/../.."}, []string{"/cgroupRoot"}},
		{"cgroup root outside mount", map[string]any{"cgroupMount": "/sys/fs/cgroup/unified", "cgroupRoot": "/sys/fs/cgroup/kpfree"}, []string{"cgroupRoot", "cgroupMount"}},
		{"bpffs relative", map[string]any{"bpffs": "bpf"}, []string{"/bpffs"}},
		{"unknown top-level key", map[string]any{"kubeProxyReplacement": "strict"}, []string{"kubeProxyReplacement", "additional properties"}},
		{"unknown image key", map[string]any{"image": map[string]any{"name": "x"}}, []string{"/image", "name"}},
		{"required key removed", map[string]any{"healthPort": nil}, []string{"healthPort", "missing"}},
		{"device name", map[string]any{"devices": []any{"eth0,eth1"}}, []string{"/devices/0"}},
		{"extra arg not a flag", map[string]any{"extraArgs": []any{"status"}}, []string{"/extraArgs/0"}},
		{"privileged type", map[string]any{"privileged": "yes"}, []string{"/privileged", "boolean"}},
		{"dns policy", map[string]any{"dnsPolicy": "ClusterFirst"}, []string{"/dnsPolicy"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			vals := required()
			for k, v := range tc.vals {
				vals[k] = v
			}
			_, _, err := render(t, vals)
			if err == nil {
				t.Fatalf("values %v accepted", tc.vals)
			}
			t.Logf("%v", err)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
		})
	}
}

// TestNonStrictWithoutHost: only strict mode needs the API server address.
func TestNonStrictWithoutHost(t *testing.T) {
	manifest, _, err := render(t, map[string]any{"strict": false})
	if err != nil {
		t.Fatal(err)
	}
	c := objects(t, manifest)["DaemonSet"].(*appsv1.DaemonSet).Spec.Template.Spec.Containers[0]
	for _, a := range c.Args {
		if strings.HasPrefix(a, "--k8s-api-server") {
			t.Errorf("non-strict without a host passes %s", a)
		}
	}
}

// TestLint is `helm lint --strict` through the SDK: no errors and no warnings.
func TestLint(t *testing.T) {
	l := action.NewLint()
	l.Strict = true
	l.Namespace = "kube-system"
	res := l.Run([]string{AgentChartDir}, required())
	for _, m := range res.Messages {
		if m.Severity > support.InfoSev {
			t.Errorf("lint: %s", m)
		} else {
			t.Logf("lint: %s", m)
		}
	}
	for _, err := range res.Errors {
		t.Errorf("lint: %v", err)
	}
	if res.TotalChartsLinted != 1 {
		t.Errorf("linted %d charts", res.TotalChartsLinted)
	}
}

// TestLintWithoutValues: the chart's own defaults lack the API server
// address, and lint says so (like `helm lint` without --set).
func TestLintWithoutValues(t *testing.T) {
	res := action.NewLint().Run([]string{AgentChartDir}, nil)
	if len(res.Errors) == 0 || !strings.Contains(res.Errors[0].Error(), "k8sServiceHost") {
		t.Errorf("lint without k8sServiceHost: %v", res.Errors)
	}
}
