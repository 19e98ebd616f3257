package install

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestValuesMap(t *testing.T) {
	for _, tc := range []struct {
		name string
		v    Values
		want map[string]any
	}{
		{"zero keeps the chart defaults", Values{}, map[string]any{}},
		{"lab", Values{
			APIServerHost: "198.18.0.11", APIServerPort: 6443,
			Image:       Image{Repository: "localhost/kpfree-agent", Tag: "dev", PullPolicy: "Never"},
			CgroupMount: "/sys/fs/cgroup/unified", CgroupRoot: "/sys/fs/cgroup/unified/kpfree-lab/$(NODE_NAME)",
			Devices: []string{"eth0"}, LBAlgorithm: "maglev", RaiseMemlock: true,
		}, map[string]any{
			"k8sServiceHost": "198.18.0.11", "k8sServicePort": 6443,
			"image":       map[string]any{"repository": "localhost/kpfree-agent", "tag": "dev", "pullPolicy": "Never"},
			"cgroupMount": "/sys/fs/cgroup/unified", "cgroupRoot": "/sys/fs/cgroup/unified/kpfree-lab/$(NODE_NAME)",
			"devices": []any{"eth0"}, "lbAlgorithm": "maglev", "raiseMemlock": true,
		}},
		{"cgroup root defaults to the mount", Values{CgroupMount: "/sys/fs/cgroup/unified"},
			map[string]any{"cgroupMount": "/sys/fs/cgroup/unified", "cgroupRoot": "/sys/fs/cgroup/unified"}},
		{"non-strict", Values{Strict: Bool(false)}, map[string]any{"strict": false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if d := cmp.Diff(tc.want, tc.v.Map()); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}

func TestValuesExtraWins(t *testing.T) {
	v := Values{APIServerHost: "198.18.0.11", Image: Image{Tag: "dev", PullPolicy: "Never"}}
	extra := map[string]any{
		"image":     map[string]any{"tag": "other"},
		"resources": map[string]any{"limits": map[string]any{"memory": "1Gi"}},
	}
	got := values(v, extra)
	want := map[string]any{
		"k8sServiceHost": "198.18.0.11",
		"image":          map[string]any{"tag": "other", "pullPolicy": "Never"},
		"resources":      map[string]any{"limits": map[string]any{"memory": "1Gi"}},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
	if _, ok := extra["image"].(map[string]any)["pullPolicy"]; ok {
		t.Error("merge changed the caller's ExtraValues")
	}
}

// TestRender renders through the typed values, as kpfree does for a dry run
// before the cluster exists.
func TestRender(t *testing.T) {
	res, err := Render(Options{Values: Values{
		APIServerHost: "198.18.0.11",
		Image:         Image{Repository: "localhost/kpfree-agent", Tag: "dev", PullPolicy: "Never"},
		CgroupMount:   "/sys/fs/cgroup/unified",
		CgroupRoot:    "/sys/fs/cgroup/unified/kpfree-lab/$(NODE_NAME)",
	}})
	if err != nil {
		t.Fatal(err)
	}
	if res.DaemonSet != "kpfree-agent" || res.Namespace != "kube-system" || res.Release != "kpfree-agent" {
		t.Errorf("result %+v", res)
	}
	for _, want := range []string{
		"image: localhost/kpfree-agent:dev", "imagePullPolicy: Never",
		"--cgroup-root=/run/kpfree/cgroupv2/kpfree-lab/$(NODE_NAME)", "--k8s-api-server=https://198.18.0.11:6443",
		"path: /sys/fs/cgroup/unified\n",
	} {
		if !strings.Contains(res.Manifest, want) {
			t.Errorf("manifest lacks %q", want)
		}
	}

	// Another release name: objects are named after it.
	res, err = Render(Options{ReleaseName: "lb", Values: Values{APIServerHost: "api.example"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.DaemonSet != "lb-kpfree-agent" {
		t.Errorf("DaemonSet %q", res.DaemonSet)
	}
}

func TestRenderRejects(t *testing.T) {
	for _, tc := range []struct {
		v    Values
		want string
	}{
		{Values{}, "/k8sServiceHost"},
		{Values{APIServerHost: "h", LBAlgorithm: "round-robin"}, "/lbAlgorithm"},
		{Values{APIServerHost: "h", APIServerPort: 70000}, "/k8sServicePort"},
		{Values{APIServerHost: "h", Image: Image{PullPolicy: "never"}}, "/image/pullPolicy"},
		{Values{APIServerHost: "h", CgroupRoot: "kpfree-lab"}, "/cgroupRoot"},
		{Values{APIServerHost: "h", NodePortRange: "40000-30000"}, "nodePortRange"},
	} {
		_, err := Render(Options{Values: tc.v})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %+v: error %v, want one naming %s", tc.v, err, tc.want)
		}
	}
}

func TestDaemonSetName(t *testing.T) {
	m := "---\n# Source: a.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n---\napiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\n"
	if got := daemonSetName(m); got != "agent" {
		t.Errorf("got %q", got)
	}
}

func TestShorten(t *testing.T) {
	inner := errors.New(`cannot patch "kpfree-agent" with kind DaemonSet: "" is invalid: patch: Invalid value: "{\"apiVersion\":\"apps/v1\",` + strings.Repeat("x", 300) + `}": quantities must match`)
	err := shorten(inner)
	want := `cannot patch "kpfree-agent" with kind DaemonSet: "" is invalid: patch: Invalid value: "...": quantities must match`
	if err.Error() != want {
		t.Errorf("got  %s\nwant %s", err, want)
	}
	if !errors.Is(err, inner) {
		t.Error("shorten lost the error chain")
	}
	if short := errors.New("short"); shorten(short) != short {
		t.Error("short error wrapped")
	}
}
