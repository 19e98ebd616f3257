package ssh

import (
	"os/exec"
	"testing"
)

func TestWrapCommand(t *testing.T) {
	for _, tc := range []struct{ user, cmd, want string }{
		{"root", "uname -r", `sh -c 'uname -r'`},
		{"ubuntu", "uname -r", `sudo -n sh -c 'uname -r'`},
		{"ubuntu", "", `sudo -n sh -c ''`},
		{"ubuntu", "echo 'a b'", `sudo -n sh -c 'echo '\''a b'\'''`},
		{"ubuntu", `echo "$HOME" \ $(id -u) ` + "`x`", `sudo -n sh -c 'echo "$HOME" \ $(id -u) ` + "`x`'"},
		{"ubuntu", "a\nb", "sudo -n sh -c 'a\nb'"},
		{"ubuntu", "it's; rm -rf /tmp/x'", `sudo -n sh -c 'it'\''s; rm -rf /tmp/x'\'''`},
	} {
		if got := WrapCommand(tc.user, tc.cmd); got != tc.want {
			t.Errorf("WrapCommand(%q, %q) = %s, want %s", tc.user, tc.cmd, got, tc.want)
		}
	}
}

// The quoting survives a real sh: the wrapped command, run the way sshd runs
// it (sh -c LINE), prints exactly the original argument.
func TestShellQuoteRoundTrip(t *testing.T) {
	for _, s := range []string{
		"", "plain", "it's", `"double"`, "''", `'\''`, "a\nb\n", "$HOME `id` $(id) \\ ; | & > <",
		"tab\there", "* ? [a]", "-n", "ünïcödé", "trailing\\",
	} {
		line := WrapCommand("root", "printf '%s' "+ShellQuote(s))
		out, err := exec.Command("/bin/sh", "-c", line).Output()
		if err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		if string(out) != s {
			t.Errorf("round trip of %q gave %q (line %s)", s, out, line)
		}
	}
}

func TestSudoRefusal(t *testing.T) {
	for _, tc := range []struct {
		name   string
		r      Result
		reason string
	}{
		{"password", Result{ExitCode: 1, Stderr: []byte("sudo: a password is required\n")}, "password"},
		{"terminal", Result{ExitCode: 1, Stderr: []byte("sudo: a terminal is required to read the password; either use the -S option to read from standard input or configure an askpass helper\n")}, "password"},
		{"old sudo", Result{ExitCode: 1, Stderr: []byte("sudo: no tty present and no askpass program specified\n")}, "password"},
		{"not in sudoers", Result{ExitCode: 1, Stderr: []byte("deploy is not in the sudoers file.  This incident will be reported.\nsudo: deploy is not in the sudoers file\n")}, "not-allowed"},
		{"no sudo", Result{ExitCode: 127, Stderr: []byte("bash: sudo: command not found\n")}, "missing"},
		{"no sudo dash", Result{ExitCode: 127, Stderr: []byte("sh: 1: sudo: not found\n")}, "missing"},
		{"command failed", Result{ExitCode: 1, Stderr: []byte("grep: x: No such file\n")}, ""},
		{"other exit", Result{ExitCode: 2, Stderr: []byte("sudo: a password is required\n")}, ""},
		{"mention mid-line", Result{ExitCode: 1, Stderr: []byte("error: sudo: a password is required\n")}, ""},
		{"success", Result{ExitCode: 0}, ""},
	} {
		if got := sudoRefusal(tc.r); got != tc.reason {
			t.Errorf("%s: sudoRefusal = %q, want %q", tc.name, got, tc.reason)
		}
	}

	err := checkSudo("node3", "ubuntu", "true", Result{ExitCode: 1, Stderr: []byte("sudo: a password is required\n")})
	want := "host node3: user ubuntu needs passwordless sudo (sudo -n refused): add 'ubuntu ALL=(ALL) NOPASSWD:ALL' to /etc/sudoers.d/"
	if err == nil || err.Error() != want {
		t.Errorf("checkSudo = %v\nwant %s", err, want)
	}
	if err := checkSudo("node3", "root", "true", Result{ExitCode: 1, Stderr: []byte("sudo: a password is required\n")}); err != nil {
		t.Errorf("root: %v", err)
	}
}

func TestUploadScript(t *testing.T) {
	got := UploadScript("/etc/kpfree/it's.yaml", 0o640, "abc")
	want := `umask 077 && cat > '/etc/kpfree/it'\''s.yaml.kpfree-tmp-abc' && chmod 0640 '/etc/kpfree/it'\''s.yaml.kpfree-tmp-abc' && ` +
		`mv -f '/etc/kpfree/it'\''s.yaml.kpfree-tmp-abc' '/etc/kpfree/it'\''s.yaml' || { rc=$?; rm -f '/etc/kpfree/it'\''s.yaml.kpfree-tmp-abc'; exit $rc; }`
	if got != want {
		t.Errorf("UploadScript =\n%s\nwant\n%s", got, want)
	}
}
