package model_test

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/slim"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

// input is one testdata/*.yaml: Kubernetes objects (multi-document YAML) and
// the model options, given in a leading comment
// "# kpfree: node=X proxy-name=Y node-addrs=A,B loopback-nodeport lb=maglev".
type input struct {
	svcs     []*corev1.Service
	slices   []*discoveryv1.EndpointSlice
	nodeName string
	opts     model.Options
}

var optLine = regexp.MustCompile(`(?m)^# kpfree:(.*)$`)

func readInput(t *testing.T, path string) input {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var in input
	if m := optLine.FindSubmatch(data); m != nil {
		for _, kv := range strings.Fields(string(m[1])) {
			k, v, _ := strings.Cut(kv, "=")
			switch k {
			case "node":
				in.nodeName = v
			case "proxy-name":
				in.opts.ProxyName = v
			case "node-addrs":
				for _, a := range strings.Split(v, ",") {
					in.opts.NodeAddrs = append(in.opts.NodeAddrs, netip.MustParseAddr(a))
				}
			case "loopback-nodeport":
				in.opts.LoopbackNodePort = true
			case "lb":
				in.opts.LBAlgorithm = v
			default:
				t.Fatalf("%s: unknown option %q", path, k)
			}
		}
	}
	r := k8syaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("%s: document %d: %v", path, i, err)
		}
		var tm struct{ APIVersion, Kind string }
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			t.Fatalf("%s: document %d: %v", path, i, err)
		}
		switch tm.APIVersion + "/" + tm.Kind {
		case "/":
			continue // comments only
		case "v1/Service":
			var s corev1.Service
			if err := yaml.UnmarshalStrict(doc, &s); err != nil {
				t.Fatalf("%s: document %d: %v", path, i, err)
			}
			in.svcs = append(in.svcs, &s)
		case "discovery.k8s.io/v1/EndpointSlice":
			var es discoveryv1.EndpointSlice
			if err := yaml.UnmarshalStrict(doc, &es); err != nil {
				t.Fatalf("%s: document %d: %v", path, i, err)
			}
			in.slices = append(in.slices, &es)
		default:
			t.Fatalf("%s: document %d: unexpected %s %s", path, i, tm.APIVersion, tm.Kind)
		}
	}
	return in
}

// render runs the model, programs a Fake with the result and returns the
// Fake's dump plus the warnings.
func render(t *testing.T, in input) string {
	t.Helper()
	res := model.Build(slim.Services(in.svcs), slim.EndpointSlices(in.slices), in.nodeName, in.opts)
	fake := lbmap.NewFake(lbmap.Capacity{})
	if err := fake.Sync(res.Services()); err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if err := fake.Verify(); err != nil {
		t.Fatalf("Verify: %v", err)
	}
	dump, err := fake.Dump()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	b.WriteString("# maps\n")
	b.WriteString(lbmap.Format(dump))
	b.WriteString("# entries\n")
	for _, e := range res.Entries {
		port := e.PortName
		if port == "" {
			port = `""`
		}
		fmt.Fprintf(&b, "%s %s port=%s kind=%s\n", e.LB.Frontend, e.Service, port, e.Kind)
	}
	if len(res.HealthChecks) > 0 {
		b.WriteString("# health checks\n")
		for _, h := range res.HealthChecks {
			fmt.Fprintf(&b, "%s port=%d local-endpoints=%d\n", h.Service, h.Port, h.LocalEndpoints)
		}
	}
	if len(res.Warnings) > 0 {
		b.WriteString("# warnings\n")
		for _, w := range res.Warnings {
			fmt.Fprintf(&b, "%s (uid=%q generation=%d)\n", w, w.Service.UID, w.Generation)
		}
	}

	// Idempotent: the same desired state again writes nothing.
	before := fake.Writes()
	if err := fake.Sync(model.Build(slim.Services(in.svcs), slim.EndpointSlices(in.slices), in.nodeName, in.opts).Services()); err != nil {
		t.Fatal(err)
	}
	if n := fake.Writes() - before; n != 0 {
		t.Errorf("second Sync of the same input wrote %d entries", n)
	}
	return b.String()
}

func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 15 {
		t.Fatalf("only %d golden cases", len(files))
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		t.Run(name, func(t *testing.T) {
			in := readInput(t, f)
			got := render(t, in)
			golden := strings.TrimSuffix(f, ".yaml") + ".golden"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./agent/model -update)", err)
			}
			if d := cmp.Diff(string(want), got); d != "" {
				t.Errorf("%s differs (-want +got); run with -update if intended:\n%s", golden, d)
			}

			// Input order does not matter.
			rng := rand.New(rand.NewPCG(1, 2))
			for range 5 {
				shuffled := input{
					svcs:     append([]*corev1.Service(nil), in.svcs...),
					slices:   append([]*discoveryv1.EndpointSlice(nil), in.slices...),
					nodeName: in.nodeName, opts: in.opts,
				}
				rng.Shuffle(len(shuffled.svcs), func(i, j int) { shuffled.svcs[i], shuffled.svcs[j] = shuffled.svcs[j], shuffled.svcs[i] })
				rng.Shuffle(len(shuffled.slices), func(i, j int) {
					shuffled.slices[i], shuffled.slices[j] = shuffled.slices[j], shuffled.slices[i]
				})
				if again := render(t, shuffled); again != got {
					t.Fatalf("shuffled input gives another result:\n%s", cmp.Diff(got, again))
				}
			}
		})
	}
}
