//go:build linux

package bpf_test

// Test harness for the integration tier: a private bpffs, a child cgroup2
// directory (or, inside the kernel-matrix VM only, the cgroup2 root), a
// private network namespace with only loopback (so an untranslated VIP fails
// at once with ENETUNREACH and nothing leaves the machine), echo servers
// inside it, and client processes: the test binary re-executed in client
// mode, moved into the cgroup (or not) before it opens a socket.

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kpfree/kpfree/bpf"
)

const envClient = "KPFREE_SOCKLB_TEST_CLIENT"

func TestMain(m *testing.M) {
	if req := os.Getenv(envClient); req != "" {
		os.Exit(clientMain(req))
	}
	os.Exit(m.Run())
}

// requireRoot skips integration tests where they cannot run.
func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: skipped under -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("integration test: needs root (BPF, cgroup2, bpffs mount, netns)")
	}
}

type env struct {
	t      *testing.T
	pinDir string // private bpffs mount
	cgroup string // child cgroup2 directory, or the cgroup2 root (atRoot)
	atRoot bool   // only inside the kernel-matrix VM (KPFREE_IN_VM=1)
	netns  *os.File

	uninstallSet bool
}

// newEnv gives the test a child cgroup of its own.
func newEnv(t *testing.T) *env { return newEnvAt(t, false) }

// newRootEnv attaches at the cgroup2 root, which rewrites every connection of
// the machine: only inside the kernel-matrix VM (KPFREE_IN_VM=1). Anywhere
// else it is newEnv: a child cgroup.
func newRootEnv(t *testing.T) *env { return newEnvAt(t, bpf.InVM()) }

func newEnvAt(t *testing.T, atRoot bool) *env {
	requireRoot(t)
	root, err := bpf.Cgroup2Mount()
	if err != nil {
		t.Skipf("integration test: %v", err)
	}
	e := &env{t: t, atRoot: atRoot}

	e.pinDir = t.TempDir()
	if err := unix.Mount("bpf", e.pinDir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(e.pinDir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs: %v", err)
		}
	})

	if atRoot {
		if !bpf.InVM() {
			t.Fatal("attaching at the cgroup2 root outside the kernel-matrix VM")
		}
		if !bpf.IsCgroup2Root(root) {
			t.Fatalf("%s is not a cgroup2 root", root)
		}
		e.cgroup = root
		t.Logf("KPFREE_IN_VM=1: attaching at the cgroup2 root %s", root)
	} else {
		e.cgroup = e.newCgroup(root, "kpfree-test-")
	}

	e.netns, err = newNetns()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() { e.netns.Close() })
	return e
}

