//go:build linux

package preflight

import (
	"errors"
	"os"
	"testing"

	"github.com/cilium/ebpf"
)

// TestProbeSockAddrRejects checks the probe tells "unknown attach type" from
// "supported": an attach type that is not a sock_addr hook must come back
// as not supported, not as present or inconclusive.
func TestProbeSockAddrRejects(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("loading BPF programs needs root")
	}
	if err := probeSockAddr(ebpf.AttachCGroupInet4Connect); err != nil {
		t.Skipf("connect4 does not load here (%v): nothing to compare against", err)
	}
	err := probeSockAddr(ebpf.AttachCGroupInetIngress)
	if !errors.Is(err, ebpf.ErrNotSupported) {
		t.Errorf("probe of a non-sock_addr attach type: %v, want ErrNotSupported", err)
	}
	if r := result(err); r.Supported || r.Err != "" {
		t.Errorf("result %+v", r)
	}
}
