// Package agent wires kpfree-agent's control plane together:
//
//	watch (informers) -> model (pure) -> reconcile -> lbmap.Maps -> datapath
//
// plus Events for model warnings and the health and metrics endpoints. The
// datapath (bpf.Load) and the Maps over it are made by the caller
// (cmd/kpfree-agent), so tests can run the same agent over lbmap.Fake.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/reconcile"
	"github.com/kpfree/kpfree/agent/watch"
)

// Component is the Event source and user agent name.
const Component = "kpfree-agent"

// Config of an Agent.
type Config struct {
	Client kubernetes.Interface
	Maps   lbmap.Maps
	// Reload rebuilds Maps from what the maps hold (lbmap.New over the
	// datapath's maps), for drift repair; nil: none.
	Reload    func() (lbmap.Maps, error)
	NodeName  string
	ProxyName string
	// LBAlgorithm for external frontends (model.LBRandom or model.LBMaglev),
	// LoopbackNodePort (NodePorts also on 127.0.0.1 for this node's own
	// processes) and NodeAddrs (the addresses NodePorts are served on; see
	// SetNodeAddrs): see model.Options.
	LBAlgorithm      string
	LoopbackNodePort bool
	NodeAddrs        []netip.Addr
	// OnNodeAddresses is called when the Node's status addresses change
	// (device selection follows them).
	OnNodeAddresses func()
	// Gate holds the first sync back until it reports true (see
	// reconcile.Config.Gate).
	Gate func() bool
	// OnHealthChecks gets the healthCheckNodePorts after every pass.
	OnHealthChecks func([]model.HealthCheck)
	// MinSyncInterval and ResyncInterval: see reconcile.Config.
	MinSyncInterval time.Duration
	ResyncInterval  time.Duration
	// Registry gets the agent's metrics (nil: a new one, with the Go and
	// process collectors).
	Registry *prometheus.Registry
	// NoEvents disables Events for model warnings (they are still logged).
	NoEvents bool
	Log      *slog.Logger
}

// Agent is a running control plane.
type Agent struct {
	cfg      Config
	log      *slog.Logger
	watcher  *watch.Watcher
	rec      *reconcile.Reconciler
	registry *prometheus.Registry
	events   record.EventBroadcaster
	recorder record.EventRecorder
}

// New sets the agent up; nothing runs before Run.
func New(cfg Config) (*Agent, error) {
	if cfg.Client == nil || cfg.Maps == nil {
		return nil, errors.New("agent: Client and Maps are required")
	}
	a := &Agent{cfg: cfg, log: cfg.Log, registry: cfg.Registry}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	if a.registry == nil {
		a.registry = prometheus.NewRegistry()
		a.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	var err error
	a.watcher, err = watch.New(cfg.Client, watch.Options{NodeName: cfg.NodeName, ProxyName: cfg.ProxyName,
		OnNodeAddresses: cfg.OnNodeAddresses})
	if err != nil {
		return nil, err
	}
	var reporter reconcile.Reporter
	if !cfg.NoEvents {
		a.events = record.NewBroadcaster()
		a.recorder = a.events.NewRecorder(scheme.Scheme, corev1.EventSource{Component: Component, Host: cfg.NodeName})
		reporter = reconcile.ReporterFunc(a.warnEvent)
	}
	a.rec = reconcile.New(reconcile.Config{
		Maps:     cfg.Maps,
		Reload:   cfg.Reload,
		Source:   a.watcher,
		NodeName: cfg.NodeName,
		Model: model.Options{ProxyName: cfg.ProxyName, LBAlgorithm: cfg.LBAlgorithm,
			LoopbackNodePort: cfg.LoopbackNodePort, NodeAddrs: cfg.NodeAddrs},
		OnHealthChecks: cfg.OnHealthChecks,
		AfterFull:      releaseMemory,
		Gate:           cfg.Gate,
		Reporter:       reporter,
		Metrics:        reconcile.NewMetrics(a.registry),
		Log:            a.log,
		MinInterval:    cfg.MinSyncInterval,
		ResyncInterval: cfg.ResyncInterval,
	})
	return a, nil
}

// releaseMemory returns the heap's free pages to the kernel after a full
// pass. The first one follows the initial lists and the model's build, the
// largest allocations the agent ever makes; the periodic ones leave a Dump
// of the maps and the whole desired state as garbage. With the default GOGC
// the heap would otherwise grow to twice the live model and the runtime keep
// those pages, so the RSS would follow the heap goal rather than what the
// agent holds. It costs one forced GC per full pass (every 5 min by
// default). (A lower GOGC until the first sync was measured too: peak RSS
// 207 instead of 230 MiB at 50,000 Services, restart -> ready 3.0 instead
// of 2.35 s; not kept.)
func releaseMemory() { debug.FreeOSMemory() }

// SetNodeAddrs changes the addresses NodePorts are served on.
func (a *Agent) SetNodeAddrs(addrs []netip.Addr) { a.rec.SetNodeAddrs(addrs) }

// SetGate sets Config.Gate after New (the gate's owner may need the Agent
// first); call it before Run.
func (a *Agent) SetGate(g func() bool) { a.rec.SetGate(g) }

// WaitForSync blocks until the informers have synced (Run started them) or
// ctx ends, and reports which.
func (a *Agent) WaitForSync(ctx context.Context) bool { return a.watcher.WaitForSync(ctx) }

// NodeIPs are the Node's InternalIP/ExternalIP addresses (none until the Node
// informer has it).
func (a *Agent) NodeIPs() []netip.Addr { return a.watcher.NodeIPs() }

// warnEvent records a model warning as a Warning Event on its Service.
func (a *Agent) warnEvent(w model.Warning) {
	ref := w.Service
	a.recorder.Event(&ref, corev1.EventTypeWarning, w.Reason, w.Message)
}

// Run runs the informers and the reconciler until ctx ends, then stops them.
// The maps and the datapath are left as they are (a restart continues from
// them).
func (a *Agent) Run(ctx context.Context) error {
	if a.events != nil {
		a.events.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: a.cfg.Client.CoreV1().Events("")})
		defer a.events.Shutdown()
	}
	a.log.Info("watching the API server", "node", a.cfg.NodeName, "proxyName", a.cfg.ProxyName,
		"selector", watch.LabelSelector(a.cfg.ProxyName).String())
	a.watcher.Start(ctx)
	defer a.watcher.Shutdown()
	err := a.rec.Run(ctx, a.watcher.Changes())
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// Ready reports whether the first full sync is done.
func (a *Agent) Ready() bool { return a.rec.Ready() }

