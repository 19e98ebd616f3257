package kubeproxy

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kpfree/kpfree/internal/lab"
)

// hostHTTP talks to lab addresses directly, whatever proxy the environment names.
var hostHTTP = &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}

// Echo is an agnhost serve-hostname running in a lab node: every HTTP
// request gets the node's hostname (e.g. "node2") back.
type Echo struct {
	Node string
	// Addr is the node address and port it serves on.
	Addr netip.AddrPort

	cmd  *exec.Cmd
	done chan struct{}
}

// StartEchoServer starts `agnhost serve-hostname --port PORT` (the upstream
// e2e test server) inside node and waits until it answers on the node's
// address. agnhost's netexec would also serve, but it has /shell and
// /upload handlers: serve-hostname does only the one thing.
func StartEchoServer(ctx context.Context, s *lab.State, node string, port uint16) (*Echo, error) {
	bin, err := NodeBinary(s, "agnhost")
	if err != nil {
		return nil, err
	}
	n := s.Node(node)
	if n == nil {
		return nil, fmt.Errorf("lab %s has no node %q", s.Dir, node)
	}
	cmd, err := s.Command(context.WithoutCancel(ctx), node, bin, "serve-hostname", "--port", strconv.Itoa(int(port)))
	if err != nil {
		return nil, err
	}
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = io.Discard, &log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start agnhost in %s: %w", node, err)
	}
	e := &Echo{Node: node, Addr: netip.AddrPortFrom(n.Address, port), cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(e.done) }()
	url := "http://" + e.Addr.String() + "/"
	for {
		got, err := httpGet(ctx, url)
		if err == nil && got == node {
			return e, nil
		}
		if err == nil {
			err = fmt.Errorf("answered %q, want %q", got, node)
		}
		select {
		case <-e.done:
			return nil, fmt.Errorf("agnhost serve-hostname in %s exited: %s", node, bytes.TrimSpace(log.Bytes()))
		case <-ctx.Done():
			e.Stop()
			return nil, fmt.Errorf("agnhost serve-hostname in %s not answering on %s: %w", node, url, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Stop kills the echo server (the process StartEchoServer started) and waits for it.
func (e *Echo) Stop() { lab.StopStarted(e.cmd.Process, e.done, 5*time.Second) }

func httpGet(ctx context.Context, url string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := hostHTTP.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return strings.TrimSpace(string(body)), nil
}

// Curl fetches url with curl from inside node (its network namespace, so
// through the node's kube-proxy rules) and returns the body, trimmed.
// source, when valid, is the local address to send from (curl --interface),
// e.g. a pod-like address inside the cluster CIDR that AddLocalAddress put on
// the node.
func Curl(ctx context.Context, s *lab.State, node, url string, source netip.Addr) (string, error) {
	args := []string{"curl", "-sS", "--fail", "--noproxy", "*", "--max-time", "5"}
	if source.IsValid() {
		args = append(args, "--interface", source.String())
	}
	out, err := s.Exec(ctx, node, append(args, url)...)
	return strings.TrimSpace(string(out)), err
}

// AddLocalAddress puts addr/32 on the node's lo (inside the node only), so a
// client in the node can send from a pod-like source address. The backends'
// nodes need a route back to it: see AddRoute.
func AddLocalAddress(ctx context.Context, s *lab.State, node string, addr netip.Addr) error {
	_, err := s.Exec(ctx, node, "ip", "addr", "replace", netip.PrefixFrom(addr, addr.BitLen()).String(), "dev", "lo")
	return err
}

// AddRoute adds a route to dst via gw inside node (e.g. on a backend's node,
// to the client node's pod-like addresses).
func AddRoute(ctx context.Context, s *lab.State, node string, dst netip.Prefix, gw netip.Addr) error {
	_, err := s.Exec(ctx, node, "ip", "route", "replace", dst.String(), "via", gw.String())
	return err
}
