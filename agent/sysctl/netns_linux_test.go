package sysctl

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"testing"

	"golang.org/x/sys/unix"
)

// inNewNetns runs fn on a thread moved into a new, anonymous network
// namespace (nothing in `ip netns list`); the thread is never unlocked, so
// the runtime discards it, and the namespace goes with it.
func inNewNetns(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare the network namespace: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// TestReserveInNetns writes the real sysctl, but only in a network namespace
// of its own, and checks that the host's value did not move.
func TestReserveInNetns(t *testing.T) {
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root (creates a network namespace, writes a per-namespace sysctl)")
	}
	const file = "/proc/sys/" + ReservedPortsPath
	rootBefore, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var first, second bool
	var inside string
	err = inNewNetns(func() error {
		// Guard: /proc/sys/net must show the new namespace (only lo in it)
		// before anything is written.
		entries, err := os.ReadDir("/proc/sys/net/ipv4/conf")
		if err != nil {
			return err
		}
		var devs []string
		for _, e := range entries {
			devs = append(devs, e.Name())
		}
		if !slices.Equal(devs, []string{"all", "default", "lo"}) {
			return fmt.Errorf("/proc/sys/net does not show the new namespace (devices %v); not writing", devs)
		}
		if b, err := os.ReadFile(file); err != nil || string(b) != "\n" {
			return fmt.Errorf("fresh namespace: reserved ports %q, %v; want none", b, err)
		}
		if err := os.WriteFile(file, []byte("8080\n"), 0o644); err != nil {
			return err
		}
		if first, err = ReserveNodePortRange("/proc/sys", 30000, 32767); err != nil {
			return err
		}
		if second, err = ReserveNodePortRange("/proc/sys", 30000, 32767); err != nil {
			return err
		}
		b, err := os.ReadFile(file)
		inside = string(b)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if !first || second {
		t.Errorf("changed = %v then %v, want true then false", first, second)
	}
	if inside != "8080,30000-32767\n" {
		t.Errorf("namespace value %q, want 8080,30000-32767", inside)
	}
	rootAfter, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if string(rootAfter) != string(rootBefore) {
		t.Errorf("the host's ip_local_reserved_ports changed: %q -> %q", rootBefore, rootAfter)
	}
}
