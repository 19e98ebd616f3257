package ssh

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"sync"
	"time"

	xssh "golang.org/x/crypto/ssh"
)

// Client is an SSH connection to one host; it implements Executor. Run and
// Upload may be called concurrently (at most maxSessions sessions at once,
// the rest wait).
type Client struct {
	name       string
	user       string
	addr       string
	conn       *xssh.Client
	release    func()
	log        Logger
	cmdTimeout time.Duration
	sessions   chan struct{}
	closeOnce  sync.Once
}

var _ Executor = (*Client)(nil)

// Name is the host's inventory name.
func (c *Client) Name() string { return c.name }

// User is the SSH user; commands go through sudo -n unless it is root.
func (c *Client) User() string { return c.user }

// Addr is the host:port connected to.
func (c *Client) Addr() string { return c.addr }

// SSH is the underlying connection, for port forwarding in tests and tools.
func (c *Client) SSH() *xssh.Client { return c.conn }

// Close closes the connection (and its share of the bastion connection).
func (c *Client) Close() error {
	c.closeOnce.Do(c.release)
	return nil
}

// CommandError is a command that did not complete: it timed out, ctx ended,
// or the connection failed. A command that ran and exited non-zero is not
// one (see Result.ExitCode and ExitError).
type CommandError struct {
	Host string
	Cmd  string
	// After is how long the command had been running (the configured
	// commandTimeout when Timeout is true).
	After time.Duration
	// Timeout is true when the host's commandTimeout expired.
	Timeout bool
	Err     error
}

func (e *CommandError) Error() string {
	switch {
	case e.Timeout:
		return fmt.Sprintf("host %s: command %s timed out after %s (commandTimeout)", e.Host, shortCmd(e.Cmd), e.After.Round(time.Millisecond))
	case errors.Is(e.Err, context.DeadlineExceeded):
		return fmt.Sprintf("host %s: command %s timed out after %s (deadline)", e.Host, shortCmd(e.Cmd), e.After.Round(time.Millisecond))
	case errors.Is(e.Err, context.Canceled):
		return fmt.Sprintf("host %s: command %s canceled after %s", e.Host, shortCmd(e.Cmd), e.After.Round(time.Millisecond))
	}
	return fmt.Sprintf("host %s: command %s: %v", e.Host, shortCmd(e.Cmd), e.Err)
}

func (e *CommandError) Unwrap() error { return e.Err }

// shortCmd renders a command for an error message: redacted, quoted, first
// line only and at most 120 characters.
func shortCmd(cmd string) string {
	cmd = Redact(strings.TrimSpace(cmd))
	more := false
	if i := strings.IndexByte(cmd, '\n'); i >= 0 {
		cmd, more = cmd[:i], true
	}
	if len(cmd) > 120 {
		cmd, more = cmd[:120], true
	}
	q := fmt.Sprintf("%q", cmd)
	if more {
		q += "..."
	}
	return q
}

// errCommandTimeout is the cause of a command's context when the host's
// commandTimeout expired.
var errCommandTimeout = fmt.Errorf("commandTimeout expired: %w", context.DeadlineExceeded)

// Run runs cmd as root (through sudo -n for another user) under sh.
func (c *Client) Run(ctx context.Context, cmd string) (Result, error) {
	return c.run(ctx, cmd, nil, cmd)
}