// newCgroup creates a cgroup2 directory under parent, removed at cleanup.
func (e *env) newCgroup(parent, prefix string) string {
	e.t.Helper()
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	dir := filepath.Join(parent, prefix+hex.EncodeToString(rnd[:]))
	if err := os.Mkdir(dir, 0o755); err != nil {
		e.t.Fatalf("create cgroup: %v", err)
	}
	e.t.Cleanup(func() {
		// Client processes have exited; the kernel may take a moment to
		// notice. Bounded retries.
		var err error
		for range 50 {
			if err = os.Remove(dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		e.t.Errorf("remove cgroup %s: %v", dir, err)
	})
	return dir
}

// subCgroup creates a descendant of the env's cgroup: programs attached with
// BPF_F_ALLOW_MULTI (and links) apply to it too.
func (e *env) subCgroup() string { return e.newCgroup(e.cgroup, "sub-") }

func readDirNames(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names, err
}

// inNetns runs fn on a thread moved into ns. The thread is locked and never
// unlocked, so the runtime discards it afterwards instead of reusing a
// thread in the wrong namespace.
func inNetns(ns *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// newNetns creates a network namespace with loopback up and returns a handle.
func newNetns() (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	c := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			c <- result{err: err}
			return
		}
		f, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
		if err != nil {
			c <- result{err: err}
			return
		}
		if err := linkUp("lo"); err != nil {
			f.Close()
			c <- result{err: err}
			return
		}
		c <- result{f: f}
	}()
	r := <-c
	return r.f, r.err
}

func linkUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

// tcpServer listens in the netns and answers every connection with its name.
func (e *env) tcpServer(name, addr string) netip.AddrPort {
	e.t.Helper()
	var ln net.Listener
	if err := inNetns(e.netns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		e.t.Fatalf("listen %s: %v", addr, err)
	}
	e.t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte(name + "\n"))
			c.Close()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// udpServer answers every datagram with its name.
func (e *env) udpServer(name, addr string) netip.AddrPort {
	e.t.Helper()
	var pc net.PacketConn
	if err := inNetns(e.netns, func() (err error) {
		pc, err = net.ListenPacket("udp", addr)
		return err
	}); err != nil {
		e.t.Fatalf("listen %s: %v", addr, err)
	}
	e.t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			_, src, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo([]byte(name+"\n"), src)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// clientReq is what a client process does.
type clientReq struct {
	Op      string        // tcp, tcp6raw, udp, udpconn, tcploop
	Addr    string        // destination, e.g. 10.96.0.10:80
	N       int           // attempts (tcploop: upper bound)
	Timeout time.Duration // per attempt
}

type attempt struct {
	Reply string // the backend's name, "" on failure
	Peer  string // getpeername (tcp, udpconn) or the reply's source (udp)
	Errno string // e.g. ECONNREFUSED; "" on success
	Err   string // full error text
	// Millis runs from the call the programs intercept (connect, sendmsg)
	// to its failure, or to the reply: socket setup is left out, so a
	// stall of a slow (qemu TCG) machine is less likely to land in it.
	Millis float64
}

type clientResult struct {
	Attempts []attempt
	OK, Fail int // tcploop
}

// client starts a client process; inCgroup moves it into the test cgroup
// before it opens any socket. Call wait on the returned handle.
type clientProc struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout bytes.Buffer
	stderr bytes.Buffer
}

func (e *env) startClient(req clientReq, inCgroup bool) *clientProc {
	e.t.Helper()
	switch {
	case inCgroup:
		return e.startClientIn(req, e.cgroup)
	case e.atRoot:
		e.t.Fatal("attached at the cgroup2 root: no process is outside it")
	}
	return e.startClientIn(req, "")
}

// startClientIn starts a client moved into cgroup dir ("": left where the
// test binary is).
func (e *env) startClientIn(req clientReq, dir string) *clientProc {
	e.t.Helper()
	js, _ := json.Marshal(req)
	exe, err := os.Executable()
	if err != nil {
		e.t.Fatal(err)
	}
	p := &clientProc{cmd: exec.Command(exe, "-test.run=^$")}
	p.cmd.Env = append(os.Environ(), envClient+"="+string(js))
	p.cmd.ExtraFiles = []*os.File{e.netns} // fd 3
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		e.t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = p.cmd.Process.Kill()
			_ = p.cmd.Wait()
		}
	})
	if dir != "" {
		pid := strconv.Itoa(p.cmd.Process.Pid)
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(pid), 0o644); err != nil {
			e.t.Fatalf("move client into cgroup: %v", err)
		}
	}
	if _, err := p.stdin.Write([]byte{'g'}); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// wait closes stdin (which also stops a tcploop) and decodes the result.
func (p *clientProc) wait(t *testing.T) clientResult {
	t.Helper()
	p.stdin.Close()
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("client: %v\n%s", err, p.stderr.String())
	}
	var r clientResult
	if err := json.Unmarshal(p.stdout.Bytes(), &r); err != nil {
		t.Fatalf("client output: %v\n%s\n%s", err, p.stdout.String(), p.stderr.String())
	}
	return r
}

// run starts a client, waits for it and returns its attempts.
func (e *env) run(req clientReq, inCgroup bool) []attempt {
	e.t.Helper()
	return e.startClient(req, inCgroup).wait(e.t).Attempts
}

// runIn runs a client in cgroup dir.
func (e *env) runIn(req clientReq, dir string) []attempt {
	e.t.Helper()
	return e.startClientIn(req, dir).wait(e.t).Attempts
}

// sent counts, in the env's netns, what a connect() or sendmsg() lets out:
// SYNs (Tcp ActiveOpens, both families: tcp_connect() counts each) and UDP
// datagrams (Udp OutDatagrams, Udp6OutDatagrams). Nothing else in the netns
// opens connections or sends unsolicited datagrams.
type sent struct{ SYNs, UDP4, UDP6 uint64 }

