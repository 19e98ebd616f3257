package ssh

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	xssh "golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/kpfree/kpfree/internal/inventory"
)

func TestAcceptNewWritesKnownHosts(t *testing.T) {
	dir := t.TempDir()
	keyFile, key := newClientKey(t, dir)
	srv := startServer(t, key.PublicKey())
	kh := filepath.Join(dir, "new", "sub", "known_hosts") // directories do not exist yet

	tg := srv.target("node1", "root", keyFile, kh)
	tg.AcceptNewHostKeys = true
	c, err := Dial(context.Background(), tg, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	b, err := os.ReadFile(kh)
	if err != nil {
		t.Fatal(err)
	}
	if want := srv.knownHostsLine(srv.hostKeys[0].PublicKey()) + "\n"; string(b) != want {
		t.Errorf("known_hosts = %q, want %q", b, want)
	}
	for path, want := range map[string]os.FileMode{kh: 0o600, filepath.Dir(kh): 0o700} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s mode %o, want %o", path, st.Mode().Perm(), want)
		}
	}

	// Now known: accepted without the opt-in, and the file is not touched.
	tg.AcceptNewHostKeys = false
	c, err = Dial(context.Background(), tg, fastOpts)
	if err != nil {
		t.Fatalf("second dial: %v", err)
	}
	c.Close()
	if b2, _ := os.ReadFile(kh); string(b2) != string(b) {
		t.Errorf("known_hosts rewritten: %q", b2)
	}
}

func TestAcceptNewAppendsAfterLineWithoutNewline(t *testing.T) {
	dir := t.TempDir()
	keyFile, key := newClientKey(t, dir)
	srv := startServer(t, key.PublicKey())
	kh := filepath.Join(dir, "known_hosts")
	other := genSigner(t, "ed25519").PublicKey()
	first := "other.example " + strings.TrimSpace(string(xssh.MarshalAuthorizedKey(other)))
	os.WriteFile(kh, []byte(first), 0o600)

	tg := srv.target("node1", "root", keyFile, kh)
	tg.AcceptNewHostKeys = true
	c, err := Dial(context.Background(), tg, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	b, _ := os.ReadFile(kh)
	if want := first + "\n" + srv.knownHostsLine(srv.hostKeys[0].PublicKey()) + "\n"; string(b) != want {
		t.Errorf("known_hosts = %q, want %q", b, want)
	}
}

func TestUnknownHostRefusedWithoutOptIn(t *testing.T) {
	dir := t.TempDir()
	keyFile, key := newClientKey(t, dir)
	srv := startServer(t, key.PublicKey())
	kh := filepath.Join(dir, "known_hosts")

	_, err := Dial(context.Background(), srv.target("node1", "root", keyFile, kh), fastOpts)
	var hke *HostKeyError
	if !errors.As(err, &hke) || hke.Problem != HostKeyUnknown {
		t.Fatalf("err = %v, want an unknown-host HostKeyError", err)
	}
	for _, want := range []string{"host node1", srv.addr(), "is not in " + kh, "acceptNewHostKeys: true",
		xssh.FingerprintSHA256(srv.hostKeys[0].PublicKey())} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if n := srv.conns.Load(); n != 1 {
		t.Errorf("%d connection attempts, want 1 (no retry)", n)
	}
	if _, err := os.Stat(kh); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("known_hosts written without opt-in: %v", err)
	}
}

func TestChangedHostKeyRefusedNotRetried(t *testing.T) {
	for _, acceptNew := range []bool{false, true} {
		t.Run(fmt.Sprint("acceptNew=", acceptNew), func(t *testing.T) {
			dir := t.TempDir()
			keyFile, key := newClientKey(t, dir)
			srv := startServer(t, key.PublicKey())
			kh := filepath.Join(dir, "known_hosts")
			old := genSigner(t, "ed25519").PublicKey()
			content := "# managed by hand\n" + srv.knownHostsLine(old) + "\n"
			os.WriteFile(kh, []byte(content), 0o600)

			tg := srv.target("node2", "root", keyFile, kh)
			tg.AcceptNewHostKeys = acceptNew
			opts := Options{Retries: 5, RetryBackoff: 10 * time.Millisecond}
			_, err := Dial(context.Background(), tg, opts)
			var hke *HostKeyError
			if !errors.As(err, &hke) || hke.Problem != HostKeyChanged {
				t.Fatalf("err = %v, want a changed-key HostKeyError", err)
			}
			for _, want := range []string{
				"host key for " + srv.addr() + " changed",
				"possible MITM; if intended, remove line 2 of " + kh,
				xssh.FingerprintSHA256(old),
				xssh.FingerprintSHA256(srv.hostKeys[0].PublicKey()),
			} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q lacks %q", err, want)
				}
			}
			if n := srv.conns.Load(); n != 1 {
				t.Errorf("%d connection attempts, want 1: a changed key must not be retried", n)
			}
			if b, _ := os.ReadFile(kh); string(b) != content {
				t.Errorf("known_hosts modified: %q", b)
			}
		})
	}
}

