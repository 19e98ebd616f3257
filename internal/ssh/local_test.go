package ssh

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLocal(t *testing.T) {
	ctx := context.Background()
	l := &Local{}
	if l.Name() != "localhost" || NewLocal("cp1", nil).Name() != "cp1" {
		t.Error("Name")
	}
	r, err := l.Run(ctx, "echo out; echo err >&2; exit 5")
	if err != nil || string(r.Stdout) != "out\n" || string(r.Stderr) != "err\n" || r.ExitCode != 5 {
		t.Errorf("Run = %+v, %v", r, err)
	}

	path := filepath.Join(t.TempDir(), "f")
	if err := l.Upload(ctx, []byte("data"), path, 0o600); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	st, _ := os.Stat(path)
	if string(b) != "data" || st.Mode().Perm() != 0o600 {
		t.Errorf("uploaded %q mode %o", b, st.Mode().Perm())
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}

	l.CommandTimeout = 200 * time.Millisecond
	start := time.Now()
	_, err = l.Run(ctx, "sleep 30 | cat")
	var ce *CommandError
	if !errors.As(err, &ce) || !ce.Timeout || !strings.Contains(err.Error(), `host localhost: command "sleep 30 | cat" timed out after`) {
		t.Errorf("err = %v", err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("took %s, want ~200ms", elapsed)
	}
}
