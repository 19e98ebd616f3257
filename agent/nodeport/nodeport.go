//go:build linux

// Package nodeport runs the agent's side of traffic entering the node
// (NodePort, ExternalIPs, LoadBalancer IPs): it follows the device
// selection (agent/devices), attaches the tc programs to the selected
// devices (bpf.LoadNodePort), writes their SNAT addresses (kpf_devices), hands
// the node addresses NodePorts are served on to the model, and removes expired
// conntrack entries. It also exports the datapath's packet counters.
package nodeport

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kpfree/kpfree/agent/devices"
	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/bpf"
)

// DefaultGCInterval is how often expired conntrack entries are removed.
const DefaultGCInterval = 30 * time.Second

// Config of a Manager.
type Config struct {
	Datapath *bpf.Datapath
	// Devices is --devices: names or globs; empty selects automatically.
	Devices []string
	// ForceLegacyTC attaches with clsact + cls_bpf even where tcx exists.
	ForceLegacyTC bool
	// NodeIPs returns the Node's InternalIP/ExternalIP addresses (auto
	// selection prefers their devices). Nil: none.
	NodeIPs func() []netip.Addr
	// OnNodeAddrs receives the addresses NodePorts are served on, after
	// every change of the selection (programs attached first).
	OnNodeAddrs func([]netip.Addr)
	// GCInterval of the conntrack garbage collection (default 30 s).
	GCInterval time.Duration
	Log        *slog.Logger
}

// Status is what the manager did last.
type Status struct {
	Mode      bpf.TCMode           `json:"mode,omitempty"`
	Devices   []devices.Device     `json:"devices"`
	NodeAddrs []netip.Addr         `json:"nodeAddrs"`
	Err       string               `json:"error,omitempty"`
	Changed   time.Time            `json:"changed"`
	Attached  []bpf.AttachedDevice `json:"attached,omitempty"`
}

// Manager keeps the tc datapath in line with the devices.
type Manager struct {
	cfg     Config
	log     *slog.Logger
	watcher *devices.Watcher

	ready atomic.Bool

	mu     sync.Mutex
	np     *bpf.NodePort
	status Status

	gcDeleted prometheus.Counter
}

// New returns a Manager; nothing happens before Run.
func New(cfg Config) (*Manager, error) {
	if cfg.Datapath == nil {
		return nil, errors.New("nodeport: Datapath is required")
	}
	if cfg.GCInterval <= 0 {
		cfg.GCInterval = DefaultGCInterval
	}
	m := &Manager{cfg: cfg, log: cfg.Log}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	m.gcDeleted = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "kpfree_conntrack_gc_deleted_total",
		Help: "Expired tc conntrack entries removed by the agent.",
	})
	m.watcher = &devices.Watcher{
		Spec:    cfg.Devices,
		NodeIPs: cfg.NodeIPs,
		OnError: func(err error) {
			m.log.Warn("device selection; keeping the last one", "err", err)
		},
	}
	return m, nil
}

// Run follows the devices and collects conntrack garbage until ctx ends. A
// failing first selection (a --devices name that does not exist, no device
// found automatically) or a first attachment that fails is returned: the
// agent cannot serve NodePorts as configured.
func (m *Manager) Run(ctx context.Context) error {
	first := make(chan error, 1)
	m.watcher.OnChange = func(devs []devices.Device) {
		err := m.apply(devs)
		select {
		case first <- err:
		default:
		}
	}
	werr := make(chan error, 1)
	go func() { werr <- m.watcher.Run(ctx) }()
	select {
	case err := <-werr:
		return fmt.Errorf("nodeport: select devices: %w", err)
	case err := <-first:
		if err != nil {
			return err
		}
	case <-ctx.Done():
		return nil
	}
	t := time.NewTicker(m.cfg.GCInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			<-werr
			m.mu.Lock()
			if m.np != nil {
				m.np.Close() // programs stay attached: a restart is hitless
			}
			m.mu.Unlock()
			return nil
		case err := <-werr:
			if err != nil {
				return fmt.Errorf("nodeport: device watch: %w", err)
			}
			return nil
		case <-t.C:
			m.GC()
		}
	}
}

// Ready reports whether the programs are attached to a first selection.
func (m *Manager) Ready() bool { return m.ready.Load() }