// The server offers ECDSA (which the library prefers by default) and
// Ed25519; known_hosts has only the Ed25519 key, so that type must be
// negotiated.
func TestHostKeyAlgorithmFromKnownHosts(t *testing.T) {
	dir := t.TempDir()
	keyFile, key := newClientKey(t, dir)
	ecdsaKey, edKey := genSigner(t, "ecdsa"), genSigner(t, "ed25519")
	srv := startServer(t, key.PublicKey(), ecdsaKey, edKey)

	for _, known := range []xssh.Signer{edKey, ecdsaKey} {
		kh := filepath.Join(t.TempDir(), "known_hosts")
		os.WriteFile(kh, []byte(srv.knownHostsLine(known.PublicKey())+"\n"), 0o600)
		c, err := Dial(context.Background(), srv.target("node1", "root", keyFile, kh), fastOpts)
		if err != nil {
			t.Fatalf("known %s: %v", known.PublicKey().Type(), err)
		}
		c.Close()
	}
}

func TestHostKeyAlgorithmsOrder(t *testing.T) {
	ed := genSigner(t, "ed25519").PublicKey()
	got := hostKeyAlgorithms([]knownhosts.KnownKey{{Key: ed}}, false)
	if got[0] != xssh.KeyAlgoED25519 {
		t.Errorf("first algorithm %q, want %q", got[0], xssh.KeyAlgoED25519)
	}
	for _, a := range got {
		if strings.Contains(a, "-cert-") {
			t.Errorf("certificate algorithm %q offered without @cert-authority", a)
		}
	}
	if hostKeyAlgorithms(nil, true) != nil {
		t.Error("unknown host with a @cert-authority file: want the library default")
	}
}

func TestConcurrentAcceptNewWritesEachHostOnce(t *testing.T) {
	dir := t.TempDir()
	keyFile, key := newClientKey(t, dir)
	kh := filepath.Join(dir, "known_hosts")
	var targets []inventory.Target
	var want []string
	for i := range 3 {
		srv := startServer(t, key.PublicKey())
		want = append(want, srv.knownHostsLine(srv.hostKeys[0].PublicKey()))
		for j := range 4 { // the same host several times, dialed at once
			tg := srv.target(fmt.Sprintf("n%d-%d", i, j), "root", keyFile, kh)
			tg.AcceptNewHostKeys = true
			targets = append(targets, tg)
		}
	}
	clients, err := DialAll(context.Background(), targets, fastOpts)
	CloseAll(clients)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(kh)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 3 {
		t.Fatalf("known_hosts has %d lines, want 3:\n%s", len(lines), b)
	}
	for _, w := range want {
		if !strings.Contains(string(b), w) {
			t.Errorf("known_hosts lacks %q", w)
		}
	}
}

func TestConnectTimeoutWhenServerNeverAnswers(t *testing.T) {
	// The kernel completes the TCP handshake but nobody ever accepts: the
	// SSH handshake hangs until connectTimeout.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dir := t.TempDir()
	keyFile, _ := newClientKey(t, dir)
	tg := inventory.Target{Name: "slow", Address: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port, User: "root",
		IdentityFile: keyFile, KnownHostsFile: filepath.Join(dir, "kh"), ConnectTimeout: 200 * time.Millisecond}

	start := time.Now()
	_, err = Dial(context.Background(), tg, Options{Retries: 1, RetryBackoff: 50 * time.Millisecond})
	elapsed := time.Since(start)
	var ce *ConnectError
	if !errors.As(err, &ce) || ce.Attempts != 2 {
		t.Fatalf("err = %v, want a ConnectError after 2 attempts", err)
	}
	if !strings.Contains(err.Error(), "timed out after 200ms") {
		t.Errorf("error %q does not say it timed out", err)
	}
	if elapsed < 400*time.Millisecond || elapsed > 3*time.Second {
		t.Errorf("took %s, want ~450ms (2 x 200ms + 50ms)", elapsed)
	}
}

