//go:build linux

package bpf_test

// Test harness for the integration tier: a private bpffs, a child cgroup2
// directory, a private network namespace with only loopback (so an
// untranslated VIP fails at once with ENETUNREACH and nothing leaves the
// machine), echo servers inside it, and client processes: the test binary
// re-executed in client mode, moved into the cgroup (or not) before it opens
// a socket.

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
	cgroup string // child cgroup2 directory
	netns  *os.File

	uninstallSet bool
}

func newEnv(t *testing.T) *env {
	requireRoot(t)
	root, err := cgroup2Root()
	if err != nil {
		t.Skipf("integration test: %v", err)
	}
	e := &env{t: t}

	e.pinDir = t.TempDir()
	if err := unix.Mount("bpf", e.pinDir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(e.pinDir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs: %v", err)
		}
	})

	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	e.cgroup = filepath.Join(root, "kpfree-test-"+hex.EncodeToString(rnd[:]))
	if err := os.Mkdir(e.cgroup, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		// Client processes have exited; the kernel may take a moment to
		// notice. Bounded retries.
		var err error
		for range 50 {
			if err = os.Remove(e.cgroup); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", e.cgroup, err)
	})

	e.netns, err = newNetns()
	if err != nil {
		t.Fatalf("create netns: %v", err)
	}
	t.Cleanup(func() { e.netns.Close() })
	return e
}

func readDirNames(dir string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names, err
}

// cgroup2Root finds the cgroup2 mount (the unified hierarchy on hybrid hosts).
func cgroup2Root() (string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	var found []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		for i, x := range f {
			if x == "-" && i+1 < len(f) && f[i+1] == "cgroup2" && len(f) > 4 {
				found = append(found, f[4])
			}
		}
	}
	for _, p := range found {
		if p == "/sys/fs/cgroup/unified" {
			return p, nil
		}
	}
	if len(found) > 0 {
		return found[0], nil
	}
	return "", errors.New("no cgroup2 mount")
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
	Reply  string  // the backend's name, "" on failure
	Peer   string  // getpeername (tcp, udpconn) or the reply's source (udp)
	Errno  string  // e.g. ECONNREFUSED; "" on success
	Err    string  // full error text
	Millis float64 // duration of the failing or succeeding call
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
	if inCgroup {
		pid := strconv.Itoa(p.cmd.Process.Pid)
		if err := os.WriteFile(filepath.Join(e.cgroup, "cgroup.procs"), []byte(pid), 0o644); err != nil {
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

func tcpAttempt(req clientReq) attempt {
	var a attempt
	t0 := time.Now()
	c, err := net.DialTimeout("tcp", req.Addr, req.Timeout)
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
	t0 := time.Now()
	dst := net.UDPAddrFromAddrPort(netip.MustParseAddrPort(req.Addr))
	c, err := net.DialUDP(udpNetwork(req.Addr), nil, dst)
	if err != nil {
		return failed(a, err, t0)
	}
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
