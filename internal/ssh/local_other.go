//go:build !unix

package ssh

import "os/exec"

func setProcessGroup(c *exec.Cmd) {}

func exitCode(e *exec.ExitError) int { return e.ExitCode() }
