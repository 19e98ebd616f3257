package ssh

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/kpfree/kpfree/internal/inventory"
)

func TestLazyClientDialsOnceAndRepeatsTheError(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // refused from now on
	dir := t.TempDir()
	keyFile, _ := newClientKey(t, dir)
	tg := inventory.Target{Name: "gone", Address: "127.0.0.1", Port: port, User: "root",
		IdentityFile: keyFile, KnownHostsFile: filepath.Join(dir, "kh"), ConnectTimeout: time.Second}
	l := NewDialer(Options{Retries: -1}).Lazy(tg)
	if l.Name() != "gone" {
		t.Fatalf("name %q", l.Name())
	}
	_, err1 := l.Run(context.Background(), "true")
	var ce *ConnectError
	if !errors.As(err1, &ce) || ce.Attempts != 1 {
		t.Fatalf("first Run: %v, want a ConnectError", err1)
	}
	start := time.Now()
	err2 := l.Upload(context.Background(), []byte("x"), "/tmp/x", 0o600)
	if err2 != err1 || time.Since(start) > 50*time.Millisecond {
		t.Fatalf("second call dialled again or changed the error: %v", err2)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestLazyClientClosedBeforeUse(t *testing.T) {
	l := NewDialer(Options{}).Lazy(inventory.Target{Name: "n", Address: "127.0.0.1"})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Run(context.Background(), "true"); err == nil {
		t.Fatal("Run after Close dialled")
	}
}
