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
	"path/filepath"
	"strings"
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
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
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
