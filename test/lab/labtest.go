// Package labtest gives integration tests and benchmarks lab nodes of their
// own (internal/lab): real sshd hosts in network namespaces, torn down when
// the test ends.
//
// Every test lab takes a free "slot" N (1..99): prefix ktN, bridge ktN-br0,
// subnet 198.19.N.0/24, so that tests of several packages running at once,
// and a user's own lab (prefix kpfree, 198.18.0.0/24), never collide. A slot
// is held by an abstract unix socket, which the kernel frees when the test
// process dies, however it dies.
package labtest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kpfree/kpfree/internal/lab"
)

// Skip skips tb unless lab nodes can run here: as root, without -short.
func Skip(tb testing.TB) {
	tb.Helper()
	if testing.Short() {
		tb.Skip("lab integration test: skipped with -short")
	}
	if os.Geteuid() != 0 {
		tb.Skip("lab integration test: needs root")
	}
}

// Options claims a free slot for tb and returns lab options for it: nodes
// nodes, a state dir under tb.TempDir(), the slot's prefix, bridge and
// subnet, and progress lines to tb.Logf. The slot is released at cleanup.
func Options(tb testing.TB, nodes int) lab.Options {
	tb.Helper()
	Skip(tb)
	for n := 1; n <= 99; n++ {
		prefix := fmt.Sprintf("kt%d", n)
		l, err := net.Listen("unix", "@kpfree-labtest-"+prefix)
		if err != nil {
			continue // another test process holds it
		}
		if left := lab.Leftovers(prefix); len(left) > 0 {
			l.Close() // remains of a crashed run: leave them for a human to see
			tb.Logf("labtest: slot %s has leftovers, skipping it: %s", prefix, strings.Join(left, ", "))
			continue
		}
		tb.Cleanup(func() { l.Close() })
		return lab.Options{
			Nodes:  nodes,
			Dir:    filepath.Join(tb.TempDir(), "lab"),
			Prefix: prefix,
			Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 19, byte(n), 0}), 24),
			Logf:   tb.Logf,
		}
	}
	tb.Fatal("labtest: no free lab slot (kt1..kt99)")
	return lab.Options{}
}

// KubernetesOptions is Options for Kubernetes nodes (lab.Options.Kubernetes):
// the binaries of make k8s-binaries and the image set of make images, which
// it brings up to date (once per test process) with lab.BuildImages.
func KubernetesOptions(tb testing.TB, nodes int) lab.Options {
	tb.Helper()
	o := Options(tb, nodes)
	o.Kubernetes = true
	o.K8sBinDir = lab.DefaultK8sBinDir(lab.DefaultKubernetesVersion)
	o.Images = lab.DefaultImages(lab.DefaultKubernetesVersion)
	for _, b := range lab.KubernetesBinaries {
		if _, err := os.Stat(filepath.Join(o.K8sBinDir, b)); err != nil {
			tb.Fatalf("labtest: %v: run make k8s-binaries first", err)
		}
	}
	imagesOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		t0 := time.Now()
		imagesErr = lab.BuildImages(ctx, o.K8sBinDir, o.Images)
		tb.Logf("labtest: images %s ready in %s", o.Images, time.Since(t0).Round(time.Millisecond))
	})
	if imagesErr != nil {
		tb.Fatalf("labtest: %v", imagesErr)
	}
	return o
}

var (
	imagesOnce sync.Once
	imagesErr  error
)

// NewKubernetes builds a lab of nodes Kubernetes nodes for tb (see
// KubernetesOptions) and removes it when tb ends, failing tb if anything is
// left behind.
func NewKubernetes(tb testing.TB, nodes int) *lab.State {
	tb.Helper()
	return Up(tb, KubernetesOptions(tb, nodes))
}

// New builds a lab of nodes nodes for tb (see Options) and removes it when tb
// ends, failing tb if anything is left behind.
func New(tb testing.TB, nodes int) *lab.State {
	tb.Helper()
	o := Options(tb, nodes)
	return Up(tb, o)
}

// Up builds the lab o describes and registers its removal with tb.
func Up(tb testing.TB, o lab.Options) *lab.State {
	tb.Helper()
	timeout := 2 * time.Minute
	if o.Kubernetes {
		timeout = 10 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tb.Cleanup(func() { Down(tb, o) })
	s, err := lab.Up(ctx, o)
	if err != nil {
		tb.Fatalf("lab up: %v", err)
	}
	return s
}

// Down removes the lab o describes and fails tb if anything is left behind.
// It is safe to call more than once.
func Down(tb testing.TB, o lab.Options) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := lab.Down(ctx, o.Dir); err != nil {
		tb.Errorf("lab down: %v", err)
	}
	if left := lab.Leftovers(o.Prefix); len(left) > 0 {
		tb.Errorf("lab down left: %s", strings.Join(left, ", "))
	}
}

// KpfreeBin returns the kpfree binary under test: $KPFREE_BIN (make sets
// it), else one built from this source tree into tb's temp dir.
func KpfreeBin(tb testing.TB) string {
	tb.Helper()
	if p := os.Getenv("KPFREE_BIN"); p != "" {
		return p
	}
	p := filepath.Join(tb.TempDir(), "kpfree")
	if out, err := exec.Command("go", "build", "-o", p, "github.com/kpfree/kpfree/cmd/kpfree").CombinedOutput(); err != nil {
		tb.Fatalf("build kpfree: %v\n%s", err, out)
	}
	return p
}
