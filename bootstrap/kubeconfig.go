package bootstrap

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// kubeconfigStep writes the first control plane's admin.conf to a local
// file, mode 0600.
type kubeconfigStep struct {
	c *cluster
	// wrote: this run wrote the file; previous is what it held before (nil:
	// it did not exist), restored by a rollback.
	wrote    bool
	previous []byte
}

func (s *kubeconfigStep) Title() string { return "Fetch admin kubeconfig" }

func (s *kubeconfigStep) path() string { return s.c.o.KubeconfigOut }

func (s *kubeconfigStep) Skip(ctx context.Context) (string, bool, error) {
	st, err := s.c.first.getState(ctx)
	if err != nil || !st.AdminConf {
		return "", false, err
	}
	local, err := os.ReadFile(s.path())
	if err != nil {
		return "", false, nil
	}
	remote, err := s.c.first.query(ctx, "cat "+AdminConfPath)
	if err != nil {
		return "", false, err
	}
	if !bytes.Equal(local, []byte(remote)) {
		return "", false, nil
	}
	return s.path() + " is up to date", true, nil
}

func (s *kubeconfigStep) DryRun(ctx context.Context) error {
	s.c.journal.record(s.Title(), HostLocal, "write", fmt.Sprintf("write %s (mode 0600) from %s:%s", s.path(), s.c.first.name(), AdminConfPath))
	return nil
}

func (s *kubeconfigStep) Run(ctx context.Context) error {
	c := s.c
	conf, err := c.first.query(ctx, "cat "+AdminConfPath)
	if err != nil {
		return err
	}
	prev, err := os.ReadFile(s.path())
	switch {
	case err == nil:
		s.previous = prev
	case !errors.Is(err, fs.ErrNotExist):
		return err
	}
	c.journal.record(s.Title(), HostLocal, "write", fmt.Sprintf("write %s (mode 0600) from %s:%s", s.path(), c.first.name(), AdminConfPath))
	if err := writeFile(s.path(), []byte(conf), 0o600); err != nil {
		return err
	}
	s.wrote = true
	abs, _ := filepath.Abs(s.path())
	c.o.UI.Infof("kubeconfig: %s", abs)
	return nil
}

// Rollback restores what the file held before, or removes it.
func (s *kubeconfigStep) Rollback(ctx context.Context) error {
	if !s.wrote {
		return nil
	}
	s.c.journal.record("Roll back: "+s.Title(), HostLocal, "write", "restore "+s.path())
	if s.previous == nil {
		err := os.Remove(s.path())
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	return writeFile(s.path(), s.previous, 0o600)
}

// writeFile writes data to path with mode, atomically (a temporary file in
// the same directory renamed over path), creating the directory.
func writeFile(path string, data []byte, mode fs.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
