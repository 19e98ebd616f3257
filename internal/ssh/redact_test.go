package ssh

import (
	"strings"
	"testing"
)

const (
	certKey = "9a2e4f1b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f"
	caHash  = "sha256:1234567890abcdef1234567890abcdef1234567890abcdef1234567890abcdef"
)

func TestRedact(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash " + caHash,
			"kubeadm join 10.0.0.1:6443 --token abcdef.<redacted> --discovery-token-ca-cert-hash " + caHash},
		{"--token=abcdef.0123456789abcdef", "--token=abcdef.<redacted>"},
		{"kubeadm join ... --control-plane --certificate-key " + certKey,
			"kubeadm join ... --control-plane --certificate-key <redacted>"},
		{"--certificate-key=" + certKey, "--certificate-key=<redacted>"},
		{"certificateKey: \"" + certKey + "\"", "certificateKey: \"<redacted>\""},
		{"[upload-certs] Using certificate key:\n" + certKey + "\n",
			"[upload-certs] Using certificate key:\n<redacted>\n"},
		{"token: abcdef.0123456789abcdef", "token: <redacted>"},
		{"    client-key-data: LS0tLS1CRUdJTiBSU0E=", "    client-key-data: <redacted>"},
		{"Authorization: Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6IiJ9.abc", "Authorization: Bearer <redacted>"},
		{"x\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\nabc\n-----END RSA PRIVATE KEY-----\ny",
			"x\n-----BEGIN RSA PRIVATE KEY----- <redacted> -----END RSA PRIVATE KEY-----\ny"},
		{"-----BEGIN PRIVATE KEY-----\ncut off", "-----BEGIN PRIVATE KEY----- <redacted> -----END PRIVATE KEY-----"},
		// Left alone.
		{caHash, caHash},
		{"sha256sum: " + certKey + "  /usr/bin/kubeadm", "sha256sum: " + certKey + "  /usr/bin/kubeadm"},
		{"node1.example.com 10.0.0.1", "node1.example.com 10.0.0.1"},
		{"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"},
	} {
		if got := Redact(tc.in); got != tc.want {
			t.Errorf("Redact(%q)\n = %q\nwant %q", tc.in, got, tc.want)
		}
	}
}

func TestLineLoggerHidesPrivateKeyBlocks(t *testing.T) {
	var got []string
	w := newLineLogger(func(host, line string) { got = append(got, host+"|"+line) }, "n1", "out: ")
	for _, chunk := range []string{"before\n-----BEGIN EC PRIV", "ATE KEY-----\nMHcCAQEEI\nsecretline\n-----END EC PRIVATE KEY-----\nafter --token abcdef.0123", "456789abcdef\nno newline"} {
		w.Write([]byte(chunk))
	}
	w.Flush()
	want := []string{
		"n1|out: before",
		"n1|out: -----BEGIN PRIVATE KEY----- <redacted> (lines hidden)",
		"n1|out: after --token abcdef.<redacted>",
		"n1|out: no newline",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("logged\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