// Reconciler is the agent's reconciler (tests, status).
func (a *Agent) Reconciler() *reconcile.Reconciler { return a.rec }

// Registry holds the agent's metrics.
func (a *Agent) Registry() *prometheus.Registry { return a.registry }

// Handler serves /healthz, /readyz and, with metrics, /metrics.
func (a *Agent) Handler(metrics bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if err := a.rec.Healthy(); err != nil {
			http.Error(w, "unhealthy: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !a.rec.Ready() {
			http.Error(w, "not ready: waiting for the informers and the first full sync", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	// The model options in force, so that `kpfree verify` can compute what
	// this agent's maps must hold (NodePort addresses differ per node).
	mux.HandleFunc("GET /options", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(OptionsOf(a.rec.ModelOptions()))
	})
	if metrics {
		mux.Handle("GET /metrics", promhttp.HandlerFor(a.registry, promhttp.HandlerOpts{Registry: a.registry}))
	}
	return mux
}

// Options is the JSON form of the model options an agent runs with (its
// /options endpoint).
type Options struct {
	NodeName         string       `json:"nodeName"`
	ProxyName        string       `json:"proxyName"`
	NodeAddrs        []netip.Addr `json:"nodeAddrs"`
	LoopbackNodePort bool         `json:"loopbackNodePort"`
	LBAlgorithm      string       `json:"lbAlgorithm"`
}

// OptionsOf converts model options to their JSON form.
func OptionsOf(o model.Options) Options {
	if o.NodeAddrs == nil {
		o.NodeAddrs = []netip.Addr{}
	}
	return Options{NodeName: o.NodeName, ProxyName: o.ProxyName, NodeAddrs: o.NodeAddrs,
		LoopbackNodePort: o.LoopbackNodePort, LBAlgorithm: o.LBAlgorithm}
}

// Model converts back to model options.
func (o Options) Model() model.Options {
	return model.Options{NodeName: o.NodeName, ProxyName: o.ProxyName, NodeAddrs: o.NodeAddrs,
		LoopbackNodePort: o.LoopbackNodePort, LBAlgorithm: o.LBAlgorithm}
}

// Serve serves h on addr until ctx ends. The listener is opened before it
// returns, so a bad address fails at once.
func Serve(ctx context.Context, addr string, h http.Handler, log *slog.Logger) (net.Addr, <-chan error, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("agent: health server: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan error, 1)
	go func() {
		err := srv.Serve(ln)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		done <- err
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	if log != nil {
		log.Info("serving health and metrics", "addr", ln.Addr().String())
	}
	return ln.Addr(), done, nil
}
