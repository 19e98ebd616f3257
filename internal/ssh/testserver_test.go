package ssh

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	xssh "golang.org/x/crypto/ssh"

	"github.com/kpfree/kpfree/internal/inventory"
)

// testServer is an in-process SSH server on 127.0.0.1: public key auth, exec
// sessions run with the real /bin/sh (as the test user, whatever the SSH
// user is called), `sudo -n` emulated, signal requests, and optionally
// direct-tcpip tunnels (a bastion).
type testServer struct {
	t        *testing.T
	ln       net.Listener
	host     string
	port     int
	hostKeys []xssh.Signer
	// clientKey is the only key accepted; nil accepts none.
	clientKey xssh.PublicKey
	// sudo is how emulated sudo answers: "" runs the command, "password"
	// refuses like sudo -n without NOPASSWD.
	sudo   string
	tunnel bool

	conns atomic.Int32 // TCP connections accepted
	execs atomic.Int32
	mu    sync.Mutex
	cmds  []string // command lines received
}

func genSigner(t *testing.T, kind string) xssh.Signer {
	t.Helper()
	var key crypto.Signer
	var err error
	switch kind {
	case "ecdsa":
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	default:
		_, key, err = ed25519.GenerateKey(rand.Reader)
	}
	if err != nil {
		t.Fatal(err)
	}
	s, err := xssh.NewSignerFromKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newClientKey writes a fresh unencrypted ed25519 key to dir/id_ed25519.
func newClientKey(t *testing.T, dir string) (string, xssh.Signer) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	block, err := xssh.MarshalPrivateKey(priv, "test")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "id_ed25519")
	if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := xssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return path, s
}

func startServer(t *testing.T, clientKey xssh.PublicKey, hostKeys ...xssh.Signer) *testServer {
	t.Helper()
	if len(hostKeys) == 0 {
		hostKeys = []xssh.Signer{genSigner(t, "ed25519")}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &testServer{t: t, ln: ln, hostKeys: hostKeys, clientKey: clientKey,
		host: "127.0.0.1", port: ln.Addr().(*net.TCPAddr).Port}
	t.Cleanup(func() { ln.Close() })
	go s.serve()
	return s
}

func (s *testServer) addr() string { return net.JoinHostPort(s.host, strconv.Itoa(s.port)) }

func (s *testServer) commands() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.cmds...)
}

func (s *testServer) serve() {
	cfg := &xssh.ServerConfig{
		PublicKeyCallback: func(_ xssh.ConnMetadata, key xssh.PublicKey) (*xssh.Permissions, error) {
			if s.clientKey != nil && string(key.Marshal()) == string(s.clientKey.Marshal()) {
				return nil, nil
			}
			return nil, fmt.Errorf("key not accepted")
		},
	}
	for _, k := range s.hostKeys {
		cfg.AddHostKey(k)
	}
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.conns.Add(1)
		go func() {
			sc, chans, reqs, err := xssh.NewServerConn(c, cfg)
			if err != nil {
				c.Close()
				return
			}
			defer sc.Close()
			go xssh.DiscardRequests(reqs)
			for nc := range chans {
				switch nc.ChannelType() {
				case "session":
					ch, creqs, err := nc.Accept()
					if err != nil {
						continue
					}
					go s.session(sc.User(), ch, creqs)
				case "direct-tcpip":
					if !s.tunnel {
						nc.Reject(xssh.Prohibited, "no tunnels")
						continue
					}
					go s.directTCPIP(nc)
				default:
					nc.Reject(xssh.UnknownChannelType, "no")
				}
			}
		}()
	}
}

func (s *testServer) directTCPIP(nc xssh.NewChannel) {
	var p struct {
		Host     string
		Port     uint32
		OrigHost string
		OrigPort uint32
	}
	if err := xssh.Unmarshal(nc.ExtraData(), &p); err != nil {
		nc.Reject(xssh.ConnectionFailed, err.Error())
		return
	}
	conn, err := net.Dial("tcp", net.JoinHostPort(p.Host, strconv.Itoa(int(p.Port))))
	if err != nil {
		nc.Reject(xssh.ConnectionFailed, err.Error())
		return
	}
	ch, reqs, err := nc.Accept()
	if err != nil {
		conn.Close()
		return
	}
	go xssh.DiscardRequests(reqs)
	go func() { io.Copy(ch, conn); ch.CloseWrite() }()
	io.Copy(conn, ch)
	conn.Close()
	ch.Close()
}

// session serves one session channel: one exec, signals, and kills the
// command when the client goes away.
func (s *testServer) session(user string, ch xssh.Channel, reqs <-chan *xssh.Request) {
	var (
		mu   sync.Mutex
		proc *os.Process
	)
	kill := func(sig syscall.Signal) {
		mu.Lock()
		defer mu.Unlock()
		if proc != nil {
			syscall.Kill(-proc.Pid, sig)
		}
	}
	defer kill(syscall.SIGKILL)
	for req := range reqs {
		switch req.Type {
		case "exec":
			var p struct{ Command string }
			if err := xssh.Unmarshal(req.Payload, &p); err != nil {
				req.Reply(false, nil)
				continue
			}
			req.Reply(true, nil)
			s.execs.Add(1)
			s.mu.Lock()
			s.cmds = append(s.cmds, p.Command)
			s.mu.Unlock()
			cmdline := p.Command
			if user != "root" {
				rest, ok := strings.CutPrefix(cmdline, "sudo -n ")
				if !ok {
					s.exit(ch, 1, "not run through sudo -n: "+cmdline+"\n")
					continue
				}
				if s.sudo == "password" {
					s.exit(ch, 1, "sudo: a password is required\n")
					continue
				}
				cmdline = rest
			}
			c := exec.Command("/bin/sh", "-c", cmdline)
			c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			c.Stdin, c.Stdout, c.Stderr = ch, ch, ch.Stderr()
			c.WaitDelay = time.Second
			if err := c.Start(); err != nil {
				s.exit(ch, 127, err.Error()+"\n")
				continue
			}
			mu.Lock()
			proc = c.Process
			mu.Unlock()
			go func() {
				err := c.Wait()
				code := 0
				if ee, ok := err.(*exec.ExitError); ok {
					code = exitCode(ee)
				}
				s.exit(ch, code, "")
			}()
		case "signal":
			kill(syscall.SIGTERM)
		default:
			if req.WantReply {
				req.Reply(false, nil)
			}
		}
	}
}

func (s *testServer) exit(ch xssh.Channel, code int, stderr string) {
	if stderr != "" {
		io.WriteString(ch.Stderr(), stderr)
	}
	ch.SendRequest("exit-status", false, xssh.Marshal(struct{ Status uint32 }{uint32(code)}))
	ch.Close()
}

// knownHostsLine is the known_hosts line for s with key k.
func (s *testServer) knownHostsLine(k xssh.PublicKey) string {
	return fmt.Sprintf("[%s]:%d %s", s.host, s.port, strings.TrimSpace(string(xssh.MarshalAuthorizedKey(k))))
}

// target is a Target for s with the given key file and known_hosts file.
func (s *testServer) target(name, user, keyFile, knownHosts string) inventory.Target {
	return inventory.Target{
		Name: name, Address: s.host, Port: s.port, User: user,
		IdentityFile: keyFile, KnownHostsFile: knownHosts,
		ConnectTimeout: 2 * time.Second, CommandTimeout: 10 * time.Second,
	}
}

// fastOpts retries quickly so that tests stay fast.
var fastOpts = Options{Retries: 2, RetryBackoff: 10 * time.Millisecond}
