package ssh

import (
	"bytes"
	"fmt"
	"strings"
)

// ShellQuote quotes s as one POSIX sh word: in single quotes, each single
// quote closing the quotes, escaped, then reopening them:
//
//	it's  ->  'it'\''s'
//
// Newlines and every other byte stay literal.
func ShellQuote(s string) string {
	if s == "" {
		return "''"
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// WrapCommand is the command line sent to the SSH server for cmd: cmd runs
// under POSIX sh whatever the user's login shell, through `sudo -n` (never
// prompting) unless user is root.
func WrapCommand(user, cmd string) string {
	if user == "root" {
		return "sh -c " + ShellQuote(cmd)
	}
	return "sudo -n sh -c " + ShellQuote(cmd)
}

// SudoError is returned when sudo refused to run a command: a password is
// required, the user is not in sudoers, or sudo is missing.
type SudoError struct {
	Host   string
	User   string
	Cmd    string
	Stderr string
	Reason string // "password", "not-allowed" or "missing"
}

func (e *SudoError) Error() string {
	switch e.Reason {
	case "not-allowed":
		return fmt.Sprintf("host %s: user %s may not run sudo (%s): add '%s ALL=(ALL) NOPASSWD:ALL' to /etc/sudoers.d/",
			e.Host, e.User, Redact(e.Stderr), e.User)
	case "missing":
		return fmt.Sprintf("host %s: sudo is not installed and user %s is not root: install sudo or connect as root", e.Host, e.User)
	default:
		return fmt.Sprintf("host %s: user %s needs passwordless sudo (sudo -n refused): add '%s ALL=(ALL) NOPASSWD:ALL' to /etc/sudoers.d/",
			e.Host, e.User, e.User)
	}
}

// sudoRefusal reports whether r is sudo refusing to run a command rather than
// the command's own result, and why ("" when it is not).
func sudoRefusal(r Result) string {
	switch r.ExitCode {
	case 1:
		for line := range strings.SplitSeq(string(r.Stderr), "\n") {
			line = strings.TrimSpace(line)
			if !strings.HasPrefix(line, "sudo: ") && !strings.HasPrefix(line, "sudo:") {
				continue
			}
			switch {
			case strings.Contains(line, "a password is required"),
				strings.Contains(line, "a terminal is required"),
				strings.Contains(line, "no tty present"):
				return "password"
			case strings.Contains(line, "is not in the sudoers file"),
				strings.Contains(line, "is not allowed to execute"):
				return "not-allowed"
			}
		}
	case 127:
		s := string(bytes.TrimSpace(r.Stderr))
		if strings.Contains(s, "sudo: not found") || strings.Contains(s, "sudo: command not found") {
			return "missing"
		}
	}
	return ""
}

// checkSudo turns a sudo refusal into a *SudoError.
func checkSudo(host, user, cmd string, r Result) error {
	if user == "root" {
		return nil
	}
	if reason := sudoRefusal(r); reason != "" {
		return &SudoError{Host: host, User: user, Cmd: cmd, Stderr: firstLine(bytes.TrimSpace(r.Stderr)), Reason: reason}
	}
	return nil
}
