package ssh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// Local runs commands on this machine with `sh -c`, as the current user (no
// sudo): the Executor of `preflight --local`. The zero value is ready to use.
type Local struct {
	// HostName is what Name returns; "" means "localhost".
	HostName string
	// Logger receives the commands and their output; nil means quiet.
	Logger Logger
	// CommandTimeout bounds each Run; 0 means only ctx does.
	CommandTimeout time.Duration
}

var _ Executor = (*Local)(nil)

// NewLocal returns a Local executor named name ("" means "localhost").
func NewLocal(name string, log Logger) *Local { return &Local{HostName: name, Logger: log} }

func (l *Local) Name() string {
	if l.HostName == "" {
		return "localhost"
	}
	return l.HostName
}

func (l *Local) Close() error { return nil }

func (l *Local) Run(ctx context.Context, cmd string) (Result, error) {
	name, start := l.Name(), time.Now()
	var cancel context.CancelFunc
	if l.CommandTimeout > 0 {
		ctx, cancel = context.WithTimeoutCause(ctx, l.CommandTimeout, errCommandTimeout)
	} else {
		ctx, cancel = context.WithCancel(ctx)
	}
	defer cancel()
	fail := func(err error) (Result, error) {
		e := &CommandError{After: time.Since(start), Host: name, Cmd: cmd, Err: err,
			Timeout: errors.Is(context.Cause(ctx), errCommandTimeout)}
		if e.Timeout {
			e.After = l.CommandTimeout // what was configured, not the scheduling noise
		}
		return Result{}, e
	}

	c := exec.CommandContext(ctx, "sh", "-c", cmd)
	setProcessGroup(c)
	c.WaitDelay = 2 * time.Second
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	var outLog, errLog *lineLogger
	if l.Logger != nil {
		l.Logger(name, "$ "+Redact(cmd))
		outLog, errLog = newLineLogger(l.Logger, name, "out: "), newLineLogger(l.Logger, name, "err: ")
		c.Stdout, c.Stderr = io.MultiWriter(&stdout, outLog), io.MultiWriter(&stderr, errLog)
	}
	err := c.Run()
	if outLog != nil {
		outLog.Flush()
		errLog.Flush()
	}
	if ctx.Err() != nil {
		return fail(context.Cause(ctx))
	}
	r := Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes()}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr):
		r.ExitCode = exitCode(exitErr)
	default:
		return fail(err)
	}
	l.Logger.logf(name, "exit %d after %s", r.ExitCode, time.Since(start).Round(time.Millisecond))
	return r, nil
}

// Upload writes data to a temporary file beside path, sets mode, syncs and
// renames it over path.
func (l *Local) Upload(ctx context.Context, data []byte, path string, mode fs.FileMode) (err error) {
	if err := ctx.Err(); err != nil {
		return err
	}
	l.Logger.logf(l.Name(), "upload %s (%d bytes, mode %04o)", path, len(data), uint32(mode.Perm()))
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".kpfree-tmp-*")
	if err != nil {
		return fmt.Errorf("%s: upload %s: %w", l.Name(), path, err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
			err = fmt.Errorf("%s: upload %s: %w", l.Name(), path, err)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	if err := f.Chmod(mode.Perm()); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
