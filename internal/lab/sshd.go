package lab

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"
)

// nodeAuthorizedKeys is, inside every node, the authorized keys file sshd
// reads for every user: it lives in the node's /etc overlay, so that users
// can read it whatever the permissions of the state dir.
const nodeAuthorizedKeys = "/etc/ssh/authorized_keys.d/kpfree-lab"

// genKey writes an ed25519 key pair to path and path.pub and returns the
// public key in authorized_keys format (no trailing newline).
func genKey(path, comment string) (string, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", err
	}
	block, err := ssh.MarshalPrivateKey(priv, comment)
	if err != nil {
		return "", err
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return "", err
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub))) + " " + comment
	if err := writeFileAtomic(path, pem.EncodeToMemory(block), 0o600); err != nil {
		return "", err
	}
	if err := writeFileAtomic(path+".pub", []byte(line+"\n"), 0o644); err != nil {
		return "", err
	}
	return line, nil
}

// readPubKey returns the key in path.pub when path (the private key) exists too.
func readPubKey(path string) (string, bool) {
	if _, err := os.Stat(path); err != nil {
		return "", false
	}
	data, err := os.ReadFile(path + ".pub")
	if err != nil {
		return "", false
	}
	if _, _, _, _, err := ssh.ParseAuthorizedKey(data); err != nil {
		return "", false
	}
	return strings.TrimSpace(string(data)), true
}

// ensureUserKey creates the lab's user key pair once and returns its public key.
func (s *State) ensureUserKey() (string, error) {
	if err := os.MkdirAll(filepath.Join(s.Dir, "ssh"), 0o700); err != nil {
		return "", err
	}
	if pub, ok := readPubKey(s.IdentityFile()); ok {
		return pub, nil
	}
	pub, err := genKey(s.IdentityFile(), "kpfree-lab@"+s.Prefix)
	if err != nil {
		return "", fmt.Errorf("user key: %w", err)
	}
	return pub, nil
}

func (s *State) sshdConfigPath(node string) string {
	return filepath.Join(s.nodeDir(node), "sshd_config")
}

func (s *State) hostKeyPath(node string) string {
	return filepath.Join(s.nodeDir(node), "ssh_host_ed25519_key")
}

// ensureHostKey returns node's host public key, generating the pair if needed.
func (s *State) ensureHostKey(node string) (string, error) {
	if pub, ok := readPubKey(s.hostKeyPath(node)); ok {
		return pub, nil
	}
	return genKey(s.hostKeyPath(node), "root@"+node)
}

// sshdConfig renders node n's sshd_config. Everything sshd writes lives in the
// node's state dir or the node's own /run.
func (s *State) sshdConfig(n *Node) string {
	nd := s.nodeDir(n.Name)
	return fmt.Sprintf(`# kpfree lab node %[1]s (generated)
ListenAddress 0.0.0.0:22
HostKey %[2]s
PidFile %[3]s
AuthorizedKeysFile %[4]s
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# No PAM: there is no systemd-logind and no loginuid to set in a lab node.
UsePAM no
# The state dir may live under a world-writable /tmp (keys and config are
# read by root only; authorized keys live in the node's own /etc).
StrictModes no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding yes
AcceptEnv LANG LC_*
SetEnv KPFREE_LAB_NODE=%[1]s
Subsystem sftp internal-sftp
MaxStartups 200
MaxSessions 100
LogLevel INFO
`, n.Name, s.hostKeyPath(n.Name), filepath.Join(nd, "sshd.pid"), nodeAuthorizedKeys)
}

// startSSHD starts node n's sshd in the node's namespaces (through its
// holder) and cgroup and waits until it answers with its banner.
func (s *State) startSSHD(ctx context.Context, n *Node) (int, error) {
	nd := s.nodeDir(n.Name)
	cfg := s.sshdConfigPath(n.Name)
	if err := writeFileAtomic(cfg, []byte(s.sshdConfig(n)), 0o644); err != nil {
		return 0, err
	}
	logf, err := os.OpenFile(filepath.Join(nd, "sshd.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	argv := s.inV1Cgroups(n, []string{"nsenter", "-t", strconv.Itoa(n.HolderPID), "-n", "-m", "-u", "--",
		// -r: no re-exec per connection. Lab nodes share this machine's cores;
		// re-exec costs ~30 ms of CPU per login here, which real hosts pay on
		// their own CPUs.
		sshdPath, "-D", "-e", "-r", "-f", cfg})
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = baseEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := startDaemon(cmd, n.Cgroup); err != nil {
		return 0, fmt.Errorf("start sshd: %w", err)
	}
	pid := cmd.Process.Pid
	if err := waitBanner(ctx, n.Address, pid, 15*time.Second); err != nil {
		_ = cmd.Process.Kill() // a pidfd underneath: never a recycled PID
		return 0, fmt.Errorf("sshd on %s: %w (log: %s)", n.Address, err, tail(filepath.Join(nd, "sshd.log")))
	}
	return pid, nil
}

