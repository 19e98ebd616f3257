package kubeenv

import (
	"context"
	"runtime"
	"testing"
	"time"
)

// StartForTest starts a control plane for a test, or skips the test when
// the binaries are not built; it is stopped when the test ends.
//
// etcd and kube-apiserver are forked with Pdeathsig, which fires when the OS
// thread that forked them exits, and tests that enter network namespaces end
// their locked threads on purpose: the fork happens on a thread kept alive
// until the control plane is stopped.
func StartForTest(t testing.TB, o Options) *ControlPlane {
	t.Helper()
	for _, b := range []string{"etcd", "kube-apiserver"} {
		if _, err := Binary(b); err != nil {
			t.Skipf("integration test: %v", err)
		}
	}
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var cp *ControlPlane
	var err error
	started, release := make(chan struct{}), make(chan struct{})
	go func() {
		runtime.LockOSThread()
		cp, err = Start(ctx, o)
		close(started)
		<-release
		runtime.UnlockOSThread()
	}()
	<-started
	t.Cleanup(func() { close(release) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cp.Stop) // runs before the thread is released
	return cp
}