func TestConnectRefusedFailsFast(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // nothing listens there now
	dir := t.TempDir()
	keyFile, _ := newClientKey(t, dir)
	tg := inventory.Target{Name: "down", Address: "127.0.0.1", Port: port, User: "root",
		IdentityFile: keyFile, KnownHostsFile: filepath.Join(dir, "kh"), ConnectTimeout: 10 * time.Second}

	start := time.Now()
	_, err := Dial(context.Background(), tg, Options{Retries: 2, RetryBackoff: 10 * time.Millisecond})
	var ce *ConnectError
	if !errors.As(err, &ce) || ce.Attempts != 3 {
		t.Fatalf("err = %v, want a ConnectError after 3 attempts", err)
	}
	if !strings.Contains(err.Error(), "refused") || !strings.Contains(err.Error(), "host down") {
		t.Errorf("error %q", err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("took %s, want well under connectTimeout (10s)", elapsed)
	}
}

func TestContextCancelStopsRetries(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	dir := t.TempDir()
	keyFile, _ := newClientKey(t, dir)
	tg := inventory.Target{Name: "down", Address: "127.0.0.1", Port: port, User: "root",
		IdentityFile: keyFile, KnownHostsFile: filepath.Join(dir, "kh")}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := Dial(ctx, tg, Options{Retries: 10, RetryBackoff: time.Second})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("err = %v, want context.DeadlineExceeded", err)
	}
	if elapsed := time.Since(start); elapsed > 3*time.Second {
		t.Errorf("took %s, want ~100ms: ctx ended during a 1s backoff", elapsed)
	}
}

func TestAuthFailureNotRetried(t *testing.T) {
	dir := t.TempDir()
	keyFile, _ := newClientKey(t, dir)
	other := genSigner(t, "ed25519")
	srv := startServer(t, other.PublicKey()) // does not accept our key
	kh := filepath.Join(dir, "known_hosts")
	os.WriteFile(kh, []byte(srv.knownHostsLine(srv.hostKeys[0].PublicKey())+"\n"), 0o600)

	_, err := Dial(context.Background(), srv.target("node1", "ubuntu", keyFile, kh), Options{Retries: 5})
	var ae *AuthError
	if !errors.As(err, &ae) {
		t.Fatalf("err = %v, want an AuthError", err)
	}
	if !strings.Contains(err.Error(), "authentication as ubuntu failed") || !strings.Contains(err.Error(), keyFile) {
		t.Errorf("error %q", err)
	}
	if n := srv.conns.Load(); n != 1 {
		t.Errorf("%d connection attempts, want 1", n)
	}
}

// encryptedKey is an ed25519 key protected by the passphrase "secret"
// (generated once: the bcrypt KDF makes generating one slow).
const encryptedKey = `-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABBu
RJALQvq+HtdYd0VYAIrWAAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAIOdb
Y1xbdIar3bOCS/Cl0Ndh/hGBrRaqkAyr81orCobVAAAAoGvJIUlECae0uP6bxvm4
VSBTbu4+TeGjAWjGHBiVk6HLr1tfnBYhhtTTNktDf2pTkqxaG8S+1+fySmuKLRJq
d+kkS7DIUvW6b/VUIA37PboeRl6ADnSrFKMRKJ7/rZKPVlXVn8BP3JuCMubf3mAQ
RoMmJMEit7+aLhGtwZ8TQjzFzBqatfNAn4NHmhoksCfyYlMWNhTqv1P1Tn0MRKAD
l4U=
-----END OPENSSH PRIVATE KEY-----
`

func TestIdentityFileErrors(t *testing.T) {
	dir := t.TempDir()
	encrypted := filepath.Join(dir, "id_encrypted")
	os.WriteFile(encrypted, []byte(encryptedKey), 0o600)
	garbage := filepath.Join(dir, "id_garbage")
	os.WriteFile(garbage, []byte("SECRET-MATERIAL not a key"), 0o600)
	t.Setenv("SSH_AUTH_SOCK", "")

	for file, want := range map[string]string{
		filepath.Join(dir, "missing"): "identity file " + filepath.Join(dir, "missing") + " does not exist",
		encrypted:                     "identity file " + encrypted + " is passphrase-protected: load it into ssh-agent",
		garbage:                       "is not an OpenSSH/PEM private key",
	} {
		tg := inventory.Target{Name: "n", Address: "127.0.0.1", Port: 1, User: "root", IdentityFile: file,
			KnownHostsFile: filepath.Join(dir, "kh")}
		_, err := Dial(context.Background(), tg, fastOpts)
		var ie *IdentityError
		if !errors.As(err, &ie) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err = %v, want %q", filepath.Base(file), err, want)
		}
		if err != nil && strings.Contains(err.Error(), "SECRET") {
			t.Errorf("error quotes the file: %v", err)
		}
	}
}