// run runs cmd with stdin; display is what logs and errors call it.
func (c *Client) run(ctx context.Context, cmd string, stdin io.Reader, display string) (Result, error) {
	start := time.Now()
	var cancel context.CancelFunc
	if c.cmdTimeout > 0 {
		ctx, cancel = context.WithTimeoutCause(ctx, c.cmdTimeout, errCommandTimeout)
	} else {
		ctx, cancel = context.WithCancel(ctx)
	}
	defer cancel()
	fail := func(err error) (Result, error) {
		e := &CommandError{After: time.Since(start), Host: c.name, Cmd: display, Err: err,
			Timeout: errors.Is(context.Cause(ctx), errCommandTimeout)}
		if e.Timeout {
			e.After = c.cmdTimeout // what was configured, not the scheduling noise
		}
		return Result{}, e
	}

	select {
	case c.sessions <- struct{}{}:
		defer func() { <-c.sessions }()
	case <-ctx.Done():
		return fail(context.Cause(ctx))
	}
	sess, err := c.conn.NewSession()
	if err != nil {
		return fail(fmt.Errorf("opening a session: %w", err))
	}
	defer sess.Close()

	var stdout, stderr bytes.Buffer
	sess.Stdout, sess.Stderr, sess.Stdin = &stdout, &stderr, stdin
	var outLog, errLog *lineLogger
	if c.log != nil {
		prefix := "$ "
		if stdin != nil {
			prefix = "" // an upload: display says what, the data stays out
		}
		c.log(c.name, prefix+Redact(display))
		outLog, errLog = newLineLogger(c.log, c.name, "out: "), newLineLogger(c.log, c.name, "err: ")
		sess.Stdout, sess.Stderr = io.MultiWriter(&stdout, outLog), io.MultiWriter(&stderr, errLog)
	}

	if err := sess.Start(WrapCommand(c.user, cmd)); err != nil {
		return fail(fmt.Errorf("starting: %w", err))
	}
	done := make(chan error, 1)
	go func() { done <- sess.Wait() }()

	var werr error
	select {
	case werr = <-done:
	case <-ctx.Done():
		// Ask the command to stop, then drop the session. The output read so
		// far is only safe to return once Wait is over.
		_ = sess.Signal(xssh.SIGTERM)
		select {
		case <-done:
		case <-time.After(time.Second):
			sess.Close()
			select {
			case <-done:
			case <-time.After(time.Second):
			}
		}
		c.log.logf(c.name, "command stopped after %s: %v", time.Since(start).Round(time.Millisecond), context.Cause(ctx))
		return fail(context.Cause(ctx))
	}
	if outLog != nil {
		outLog.Flush()
		errLog.Flush()
	}

	r := Result{Stdout: stdout.Bytes(), Stderr: stderr.Bytes()}
	var exitErr *xssh.ExitError
	switch {
	case werr == nil:
	case errors.As(werr, &exitErr):
		r.ExitCode = exitErr.ExitStatus()
	case errors.As(werr, new(*xssh.ExitMissingError)):
		return fail(errors.New("the session ended without an exit status (connection lost?)"))
	default:
		return fail(werr)
	}
	c.log.logf(c.name, "exit %d after %s", r.ExitCode, time.Since(start).Round(time.Millisecond))
	if err := checkSudo(c.name, c.user, display, r); err != nil {
		return r, err
	}
	return r, nil
}

// UploadScript is the sh script Upload runs (as root) with the data on its
// stdin: write a temporary file beside path, readable by root only while it
// is written, set its mode, then rename it over path; remove it on failure.
func UploadScript(path string, mode fs.FileMode, tmpSuffix string) string {
	tmp := ShellQuote(path + ".kpfree-tmp-" + tmpSuffix)
	return fmt.Sprintf("umask 077 && cat > %[1]s && chmod %04[2]o %[1]s && mv -f %[1]s %[3]s || { rc=$?; rm -f %[1]s; exit $rc; }",
		tmp, uint32(mode.Perm()), ShellQuote(path))
}

func randomSuffix() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Upload writes data to path with mode, atomically, as root. The data is
// never logged.
func (c *Client) Upload(ctx context.Context, data []byte, path string, mode fs.FileMode) error {
	display := fmt.Sprintf("upload %s (%d bytes, mode %04o)", path, len(data), uint32(mode.Perm()))
	r, err := c.run(ctx, UploadScript(path, mode, randomSuffix()), bytes.NewReader(data), display)
	if err != nil {
		return err
	}
	if r.ExitCode != 0 {
		return &ExitError{Host: c.name, Cmd: display, Result: r}
	}
	return nil
}