func (e *env) sent() sent {
	e.t.Helper()
	var s sent
	err := inNetns(e.netns, func() error {
		snmp, err := os.ReadFile("/proc/thread-self/net/snmp")
		if err != nil {
			return err
		}
		snmp6, err := os.ReadFile("/proc/thread-self/net/snmp6")
		if err != nil {
			return err
		}
		var errs []error
		for _, c := range []struct {
			dst        *uint64
			data       []byte
			group, key string
		}{
			{&s.SYNs, snmp, "Tcp:", "ActiveOpens"},
			{&s.UDP4, snmp, "Udp:", "OutDatagrams"},
			{&s.UDP6, snmp6, "", "Udp6OutDatagrams"},
		} {
			var err error
			*c.dst, err = snmpCounter(string(c.data), c.group, c.key)
			errs = append(errs, err)
		}
		return errors.Join(errs...)
	})
	if err != nil {
		e.t.Fatalf("netns counters: %v", err)
	}
	return s
}

// snmpCounter reads key from /proc/net/snmp (group "Tcp:": a header line of
// names, then a line of values) or, with group "", /proc/net/snmp6 (one
// "name value" per line).
func snmpCounter(data, group, key string) (uint64, error) {
	var names []string
	for _, line := range strings.Split(data, "\n") {
		f := strings.Fields(line)
		switch {
		case group == "" && len(f) == 2 && f[0] == key:
			return strconv.ParseUint(f[1], 10, 64)
		case group == "" || len(f) == 0 || f[0] != group:
		case names == nil:
			names = f
		default:
			for i, n := range names {
				if n == key && i < len(f) {
					return strconv.ParseUint(f[i], 10, 64)
				}
			}
			return 0, fmt.Errorf("%s %s: no such counter", group, key)
		}
	}
	return 0, fmt.Errorf("%s %s: not found", group, key)
}

// ---- client mode (runs in the child process) ----

func clientMain(js string) int {
	var req clientReq
	if err := json.Unmarshal([]byte(js), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadByte(); err != nil { // placed in the cgroup by now
		fmt.Fprintln(os.Stderr, "no go signal:", err)
		return 2
	}
	// Every socket is opened by this goroutine on this thread, in the netns.
	runtime.LockOSThread()
	if err := unix.Setns(3, unix.CLONE_NEWNET); err != nil {
		fmt.Fprintln(os.Stderr, "setns:", err)
		return 2
	}
	var stop atomic.Bool
	go func() {
		_, _ = io.Copy(io.Discard, in)
		stop.Store(true)
	}()
	if req.Timeout == 0 {
		req.Timeout = 2 * time.Second
	}
	var res clientResult
	switch req.Op {
	case "tcploop":
		deadline := time.Now().Add(60 * time.Second)
		for i := 0; i < req.N && !stop.Load() && time.Now().Before(deadline); i++ {
			a := tcpAttempt(req)
			if a.Errno == "" && a.Reply != "" {
				res.OK++
			} else {
				res.Fail++
				if len(res.Attempts) < 10 {
					res.Attempts = append(res.Attempts, a)
				}
			}
		}
	default:
		for range req.N {
			var a attempt
			switch req.Op {
			case "tcp":
				a = tcpAttempt(req)
			case "tcp6raw":
				a = tcp6RawAttempt(req)
			case "udp":
				a = udpAttempt(req)
			case "udpconn":
				a = udpConnAttempt(req)
			default:
				fmt.Fprintln(os.Stderr, "unknown op", req.Op)
				return 2
			}
			res.Attempts = append(res.Attempts, a)
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return 2
	}
	return 0
}

func failed(a attempt, err error, t0 time.Time) attempt {
	a.Millis = float64(time.Since(t0).Microseconds()) / 1000
	a.Err = err.Error()
	var errno syscall.Errno
	if errors.As(err, &errno) {
		a.Errno = unix.ErrnoName(errno)
	} else {
		a.Errno = "other"
	}
	return a
}

func peerOf(c syscall.Conn) string {
	rc, err := c.SyscallConn()
	if err != nil {
		return "error: " + err.Error()
	}
	var s string
	_ = rc.Control(func(fd uintptr) {
		sa, err := unix.Getpeername(int(fd))
		if err != nil {
			s = "error: " + err.Error()
			return
		}
		s = sockaddrString(sa)
	})
	return s
}

func sockaddrString(sa unix.Sockaddr) string {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port)).String()
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port)).String()
	}
	return fmt.Sprintf("%v", sa)
}