func startAgent(t *testing.T, keys ...any) {
	t.Helper()
	kr := agent.NewKeyring()
	for _, k := range keys {
		if err := kr.Add(agent.AddedKey{PrivateKey: k}); err != nil {
			t.Fatal(err)
		}
	}
	sock := filepath.Join(t.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { agent.ServeAgent(kr, c); c.Close() }()
		}
	}()
	t.Setenv("SSH_AUTH_SOCK", sock)
}

func TestAgentAuth(t *testing.T) {
	dir := t.TempDir()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	signer, _ := xssh.NewSignerFromKey(priv)
	startAgent(t, priv)
	srv := startServer(t, signer.PublicKey())
	kh := filepath.Join(dir, "known_hosts")
	os.WriteFile(kh, []byte(srv.knownHostsLine(srv.hostKeys[0].PublicKey())+"\n"), 0o600)

	// Agent only.
	tg := srv.target("node1", "root", "", kh)
	tg.UseAgent = true
	c, err := Dial(context.Background(), tg, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	// A passphrase-protected identity file is skipped when the agent is in
	// use (it may hold that key).
	encrypted := filepath.Join(dir, "id_encrypted")
	os.WriteFile(encrypted, []byte(encryptedKey), 0o600)
	tg.IdentityFile = encrypted
	c, err = Dial(context.Background(), tg, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()

	// Without UseAgent the agent is not asked.
	tg.UseAgent = false
	if _, err := Dial(context.Background(), tg, fastOpts); err == nil || !strings.Contains(err.Error(), "passphrase-protected") {
		t.Errorf("err = %v, want passphrase-protected", err)
	}
}

func TestBastion(t *testing.T) {
	dir := t.TempDir()
	keyFile, key := newClientKey(t, dir)
	bastion := startServer(t, key.PublicKey())
	bastion.tunnel = true
	var nodes []*testServer
	for range 3 {
		nodes = append(nodes, startServer(t, key.PublicKey()))
	}
	kh := filepath.Join(dir, "known_hosts")
	var lines []string
	for _, s := range append([]*testServer{bastion}, nodes...) {
		lines = append(lines, s.knownHostsLine(s.hostKeys[0].PublicKey()))
	}
	os.WriteFile(kh, []byte(strings.Join(lines, "\n")+"\n"), 0o600)

	bt := bastion.target("", "jump", keyFile, "") // inherits the host's known_hosts
	var targets []inventory.Target
	for i, n := range nodes {
		tg := n.target(fmt.Sprintf("node%d", i+1), "root", keyFile, kh)
		tg.Bastion = &bt
		targets = append(targets, tg)
	}

	// One host.
	c, err := Dial(context.Background(), targets[0], fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	out, err := Output(context.Background(), c, "echo via bastion")
	if err != nil || string(out) != "via bastion\n" {
		t.Errorf("Output = %q, %v", out, err)
	}
	c.Close()

	// DialAll shares one connection to the bastion.
	before := bastion.conns.Load()
	clients, err := DialAll(context.Background(), targets, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	if n := bastion.conns.Load() - before; n != 1 {
		t.Errorf("%d connections to the bastion for %d hosts, want 1", n, len(targets))
	}
	for _, c := range clients {
		if _, err := Output(context.Background(), c, "true"); err != nil {
			t.Errorf("%s: %v", c.Name(), err)
		}
	}
	CloseAll(clients)

	// The bastion's own host key is checked.
	os.WriteFile(kh, []byte(strings.Join(lines[1:], "\n")+"\n"), 0o600)
	_, err = Dial(context.Background(), targets[0], fastOpts)
	var hke *HostKeyError
	if !errors.As(err, &hke) || hke.Addr != bastion.addr() {
		t.Fatalf("err = %v, want the bastion's unknown host key", err)
	}
	if !strings.Contains(err.Error(), "host node1: through host bastion 127.0.0.1: host key for "+bastion.addr()) {
		t.Errorf("error %q", err)
	}
}
