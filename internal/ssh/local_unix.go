//go:build unix

package ssh

import (
	"os/exec"
	"syscall"
)

// setProcessGroup runs c in its own process group and makes cancellation
// send SIGTERM to the whole group, so `sh -c 'a | b'` stops entirely.
func setProcessGroup(c *exec.Cmd) {
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c.Cancel = func() error {
		return syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
	}
}

// exitCode is the exit status, or 128+signal as a shell reports it.
func exitCode(e *exec.ExitError) int {
	if ws, ok := e.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return e.ExitCode()
}
