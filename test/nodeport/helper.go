package nodeport

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/kpfree/kpfree/bpf"
)

// HelperEnv names the environment variable that turns the test (or bench)
// binary into one of its helpers when it is re-executed inside a lab node
// or pod: "echo", "probe" or "uninstall". RunHelper reads it.
const HelperEnv = "KPFREE_NODEPORT_HELPER"

// RunHelper runs the helper HelperEnv names and exits, or returns false when
// the variable is unset. Call it first thing in TestMain (or main) of a
// binary whose helpers Cluster starts.
func RunHelper() bool {
	mode := os.Getenv(HelperEnv)
	if mode == "" {
		return false
	}
	var err error
	switch mode {
	case "echo":
		err = echoMain(os.Args[1:])
	case "probe":
		err = probeMain(os.Args[1:])
	case "uninstall":
		err = uninstallMain(os.Args[1:])
	default:
		err = fmt.Errorf("%s=%q: want echo, probe or uninstall", HelperEnv, mode)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "nodeport helper %s: %v\n", mode, err)
		os.Exit(1)
	}
	os.Exit(0)
	return true
}

// echoMain serves TCP and UDP on one port: every request (a TCP connection
// with one line, or a UDP datagram) gets "NAME CLIENT-ADDR:PORT\n" back, the
// name of the pod and the source address the server saw. The TCP server
// closes first, so the client's ports do not linger in TIME_WAIT.
func echoMain(args []string) error {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	name := fs.String("name", "", "name to answer with")
	port := fs.Int("port", 8080, "TCP and UDP port")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *name == "" {
		return errors.New("-name is required")
	}
	addr := fmt.Sprintf(":%d", *port)
	tl, err := net.Listen("tcp4", addr)
	if err != nil {
		return err
	}
	ul, err := net.ListenPacket("udp4", addr)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		buf := make([]byte, 512)
		for {
			n, from, err := ul.ReadFrom(buf)
			if err != nil {
				return
			}
			_ = n
			_, _ = ul.WriteTo([]byte(*name+" "+from.String()+"\n"), from)
		}
	}()
	go func() {
		defer wg.Done()
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
					return
				}
				_, _ = c.Write([]byte(*name + " " + c.RemoteAddr().String() + "\n"))
			}()
		}
	}()
	fmt.Println("ready")
	wg.Wait()
	return nil
}

// Reply is one probe attempt: who answered and the client address it saw,
// or the error.
type Reply struct {
	Name string `json:"name,omitempty"`
	// Seen is the client address (ip:port) the server saw.
	Seen string `json:"seen,omitempty"`
	Err  string `json:"err,omitempty"`
	// RTT is connect + request + reply (+ close for TCP), in nanoseconds.
	RTT time.Duration `json:"rttNs"`
}

// SeenAddr is the address part of Seen (invalid when there was no answer).
func (r Reply) SeenAddr() netip.Addr {
	ap, err := netip.ParseAddrPort(r.Seen)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr()
}

// ProbeRequest is what a probe does: Count sequential requests to Addr,
// each on a new connection (TCP) or socket (UDP).
type ProbeRequest struct {
	Proto string         // "tcp" or "udp"
	Addr  netip.AddrPort // where to send
	// Source, when valid, is the local address to send from; SourcePort,
	// when not zero, the local port (the same for every attempt).
	Source     netip.Addr
	SourcePort uint16
	Count      int
	// Timeout bounds each attempt (default 1 s); Budget the whole probe
	// (default Count x Timeout + 5 s).
	Timeout, Budget time.Duration
}

func (p ProbeRequest) args() []string {
	a := []string{"-proto", p.Proto, "-addr", p.Addr.String(), "-count", fmt.Sprint(max(p.Count, 1))}
	if p.Source.IsValid() {
		a = append(a, "-source", p.Source.String())
	}
	if p.SourcePort != 0 {
		a = append(a, "-sport", fmt.Sprint(p.SourcePort))
	}
	if p.Timeout > 0 {
		a = append(a, "-timeout", p.Timeout.String())
	}
	if p.Budget > 0 {
		a = append(a, "-budget", p.Budget.String())
	}
	return a
}

func probeMain(args []string) error {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	proto := fs.String("proto", "tcp", "tcp or udp")
	addr := fs.String("addr", "", "IP:PORT")
	source := fs.String("source", "", "local address")
	sport := fs.Int("sport", 0, "local port")
	count := fs.Int("count", 1, "requests")
	timeout := fs.Duration("timeout", time.Second, "per request")
	budget := fs.Duration("budget", 0, "whole probe (default count x timeout + 5s)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	to, err := netip.ParseAddrPort(*addr)
	if err != nil {
		return fmt.Errorf("-addr: %w", err)
	}
	var from netip.Addr
	if *source != "" {
		if from, err = netip.ParseAddr(*source); err != nil {
			return fmt.Errorf("-source: %w", err)
		}
	}
	if *budget == 0 {
		*budget = time.Duration(*count)*(*timeout) + 5*time.Second
	}
	deadline := time.Now().Add(*budget)
	out := make([]Reply, 0, *count)
	for i := 0; i < *count && time.Now().Before(deadline); i++ {
		out = append(out, once(*proto, to, netip.AddrPortFrom(from, uint16(*sport)), *timeout))
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

func once(proto string, to, from netip.AddrPort, timeout time.Duration) Reply {
	t0 := time.Now()
	d := net.Dialer{Timeout: timeout, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		_ = c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1) })
		return serr
	}}
	if from.Addr().IsValid() || from.Port() != 0 {
		la := from
		if !la.Addr().IsValid() {
			la = netip.AddrPortFrom(netip.IPv4Unspecified(), from.Port())
		}
		if proto == "udp" {
			d.LocalAddr = net.UDPAddrFromAddrPort(la)
		} else {
			d.LocalAddr = net.TCPAddrFromAddrPort(la)
		}
	}
	c, err := d.Dial(proto+"4", to.String())
	if err != nil {
		return Reply{Err: err.Error(), RTT: time.Since(t0)}
	}
	defer c.Close()
	_ = c.SetDeadline(t0.Add(timeout))
	if _, err := c.Write([]byte("hello\n")); err != nil {
		return Reply{Err: err.Error(), RTT: time.Since(t0)}
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return Reply{Err: err.Error(), RTT: time.Since(t0)}
	}
	_ = c.Close()
	rtt := time.Since(t0)
	name, seen, _ := strings.Cut(strings.TrimSpace(line), " ")
	return Reply{Name: name, Seen: seen, RTT: rtt}
}

// uninstallMain removes an agent's programs and pins from inside its node
// (whose mount namespace holds the agent's bpffs).
func uninstallMain(args []string) error {
	fs := flag.NewFlagSet("uninstall", flag.ContinueOnError)
	pins := fs.String("bpffs", "", "the agent's --bpffs")
	cgroup := fs.String("cgroup-root", "", "the agent's --cgroup-root")
	if err := fs.Parse(args); err != nil {
		return err
	}
	return bpf.Uninstall(*pins, *cgroup)
}
