// Package ssh runs commands on hosts over SSH (golang.org/x/crypto/ssh) and
// locally through one interface, and fans a function out over many hosts with
// bounded parallelism, collecting every host's result and error.
package ssh

import (
	"context"
	"fmt"
	"io/fs"
)

// Result is what one command produced on one host.
type Result struct {
	Stdout   []byte
	Stderr   []byte
	ExitCode int
}

// Executor runs commands on one host. Commands are POSIX sh snippets run as
// root: a non-root SSH user gets them wrapped in `sudo -n`.
// Implementations: *Client (SSH) and Local (this machine).
type Executor interface {
	// Name is the host's inventory name, used to prefix output and errors.
	Name() string
	// Run runs cmd and waits for it. A non-zero exit status is not an error:
	// it is reported in Result.ExitCode. Errors are transport failures,
	// timeouts and sudo refusing to run without a password.
	Run(ctx context.Context, cmd string) (Result, error)
	// Upload writes data to path on the host with the given mode, atomically
	// (temporary file + rename), as root.
	Upload(ctx context.Context, data []byte, path string, mode fs.FileMode) error
	Close() error
}

// ExitError describes a command that ran and exited non-zero.
type ExitError struct {
	Host   string
	Cmd    string
	Result Result
}

func (e *ExitError) Error() string {
	return fmt.Sprintf("%s: command %s exited %d: %s", e.Host, shortCmd(e.Cmd), e.Result.ExitCode, Redact(firstLine(e.Result.Stderr)))
}

// Output runs cmd and returns its stdout, or an *ExitError when it exits non-zero.
func Output(ctx context.Context, e Executor, cmd string) ([]byte, error) {
	r, err := e.Run(ctx, cmd)
	if err != nil {
		return nil, err
	}
	if r.ExitCode != 0 {
		return r.Stdout, &ExitError{Host: e.Name(), Cmd: cmd, Result: r}
	}
	return r.Stdout, nil
}

func firstLine(b []byte) string {
	for i, c := range b {
		if c == '\n' {
			return string(b[:i])
		}
	}
	return string(b)
}
