package reconcile

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the reconciler's Prometheus metrics. A nil *Metrics records
// nothing.
type Metrics struct {
	Services     prometheus.Gauge
	Backends     prometheus.Gauge
	SyncDuration *prometheus.HistogramVec
	SyncLag      prometheus.Histogram
	SyncErrors   prometheus.Counter
	MapFull      prometheus.Counter
	Drift        prometheus.Counter
	Warnings     prometheus.Gauge
	LastSync     prometheus.Gauge
}

// NewMetrics creates the metrics and registers them with reg (nil: not
// registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	buckets := prometheus.ExponentialBuckets(0.0005, 2, 16) // 0.5 ms .. 16 s
	m := &Metrics{
		Services: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kpfree_services",
			Help: "Frontends (address, port, protocol) programmed in the load balancer maps.",
		}),
		Backends: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kpfree_backends",
			Help: "Distinct backends (address, port) programmed, shared between frontends.",
		}),
		SyncDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "kpfree_sync_duration_seconds",
			Help:    "Duration of one reconcile pass: read the informer caches, run the model, write the maps.",
			Buckets: buckets,
		}, []string{"mode"}),
		SyncLag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "kpfree_sync_lag_seconds",
			Help:    "Time from the first informer event of a batch to the end of the pass that programmed it.",
			Buckets: buckets,
		}),
		SyncErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kpfree_sync_errors_total",
			Help: "Failed map writes and failed reconcile passes (each is retried).",
		}),
		MapFull: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kpfree_map_full_total",
			Help: "Changes refused because a BPF map had no room (also counted in kpfree_sync_errors_total).",
		}),
		Drift: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "kpfree_drift_total",
			Help: "Periodic resyncs that found the maps different from what the agent had written.",
		}),
		Warnings: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kpfree_service_warnings",
			Help: "Current model warnings (unsupported protocol, conflicts, ...), also sent as Events.",
		}),
		LastSync: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "kpfree_last_sync_timestamp_seconds",
			Help: "Unix time of the end of the last reconcile pass.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.Services, m.Backends, m.SyncDuration, m.SyncLag, m.SyncErrors, m.MapFull, m.Drift, m.Warnings, m.LastSync)
	}
	return m
}
