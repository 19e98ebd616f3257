package ssh

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// dialTest starts a server and connects to it as user with a known host key.
func dialTest(t *testing.T, user string, opts Options) (*testServer, *Client) {
	t.Helper()
	dir := t.TempDir()
	keyFile, key := newClientKey(t, dir)
	srv := startServer(t, key.PublicKey())
	kh := filepath.Join(dir, "known_hosts")
	os.WriteFile(kh, []byte(srv.knownHostsLine(srv.hostKeys[0].PublicKey())+"\n"), 0o600)
	c, err := Dial(context.Background(), srv.target("node1", user, keyFile, kh), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return srv, c
}

func TestRunAndUpload(t *testing.T) {
	for _, user := range []string{"root", "ubuntu"} {
		t.Run(user, func(t *testing.T) {
			srv, c := dialTest(t, user, fastOpts)
			ctx := context.Background()

			cmd := "printf '%s|' \"it's\" 'a \"b\"'\necho; echo oops >&2; exit 3"
			r, err := c.Run(ctx, cmd)
			if err != nil {
				t.Fatal(err)
			}
			if got := string(r.Stdout); got != "it's|a \"b\"|\n" {
				t.Errorf("stdout %q", got)
			}
			if string(r.Stderr) != "oops\n" || r.ExitCode != 3 {
				t.Errorf("stderr %q exit %d", r.Stderr, r.ExitCode)
			}
			if got, want := srv.commands()[0], WrapCommand(user, cmd); got != want {
				t.Errorf("server got %q, want %q", got, want)
			}
			_, err = Output(ctx, c, "exit 4")
			var ee *ExitError
			if !errors.As(err, &ee) || ee.Result.ExitCode != 4 {
				t.Errorf("Output err = %v", err)
			}

			path := filepath.Join(t.TempDir(), "conf.yaml")
			os.WriteFile(path, []byte("old"), 0o644)
			data := []byte("new content\nwith 'quotes'\x00and binary\n")
			if err := c.Upload(ctx, data, path, 0o640); err != nil {
				t.Fatal(err)
			}
			b, _ := os.ReadFile(path)
			st, _ := os.Stat(path)
			if !bytes.Equal(b, data) || st.Mode().Perm() != 0o640 {
				t.Errorf("uploaded %q mode %o", b, st.Mode().Perm())
			}
			if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
				t.Errorf("temporary files left: %v", entries)
			}

			err = c.Upload(ctx, data, filepath.Join(t.TempDir(), "missing-dir", "f"), 0o600)
			if !errors.As(err, &ee) || !strings.Contains(err.Error(), "upload ") {
				t.Errorf("upload into a missing directory: %v", err)
			}
		})
	}
}

func TestPasswordSudoDetected(t *testing.T) {
	srv, c := dialTest(t, "ubuntu", fastOpts)
	srv.sudo = "password"
	_, err := c.Run(context.Background(), "id -u")
	var se *SudoError
	if !errors.As(err, &se) {
		t.Fatalf("err = %v, want a SudoError", err)
	}
	want := "host node1: user ubuntu needs passwordless sudo (sudo -n refused): add 'ubuntu ALL=(ALL) NOPASSWD:ALL' to /etc/sudoers.d/"
	if err.Error() != want {
		t.Errorf("err = %q\nwant %q", err, want)
	}
}

func TestCommandTimeout(t *testing.T) {
	dir := t.TempDir()
	keyFile, key := newClientKey(t, dir)
	srv := startServer(t, key.PublicKey())
	kh := filepath.Join(dir, "known_hosts")
	os.WriteFile(kh, []byte(srv.knownHostsLine(srv.hostKeys[0].PublicKey())+"\n"), 0o600)
	tg := srv.target("node7", "root", keyFile, kh)
	tg.CommandTimeout = 300 * time.Millisecond
	c, err := Dial(context.Background(), tg, fastOpts)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	start := time.Now()
	_, err = c.Run(context.Background(), "sleep 30")
	elapsed := time.Since(start)
	var ce *CommandError
	if !errors.As(err, &ce) || !ce.Timeout || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want a command timeout", err)
	}
	if !strings.Contains(err.Error(), `host node7: command "sleep 30" timed out after 3`) {
		t.Errorf("error %q", err)
	}
	if elapsed > 5*time.Second {
		t.Errorf("took %s, want ~300ms", elapsed)
	}

	// The connection is still usable, and a caller's deadline is honoured too.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = c.Run(ctx, "sleep 30")
	if !errors.As(err, &ce) || ce.Timeout || !strings.Contains(err.Error(), "(deadline)") {
		t.Errorf("err = %v, want a deadline error", err)
	}
	if out, err := Output(context.Background(), c, "echo ok"); err != nil || string(out) != "ok\n" {
		t.Errorf("after timeouts: %q, %v", out, err)
	}
}

func TestConcurrentRunsOnOneClient(t *testing.T) {
	_, c := dialTest(t, "root", fastOpts)
	var wg sync.WaitGroup
	for range 3 * maxSessions {
		wg.Go(func() {
			if _, err := Output(context.Background(), c, "true"); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
}

type recordLog struct {
	mu    sync.Mutex
	lines []string
}

func (r *recordLog) log(host, line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines = append(r.lines, host+": "+line)
}

func (r *recordLog) String() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.lines, "\n")
}

func TestLoggerRedactsAndNeverLogsUploadData(t *testing.T) {
	var rec recordLog
	_, c := dialTest(t, "root", Options{Logger: rec.log})
	ctx := context.Background()
	if _, err := c.Run(ctx, "echo kubeadm join --token abcdef.0123456789abcdef; echo line2 >&2"); err != nil {
		t.Fatal(err)
	}
	secret := "-----BEGIN PRIVATE KEY-----\nTOPSECRET\n-----END PRIVATE KEY-----\n"
	if err := c.Upload(ctx, []byte(secret), filepath.Join(t.TempDir(), "k"), 0o600); err != nil {
		t.Fatal(err)
	}
	got := rec.String()
	for _, want := range []string{
		"node1: $ echo kubeadm join --token abcdef.<redacted>; echo line2 >&2",
		"node1: out: kubeadm join --token abcdef.<redacted>",
		"node1: err: line2",
		"node1: exit 0 after",
		"node1: upload ",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("log lacks %q:\n%s", want, got)
		}
	}
	for _, never := range []string{"0123456789abcdef", "TOPSECRET"} {
		if strings.Contains(got, never) {
			t.Errorf("log contains %q:\n%s", never, got)
		}
	}
}

func TestWriterLogger(t *testing.T) {
	var b bytes.Buffer
	l := WriterLogger(&b)
	l("node1", "hello")
	l("node2", "world")
	if b.String() != "node1: hello\nnode2: world\n" {
		t.Errorf("%q", b.String())
	}
}

func TestKeepaliveClosesDeadConnection(t *testing.T) {
	_, c := dialTest(t, "root", fastOpts)
	stop := make(chan struct{})
	defer close(stop)
	lost := make(chan error, 1)
	// A live connection answers (our test server replies false: still alive).
	go keepalive(c.SSH(), 20*time.Millisecond, stop, func(err error) { lost <- err })
	select {
	case err := <-lost:
		t.Fatalf("live connection reported lost: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	c.SSH().Close()
	select {
	case <-lost:
	case <-time.After(5 * time.Second):
		t.Fatal("dead connection not detected")
	}
}
