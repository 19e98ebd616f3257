// Package healthcheck serves kube-proxy's health check node ports: for every
// Service of type LoadBalancer with externalTrafficPolicy Local, the
// Service's spec.healthCheckNodePort answers HTTP with the number of the
// Service's endpoints on this node, so an external load balancer sends
// traffic only to nodes that have one (200 when there is at least one, 503
// otherwise). The response is kube-proxy's.
//
// Wiring in the agent: one Server per node; after every reconcile pass the
// agent passes the current checks:
//
//	hc := healthcheck.New(nil, log) // nil: every address, as kube-proxy
//	defer hc.Close()
//	if err := hc.Sync(checks); err != nil { log.Warn("health check node ports", "err", err) }
package healthcheck

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Check is one Service's health check node port.
type Check struct {
	Namespace, Name string
	// Port is spec.healthCheckNodePort.
	Port uint16
	// LocalEndpoints is the number of the Service's ready endpoints on this
	// node.
	LocalEndpoints int
}

func (c Check) String() string { return c.Namespace + "/" + c.Name }

// Server keeps one HTTP listener per health check port.
type Server struct {
	bind []netip.Addr
	log  *slog.Logger

	proxyUnhealthy atomic.Bool

	mu     sync.Mutex
	ports  map[uint16]*port
	closed bool
}

// port serves one health check port; its check is replaced in place when the
// Service or its count changes.
type port struct {
	check   atomic.Pointer[Check]
	srv     *http.Server
	serving sync.WaitGroup
}

// close closes the listeners and connections and returns once the sockets
// are closed: a closed listener's file descriptor is released only when
// its blocked Accept returns, and until then new connections are accepted
// into its queue and reset instead of refused.
func (p *port) close() error {
	err := p.srv.Close()
	p.serving.Wait()
	return err
}

// New returns a Server that listens on bindAddrs (empty: every address of
// the node, IPv4 and IPv6). It opens nothing until Sync. A nil log discards.
func New(bindAddrs []netip.Addr, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Server{bind: slices.Clone(bindAddrs), log: log.With("component", "healthcheck"), ports: map[uint16]*port{}}
}

// SetProxyHealthy sets serviceProxyHealthy in every answer (true at start);
// while false every port answers 503, as kube-proxy does when its own
// health check fails.
func (s *Server) SetProxyHealthy(healthy bool) { s.proxyUnhealthy.Store(!healthy) }

// Sync makes the listeners match checks: ports no longer wanted are closed,
// new ports are opened, and a port that stays keeps its listener and only
// takes the new Service name and count. A port that cannot be opened, a
// port of 0, or a port claimed by two Services (the first by
// namespace/name keeps it) is reported in the returned error, which names
// the port and the Service; every other port is still served, and a failed
// port is tried again at the next Sync.
func (s *Server) Sync(checks []Check) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errors.New("healthcheck: Sync after Close")
	}
	sorted := slices.Clone(checks)
	slices.SortFunc(sorted, func(a, b Check) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	var errs []error
	want := map[uint16]Check{}
	for _, c := range sorted {
		if c.Port == 0 {
			errs = append(errs, fmt.Errorf("healthcheck: Service %s has no health check port (0); skipped", c))
			continue
		}
		if prev, dup := want[c.Port]; dup {
			errs = append(errs, fmt.Errorf("healthcheck: Service %s wants health check port %d, already used by Service %s; not served for %s", c, c.Port, prev, c))
			continue
		}
		want[c.Port] = c
	}
	for n, p := range s.ports {
		if _, ok := want[n]; !ok {
			p.close()
			delete(s.ports, n)
			s.log.Info("health check port closed", "port", n, "service", p.check.Load().String())
		}
	}
	for _, n := range slices.Sorted(maps.Keys(want)) {
		c := want[n]
		if p, ok := s.ports[n]; ok {
			p.check.Store(&c)
			continue
		}
		p, err := s.open(c)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		s.ports[n] = p
		s.log.Info("health check port open", "port", n, "service", c.String())
	}
	return errors.Join(errs...)
}

// open listens on c.Port on every bind address (all or none) and serves.
func (s *Server) open(c Check) (*port, error) {
	addrs := []string{":" + strconv.Itoa(int(c.Port))}
	if len(s.bind) > 0 {
		addrs = addrs[:0]
		for _, a := range s.bind {
			addrs = append(addrs, netip.AddrPortFrom(a, c.Port).String())
		}
	}
	var lns []net.Listener
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return nil, fmt.Errorf("healthcheck: Service %s: cannot listen on health check port %d (%s): %w; is another process using it?", c, c.Port, a, err)
		}
		lns = append(lns, ln)
	}
	p := &port{}
	p.check.Store(&c)
	p.srv = &http.Server{
		Handler:           http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { s.answer(w, p.check.Load()) }),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       time.Minute,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	for _, ln := range lns {
		p.serving.Go(func() { p.srv.Serve(ln) }) // returns http.ErrServerClosed at close
	}
	return p, nil
}

type response struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints      int  `json:"localEndpoints"`
	ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
}

// answer writes kube-proxy's answer: 200 when the Service has a local
// endpoint and the proxy is healthy, else 503.
func (s *Server) answer(w http.ResponseWriter, c *Check) {
	var r response
	r.Service.Namespace, r.Service.Name = c.Namespace, c.Name
	r.LocalEndpoints = c.LocalEndpoints
	r.ServiceProxyHealthy = !s.proxyUnhealthy.Load()
	body, _ := json.Marshal(r)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if c.LocalEndpoints > 0 && r.ServiceProxyHealthy {
		w.WriteHeader(http.StatusOK)
	} else {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	w.Write(body)
}

// Ports returns the ports being served, sorted.
func (s *Server) Ports() []uint16 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]uint16, 0, len(s.ports))
	for n := range s.ports {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// Close closes every listener and connection; the Server cannot be used
// again.
func (s *Server) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	var errs []error
	for n, p := range s.ports {
		if err := p.close(); err != nil {
			errs = append(errs, fmt.Errorf("healthcheck: close port %d: %w", n, err))
		}
		delete(s.ports, n)
	}
	return errors.Join(errs...)
}