// waitBanner waits until addr:22 answers with an SSH banner, or pid dies.
func waitBanner(ctx context.Context, addr netip.Addr, pid int, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	target := netip.AddrPortFrom(addr, 22).String()
	var last error
	for time.Now().Before(deadline) {
		if !alive(pid) {
			return errors.New("sshd exited")
		}
		d := net.Dialer{Timeout: time.Second}
		c, err := d.DialContext(ctx, "tcp", target)
		if err == nil {
			_ = c.SetDeadline(time.Now().Add(2 * time.Second))
			line, rerr := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if rerr == nil && strings.HasPrefix(line, "SSH-2.0-") {
				return nil
			}
			err = fmt.Errorf("banner %q: %v", line, rerr)
		}
		last = err
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(15 * time.Millisecond):
		}
	}
	return fmt.Errorf("no SSH banner after %s: %v", timeout, last)
}

// stopSSHD stops node n's recorded sshd. The caller holds s.mu or owns n.
func (s *State) stopSSHD(ctx context.Context, n *Node) error {
	if err := killVerified(ctx, n.SSHDPID, func(p int) bool { return s.isSSHD(n, p) }, 3*time.Second); err != nil {
		return fmt.Errorf("%s: stop sshd: %w", n.Name, err)
	}
	n.SSHDPID = 0
	return nil
}

// StopSSHD stops node's sshd (the node and its holder keep running).
func (s *State) StopSSHD(ctx context.Context, node string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.node(node)
	if err != nil {
		return err
	}
	if err := s.stopSSHD(ctx, n); err != nil {
		return err
	}
	return s.save()
}

// StartSSHD starts node's sshd unless it runs already.
func (s *State) StartSSHD(ctx context.Context, node string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.node(node)
	if err != nil {
		return err
	}
	if s.isSSHD(n, n.SSHDPID) {
		return nil
	}
	if !s.isHolder(n, n.HolderPID) {
		return fmt.Errorf("%s: the node's holder is not running: run lab up again", node)
	}
	pid, err := s.startSSHD(ctx, n)
	if err != nil {
		return fmt.Errorf("%s: %w", node, err)
	}
	n.SSHDPID = pid
	return s.save()
}

// RotateHostKey gives node a new host key and restarts its sshd. The known
// hosts file is left as it was, so clients see a changed host key; call
// WriteKnownHosts to trust the new key.
func (s *State) RotateHostKey(ctx context.Context, node string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.node(node)
	if err != nil {
		return err
	}
	if err := s.stopSSHD(ctx, n); err != nil {
		return err
	}
	pub, err := genKey(s.hostKeyPath(n.Name), "root@"+n.Name)
	if err != nil {
		return fmt.Errorf("%s: new host key: %w", node, err)
	}
	n.HostKey = pub
	pid, err := s.startSSHD(ctx, n)
	if err != nil {
		_ = s.save()
		return fmt.Errorf("%s: %w", node, err)
	}
	n.SSHDPID = pid
	return s.save()
}

// WriteKnownHosts writes KnownHostsFile from the nodes' current host keys.
func (s *State) WriteKnownHosts() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.writeKnownHosts()
}

func (s *State) writeKnownHosts() error {
	data, err := s.knownHosts()
	if err != nil {
		return err
	}
	return writeFileAtomic(s.KnownHostsFile(), data, 0o644)
}

// knownHosts renders one "ADDRESS KEYTYPE KEY" line per node (port 22, so no
// [host]:port form).
func (s *State) knownHosts() ([]byte, error) {
	var b bytes.Buffer
	for _, n := range s.Nodes {
		if n.HostKey == "" {
			continue
		}
		pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(n.HostKey))
		if err != nil {
			return nil, fmt.Errorf("%s: host key: %w", n.Name, err)
		}
		b.WriteString(knownhosts.Line([]string{knownhosts.Normalize(n.Address.String() + ":22")}, pub))
		b.WriteByte('\n')
	}
	return b.Bytes(), nil
}

// SSHCommand returns an /usr/bin/ssh command that runs remote (a shell
// command line; empty for none) on node as user, with the lab's key and known
// hosts and strict host key checking.
func (s *State) SSHCommand(ctx context.Context, node, user string, remote ...string) (*exec.Cmd, error) {
	n := s.Node(node)
	if n == nil {
		return nil, fmt.Errorf("lab %s has no node %q", s.Dir, node)
	}
	args := []string{
		"-i", s.IdentityFile(),
		"-o", "IdentitiesOnly=yes",
		"-o", "UserKnownHostsFile=" + s.KnownHostsFile(),
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes",
		"-o", "BatchMode=yes",
		"-o", "ConnectTimeout=10",
		"-o", "LogLevel=ERROR",
		"-l", user,
		n.Address.String(),
	}
	if len(remote) > 0 {
		args = append(args, "--")
		args = append(args, remote...)
	}
	return exec.CommandContext(ctx, "ssh", args...), nil
}