// atConnect is a net.Dialer that sets *t0 right before connect() (Control
// runs after socket() and the socket options).
func atConnect(timeout time.Duration, t0 *time.Time) *net.Dialer {
	*t0 = time.Now()
	return &net.Dialer{Timeout: timeout, Control: func(string, string, syscall.RawConn) error {
		*t0 = time.Now()
		return nil
	}}
}

func tcpAttempt(req clientReq) attempt {
	var a attempt
	var t0 time.Time
	c, err := atConnect(req.Timeout, &t0).Dial("tcp", req.Addr)
	if err != nil {
		return failed(a, err, t0)
	}
	defer c.Close()
	a.Peer = peerOf(c.(*net.TCPConn))
	_ = c.SetReadDeadline(time.Now().Add(req.Timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return failed(a, err, t0)
	}
	a.Reply = strings.TrimSpace(line)
	a.Millis = float64(time.Since(t0).Microseconds()) / 1000
	return a
}

// tcp6RawAttempt connects an AF_INET6 socket, so an IPv4-mapped destination
// goes through connect6.
func tcp6RawAttempt(req clientReq) attempt {
	var a attempt
	t0 := time.Now()
	ap := netip.MustParseAddrPort(req.Addr)
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return failed(a, err, t0)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(req.Timeout.Nanoseconds())
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	t0 = time.Now()
	if err := unix.Connect(fd, &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}); err != nil {
		return failed(a, err, t0)
	}
	if sa, err := unix.Getpeername(fd); err == nil {
		a.Peer = sockaddrString(sa)
	}
	buf := make([]byte, 64)
	n, err := unix.Read(fd, buf)
	if err != nil {
		return failed(a, err, t0)
	}
	a.Reply = strings.TrimSpace(string(buf[:n]))
	a.Millis = float64(time.Since(t0).Microseconds()) / 1000
	return a
}

func udpNetwork(addr string) string {
	if netip.MustParseAddrPort(addr).Addr().Is4() {
		return "udp4"
	}
	return "udp6"
}

// udpAttempt sends from an unconnected socket and reports the reply's source.
func udpAttempt(req clientReq) attempt {
	var a attempt
	t0 := time.Now()
	dst := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(req.Addr))
	c, err := net.ListenUDP(udpNetwork(req.Addr), nil)
	if err != nil {
		return failed(a, err, t0)
	}
	defer c.Close()
	t0 = time.Now()
	if _, err := c.WriteToUDP([]byte("ping"), dst); err != nil {
		return failed(a, err, t0)
	}
	_ = c.SetReadDeadline(time.Now().Add(req.Timeout))
	buf := make([]byte, 64)
	n, src, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return failed(a, err, t0)
	}
	a.Reply = strings.TrimSpace(string(buf[:n]))
	a.Peer = netip.AddrPortFrom(src.Addr().Unmap(), src.Port()).String()
	a.Millis = float64(time.Since(t0).Microseconds()) / 1000
	return a
}

// udpConnAttempt uses a connected UDP socket and reports getpeername.
func udpConnAttempt(req clientReq) attempt {
	var a attempt
	var t0 time.Time
	nc, err := atConnect(req.Timeout, &t0).Dial(udpNetwork(req.Addr), req.Addr)
	if err != nil {
		return failed(a, err, t0)
	}
	c := nc.(*net.UDPConn)
	defer c.Close()
	a.Peer = peerOf(c)
	if _, err := c.Write([]byte("ping")); err != nil {
		return failed(a, err, t0)
	}
	_ = c.SetReadDeadline(time.Now().Add(req.Timeout))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil {
		return failed(a, err, t0)
	}
	a.Reply = strings.TrimSpace(string(buf[:n]))
	a.Millis = float64(time.Since(t0).Microseconds()) / 1000
	return a
}

// ---- assertions ----

func replies(as []attempt) map[string]int {
	m := map[string]int{}
	for _, a := range as {
		m[a.Reply]++
	}
	return m
}

func requireAllOK(t *testing.T, as []attempt) {
	t.Helper()
	for i, a := range as {
		if a.Errno != "" || a.Reply == "" {
			t.Fatalf("attempt %d failed: %+v", i, a)
		}
	}
}