// Trigger asks for a new device selection (the Node's addresses changed).
func (m *Manager) Trigger() { m.watcher.Trigger() }

// apply attaches to devs: SNAT addresses first (so the egress programs find
// them), then the programs, then the node addresses to the model.
func (m *Manager) apply(devs []devices.Device) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	names := make([]string, len(devs))
	snat := make(map[int]lbmap.DeviceAddrs, len(devs))
	for i, d := range devs {
		names[i] = d.Name
		v4, v6 := devices.SNATAddrs(d)
		snat[d.Index] = lbmap.DeviceAddrs{V4: v4, V6: v6}
	}
	fail := func(err error) error {
		m.status.Err = err.Error()
		m.log.Error("NodePort datapath not updated", "devices", names, "err", err)
		return err
	}
	if err := lbmap.WriteDevices(m.cfg.Datapath.Maps.Devices, snat); err != nil {
		return fail(fmt.Errorf("nodeport: write SNAT addresses: %w", err))
	}
	np, err := m.cfg.Datapath.LoadNodePort(bpf.NodePortOptions{Devices: names, ForceLegacyTC: m.cfg.ForceLegacyTC})
	if err != nil {
		return fail(fmt.Errorf("nodeport: attach tc programs to %v: %w", names, err))
	}
	if m.np != nil {
		m.np.Close()
	}
	m.np = np
	for _, w := range np.Warnings {
		m.log.Warn("tc attach", "warning", w)
	}
	addrs := devices.NodeAddrs(devs)
	m.status = Status{Mode: np.Mode, Devices: slices.Clone(devs), NodeAddrs: addrs, Changed: time.Now(), Attached: np.Devices}
	m.log.Info("NodePort devices", "mode", np.Mode, "devices", names, "addresses", fmt.Sprint(addrs))
	if m.cfg.OnNodeAddrs != nil {
		m.cfg.OnNodeAddrs(addrs)
	}
	m.ready.Store(true) // after the model has the addresses (agent Gate)
	return nil
}

// GC removes expired conntrack entries once.
func (m *Manager) GC() {
	now, err := lbmap.MonotonicNow()
	if err != nil {
		m.log.Warn("conntrack gc", "err", err)
		return
	}
	deleted, live, err := lbmap.GCConntrack(m.cfg.Datapath.Maps.CT, now)
	m.gcDeleted.Add(float64(deleted))
	if err != nil {
		m.log.Warn("conntrack gc", "deleted", deleted, "live", live, "err", err)
		return
	}
	if deleted > 0 {
		m.log.Debug("conntrack gc", "deleted", deleted, "live", live)
	}
}

// Status returns a copy of the current status.
func (m *Manager) Status() Status {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.status
	s.Devices = slices.Clone(s.Devices)
	s.NodeAddrs = slices.Clone(s.NodeAddrs)
	return s
}

// Collectors are the manager's Prometheus collectors: the datapath's packet
// counters (read at scrape time), conntrack entries, and GC deletions.
func (m *Manager) Collectors() []prometheus.Collector {
	return []prometheus.Collector{m.gcDeleted, &statsCollector{maps: m.cfg.Datapath.Maps, log: m.log}}
}

var (
	packetsDesc = prometheus.NewDesc("kpfree_datapath_packets_total",
		"Packets the tc datapath translated or dropped, by counter (dnat, revnat, snat, drop_*, err_rewrite).",
		[]string{"counter"}, nil)
	ctDesc = prometheus.NewDesc("kpfree_conntrack_entries",
		"Entries in the tc conntrack map (expired ones included until collected).", nil, nil)
)

type statsCollector struct {
	maps bpf.MapSet
	log  *slog.Logger
}

func (c *statsCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- packetsDesc
	ch <- ctDesc
}

func (c *statsCollector) Collect(ch chan<- prometheus.Metric) {
	stats, err := lbmap.ReadStats(c.maps.Stats)
	if err != nil {
		c.log.Warn("read datapath counters", "err", err)
	}
	for name, v := range stats {
		ch <- prometheus.MustNewConstMetric(packetsDesc, prometheus.CounterValue, float64(v), name)
	}
	if n, err := bpf.CountEntries(c.maps.CT); err == nil {
		ch <- prometheus.MustNewConstMetric(ctDesc, prometheus.GaugeValue, float64(n))
	}
}
