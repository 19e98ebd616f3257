package healthcheck

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

var loopback = []netip.Addr{netip.MustParseAddr("127.0.0.1")}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) uint16 {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

type answer struct {
	status int
	header http.Header
	body   response
	raw    string
}

// get asks the health check on port once, on a new connection.
func get(t *testing.T, port uint16) (answer, error) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/", port))
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	return decode(t, resp)
}

func decode(t *testing.T, resp *http.Response) (answer, error) {
	t.Helper()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return answer{}, err
	}
	a := answer{status: resp.StatusCode, header: resp.Header, raw: string(raw)}
	if err := json.Unmarshal(raw, &a.body); err != nil {
		t.Fatalf("body %q: %v", raw, err)
	}
	return a, nil
}

func mustGet(t *testing.T, port uint16) answer {
	t.Helper()
	a, err := get(t, port)
	if err != nil {
		t.Fatalf("GET port %d: %v", port, err)
	}
	return a
}

func refused(t *testing.T, port uint16) {
	t.Helper()
	_, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("port %d: dial err = %v, want connection refused", port, err)
	}
}

func newServer(t *testing.T) *Server {
	s := New(loopback, nil)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestAnswers(t *testing.T) {
	s := newServer(t)
	p1, p2 := freePort(t), freePort(t)
	if err := s.Sync([]Check{
		{Namespace: "shop", Name: "web", Port: p1, LocalEndpoints: 2},
		{Namespace: "shop", Name: "db", Port: p2, LocalEndpoints: 0},
	}); err != nil {
		t.Fatal(err)
	}
	a := mustGet(t, p1)
	if a.status != http.StatusOK {
		t.Errorf("web: status %d, want 200", a.status)
	}
	if want := `{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}`; a.raw != want {
		t.Errorf("web: body %s, want %s", a.raw, want)
	}
	if a.header.Get("Content-Type") != "application/json" || a.header.Get("X-Content-Type-Options") != "nosniff" {
		t.Errorf("headers %v", a.header)
	}
	b := mustGet(t, p2)
	if b.status != http.StatusServiceUnavailable || b.body.Service.Name != "db" || b.body.LocalEndpoints != 0 {
		t.Errorf("db: %d %s, want 503 for db with 0 endpoints", b.status, b.raw)
	}

	s.SetProxyHealthy(false)
	if a := mustGet(t, p1); a.status != http.StatusServiceUnavailable || a.body.ServiceProxyHealthy {
		t.Errorf("proxy unhealthy: %d %s, want 503 and serviceProxyHealthy false", a.status, a.raw)
	}
	s.SetProxyHealthy(true)
	if a := mustGet(t, p1); a.status != http.StatusOK {
		t.Errorf("proxy healthy again: %d", a.status)
	}
}

func TestCountChangeKeepsListener(t *testing.T) {
	s := newServer(t)
	p := freePort(t)
	if err := s.Sync([]Check{{Namespace: "ns", Name: "a", Port: p, LocalEndpoints: 1}}); err != nil {
		t.Fatal(err)
	}
	before := s.ports[p]
	// A connection opened before the update: it would be closed if the
	// listener were replaced.
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", p))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	ask := func() answer {
		t.Helper()
		if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatalf("write on the old connection: %v", err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("read on the old connection: %v", err)
		}
		defer resp.Body.Close()
		a, err := decode(t, resp)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	if a := ask(); a.status != 200 || a.body.LocalEndpoints != 1 {
		t.Fatalf("before: %d %s", a.status, a.raw)
	}

	if err := s.Sync([]Check{{Namespace: "ns", Name: "a", Port: p, LocalEndpoints: 0}}); err != nil {
		t.Fatal(err)
	}
	if a := ask(); a.status != 503 || a.body.LocalEndpoints != 0 {
		t.Errorf("count 0 on the same connection: %d %s, want 503", a.status, a.raw)
	}
	if err := s.Sync([]Check{{Namespace: "ns", Name: "renamed", Port: p, LocalEndpoints: 3}}); err != nil {
		t.Fatal(err)
	}
	if a := ask(); a.status != 200 || a.body.LocalEndpoints != 3 || a.body.Service.Name != "renamed" {
		t.Errorf("count 3 on the same connection: %d %s", a.status, a.raw)
	}
	if s.ports[p] != before {
		t.Error("the port's server was replaced; want it updated in place")
	}
}

func TestPortRemoved(t *testing.T) {
	s := newServer(t)
	p1, p2 := freePort(t), freePort(t)
	if err := s.Sync([]Check{{Namespace: "ns", Name: "a", Port: p1, LocalEndpoints: 1}, {Namespace: "ns", Name: "b", Port: p2, LocalEndpoints: 1}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync([]Check{{Namespace: "ns", Name: "b", Port: p2, LocalEndpoints: 1}}); err != nil {
		t.Fatal(err)
	}
	refused(t, p1)
	if a := mustGet(t, p2); a.status != 200 || a.body.Service.Name != "b" {
		t.Errorf("b: %d %s", a.status, a.raw)
	}
	if got := s.Ports(); len(got) != 1 || got[0] != p2 {
		t.Errorf("Ports() = %v, want [%d]", got, p2)
	}
	// A Service that moves to another port.
	p3 := freePort(t)
	if err := s.Sync([]Check{{Namespace: "ns", Name: "b", Port: p3, LocalEndpoints: 1}}); err != nil {
		t.Fatal(err)
	}
	refused(t, p2)
	if a := mustGet(t, p3); a.status != 200 {
		t.Errorf("b on its new port: %d", a.status)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	refused(t, p3)
	if err := s.Sync(nil); err == nil {
		t.Error("Sync after Close: no error")
	}
}

func TestBindFailure(t *testing.T) {
	s := newServer(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	busy := uint16(taken.Addr().(*net.TCPAddr).Port)
	free := freePort(t)
	err = s.Sync([]Check{
		{Namespace: "ns", Name: "blocked", Port: busy, LocalEndpoints: 1},
		{Namespace: "ns", Name: "ok", Port: free, LocalEndpoints: 1},
		{Namespace: "ns", Name: "zero", LocalEndpoints: 1},
		{Namespace: "z", Name: "dup", Port: free, LocalEndpoints: 1},
	})
	if err == nil {
		t.Fatal("Sync: no error for a port in use")
	}
	for _, want := range []string{
		fmt.Sprintf("Service ns/blocked: cannot listen on health check port %d", busy),
		"Service ns/zero has no health check port",
		fmt.Sprintf("Service z/dup wants health check port %d, already used by Service ns/ok", free),
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if a := mustGet(t, free); a.status != 200 || a.body.Service.Name != "ok" {
		t.Errorf("the other Service: %d %s", a.status, a.raw)
	}
	// The port is tried again at the next Sync, once it is free.
	taken.Close()
	if err := s.Sync([]Check{{Namespace: "ns", Name: "blocked", Port: busy, LocalEndpoints: 1}, {Namespace: "ns", Name: "ok", Port: free, LocalEndpoints: 1}}); err != nil {
		t.Fatalf("Sync once the port is free: %v", err)
	}
	if a := mustGet(t, busy); a.status != 200 || a.body.Service.Name != "blocked" {
		t.Errorf("blocked after retry: %d %s", a.status, a.raw)
	}
}

func TestAllAddresses(t *testing.T) {
	s := New(nil, nil)
	defer s.Close()
	p := freePort(t)
	if err := s.Sync([]Check{{Namespace: "ns", Name: "a", Port: p, LocalEndpoints: 1}}); err != nil {
		t.Fatal(err)
	}
	if a := mustGet(t, p); a.status != 200 {
		t.Errorf("127.0.0.1: %d", a.status)
	}
	if ln, err := net.Listen("tcp6", "[::1]:0"); err == nil { // IPv6 available
		ln.Close()
		c := &http.Client{Timeout: 5 * time.Second}
		resp, err := c.Get(fmt.Sprintf("http://[::1]:%d/", p))
		if err != nil {
			t.Fatalf("[::1]: %v", err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("[::1]: %d", resp.StatusCode)
		}
	}
}
