package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"

	"github.com/kpfree/kpfree/agent"
	"github.com/kpfree/kpfree/agent/healthcheck"
	"github.com/kpfree/kpfree/agent/lbmap"
	"github.com/kpfree/kpfree/agent/model"
	"github.com/kpfree/kpfree/agent/nodeport"
	"github.com/kpfree/kpfree/agent/sysctl"
	"github.com/kpfree/kpfree/bpf"
	"github.com/kpfree/kpfree/internal/version"
)

// In-cluster service account credentials.
const (
	saToken = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	saCA    = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
)

func runCommand() *cli.Command {
	return &cli.Command{
		Name:  "run",
		Usage: "run the agent: watch the API server, program the eBPF load balancer",
		Description: `Loads (or takes over) the socket load balancer, attaches it to --cgroup-root,
then follows Services and EndpointSlices. Until the informers have synced, the maps
pinned by the previous run keep serving unchanged. On SIGTERM the agent exits and
leaves the programs attached and the maps pinned: the next start takes over without
a gap. Removing the datapath is 'kpfree migrate --rollback's job, not this command's.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "k8s-api-server", EnvVars: []string{"KPFREE_K8S_API_SERVER"},
				Usage: "API server `URL` reached directly (e.g. https://198.18.0.11:6443), not through the kubernetes ClusterIP; with the pod's service account token and CA, or --kubeconfig"},
			&cli.StringFlag{Name: "kubeconfig", EnvVars: []string{"KUBECONFIG"}, Usage: "kubeconfig `FILE` (--k8s-api-server overrides its server)"},
			&cli.StringFlag{Name: "node-name", EnvVars: []string{"NODE_NAME"}, Usage: "this node's `NAME` (default: the host name)"},
			cgroupFlag,
			bpffsFlag,
			&cli.BoolFlag{Name: "strict", Value: true,
				Usage: "refuse to start when the kernel probe is inconclusive (a missing mandatory feature always refuses; optional ones fall back and are logged)"},
			&cli.BoolFlag{Name: "force-prog-attach", Usage: "attach with BPF_PROG_ATTACH even where bpf_link exists (the path of kernels < 5.7)"},
			healthAddrFlag,
			&cli.BoolFlag{Name: "metrics", Value: true, Usage: "serve Prometheus /metrics on --health-addr"},
			&cli.StringFlag{Name: "proxy-name", EnvVars: []string{"KPFREE_PROXY_NAME"},
				Usage: "also handle Services labelled service.kubernetes.io/service-proxy-name=`NAME` (unlabelled ones are always handled)"},
			&cli.BoolFlag{Name: "nodeport", Value: true,
				Usage: "serve NodePort, ExternalIPs and LoadBalancer IPs for traffic entering the node (tc programs on --devices); strict mode then also needs the kernel's tc features"},
			&cli.StringSliceFlag{Name: "devices",
				Usage: "interfaces (names or globs like eth*) for the tc programs; NodePorts are served on their addresses. Default: the devices holding the Node's InternalIP/ExternalIP or a default route"},
			&cli.BoolFlag{Name: "force-legacy-tc", Usage: "attach with clsact + cls_bpf even where tcx exists (the path of kernels < 6.6)"},
			&cli.StringFlag{Name: "nodeport-range", Value: "30000-32767", Usage: "`FIRST-LAST`, as kube-apiserver's --service-node-port-range: reserved in net.ipv4.ip_local_reserved_ports so no local socket takes one as its ephemeral port"},
			&cli.BoolFlag{Name: "reserve-nodeport-range", Value: true, Usage: "write --nodeport-range into ip_local_reserved_ports (under --proc-sys)"},
			&cli.StringFlag{Name: "proc-sys", Value: "/proc/sys", Usage: "`DIR` where the node's /proc/sys is (in a pod: a hostPath mount of /proc/sys/net)"},
			&cli.BoolFlag{Name: "loopback-nodeport", Value: true, Usage: "also serve NodePorts on 127.0.0.1 for this node's own processes and pods"},
			&cli.StringFlag{Name: "lb-algorithm", Value: "random", Usage: "how tc picks a backend for external traffic: random, or maglev (consistent hashing: every node picks the same backend for a flow)"},
			&cli.DurationFlag{Name: "ct-gc-interval", Value: nodeport.DefaultGCInterval, Usage: "how often expired tc conntrack entries are removed"},
			&cli.UintFlag{Name: "lb-map-max", Value: 65536,
				Usage: "entries of the Service maps: frontends + backend slots (a Service with 2 endpoints takes 3), also the size of the backend, reverse-NAT and affinity-match maps; a change resizes the pinned maps at start, keeping their entries"},
			&cli.UintFlag{Name: "ct-map-max", Value: 131072, Usage: "entries of the tc connection tracking map (LRU; 4 per SNATed flow, 2 per other flow)"},
			&cli.DurationFlag{Name: "min-sync-interval", Value: 100 * time.Millisecond, Usage: "shortest time between two map updates (changes in between are batched)"},
			&cli.DurationFlag{Name: "resync-interval", Value: 5 * time.Minute, Usage: "full resync period (repairs drift)"},
			&cli.StringFlag{Name: "log-format", Value: "text", Usage: "text or json"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.IntFlag{Name: "v", Usage: "Kubernetes-style verbosity: 2 or more logs at debug level (unless --log-level is set)"},
		},
		Action: runAgent,
	}
}

func newLogger(c *cli.Context) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, usagef("--log-level: %v", err)
	}
	if c.Int("v") >= 2 && !c.IsSet("log-level") {
		lvl = slog.LevelDebug
	}
	o := &slog.HandlerOptions{Level: lvl}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, o)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, o)), nil
	}
	return nil, usagef("--log-format %q: must be text or json", c.String("log-format"))
}

func runAgent(c *cli.Context) error {
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	klog.SetSlogLogger(log.With("source", "client-go"))
	log.Info("starting", "version", version.Get())

	npLo, npHi, err := checkLBFlags(c)
	if err != nil {
		return err
	}
	node := c.String("node-name")
	if node == "" {
		h, err := os.Hostname()
		if err != nil {
			return usagef("--node-name not set and no host name: %v", err)
		}
		node = strings.ToLower(h)
	}
	restCfg, how, err := restConfig(c.String("k8s-api-server"), c.String("kubeconfig"))
	if err != nil {
		return err
	}
	cgroup, explicit, err := cgroupRoot(c)
	if err != nil {
		return err
	}
	isRoot, err := isCgroup2Root(cgroup)
	if err != nil {
		return usageError{err}
	}

	report, err := checkKernel(c.Bool("strict"), c.Bool("nodeport"), log)
	if err != nil {
		return err
	}
	bpffs := c.String("bpffs")
	mounted, err := ensureBPFFS(bpffs)
	if err != nil {
		return err
	}
	if mounted {
		log.Info("mounted bpffs", "dir", bpffs)
	}
	if isRoot {
		log.Warn("attaching at a cgroup2 root: every process of this machine gets the load balancer",
			"cgroup", cgroup, "explicit", explicit)
	}
	sizes, err := mapSizes(c)
	if err != nil {
		return err
	}
	resized, err := bpf.ResizePinned(bpffs, sizes)
	if err != nil {
		return fmt.Errorf("resize pinned maps to --lb-map-max/--ct-map-max: %w", err)
	}
	for _, r := range resized {
		log.Info("resized pinned map", "map", r.Map, "from", r.From, "to", r.To, "copied", r.Copied, "dropped", r.Dropped)
	}
	dp, err := bpf.Load(bpf.Options{
		MapSizes:        sizes,
		PinDir:          bpffs,
		CgroupPath:      cgroup,
		AllowRootCgroup: isRoot, // the production case: the node's whole cgroup2 tree
		ForceProgAttach: c.Bool("force-prog-attach"),
		Report:          report,
	})
	if err != nil {
		return fmt.Errorf("load datapath: %w", err)
	}
	// Close keeps programs attached and maps pinned: a restart is hitless.
	defer dp.Close()
	for name, why := range dp.Skipped {
		log.Warn("program not attached", "program", name, "reason", why)
	}
	for _, w := range dp.Warnings {
		log.Warn("datapath", "warning", w)
	}
	log.Info("datapath loaded", "mode", dp.Mode, "cgroup", cgroup, "pins", bpffs+"/"+bpf.PinVersion,
		"attached", len(dp.Attached), "emulated", fmt.Sprint(dp.Emulated))

	maps, err := lbmap.New(dp.Maps)
	if err != nil {
		return fmt.Errorf("restore from pinned maps: %w", err)
	}
	if n := maps.Len(); n > 0 {
		log.Info("restored from pinned maps; serving them until the first sync", "services", n)
	}

	restCfg.UserAgent = agent.Component + "/" + version.Get()
	restCfg.ContentType = "application/vnd.kubernetes.protobuf"
	restCfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	restCfg.QPS, restCfg.Burst = 20, 40
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return err
	}
	log.Info("API server", "url", restCfg.Host, "credentials", how)

	ctx, cancel := context.WithCancel(c.Context)
	defer cancel()
	var (
		np *nodeport.Manager
		hc *healthcheck.Server
	)
	cfg := agent.Config{
		Client:           client,
		Maps:             maps,
		Reload:           func() (lbmap.Maps, error) { return lbmap.New(dp.Maps) },
		NodeName:         node,
		ProxyName:        c.String("proxy-name"),
		LBAlgorithm:      c.String("lb-algorithm"),
		LoopbackNodePort: c.Bool("loopback-nodeport"),
		MinSyncInterval:  c.Duration("min-sync-interval"),
		ResyncInterval:   c.Duration("resync-interval"),
		Log:              log,
	}
	if c.Bool("nodeport") {
		if c.Bool("reserve-nodeport-range") {
			changed, err := sysctl.ReserveNodePortRange(c.String("proc-sys"), npLo, npHi)
			if err != nil {
				return fmt.Errorf("reserve the NodePort range %d-%d (--reserve-nodeport-range=false skips it): %w", npLo, npHi, err)
			}
			log.Info("NodePort range reserved in ip_local_reserved_ports", "range", fmt.Sprintf("%d-%d", npLo, npHi), "changed", changed)
		}
		hc = healthcheck.New(nil, log)
		defer hc.Close()
		var lastErr string
		cfg.OnHealthChecks = func(checks []model.HealthCheck) {
			err := hc.Sync(healthChecks(checks))
			if msg := fmt.Sprint(err); err != nil && msg != lastErr {
				log.Warn("healthCheckNodePort", "err", err)
			}
			lastErr = fmt.Sprint(err)
		}
		cfg.OnNodeAddresses = func() {
			if np != nil {
				np.Trigger()
			}
		}
	}
	a, err := agent.New(cfg)
	if err != nil {
		return err
	}
	npErr := make(chan error, 1)
	if c.Bool("nodeport") {
		np, err = nodeport.New(nodeport.Config{
			Datapath:      dp,
			Devices:       c.StringSlice("devices"),
			ForceLegacyTC: c.Bool("force-legacy-tc"),
			NodeIPs:       a.NodeIPs,
			OnNodeAddrs:   a.SetNodeAddrs,
			GCInterval:    c.Duration("ct-gc-interval"),
			Log:           log.With("component", "nodeport"),
		})
		if err != nil {
			return err
		}
		a.SetGate(np.Ready)
		a.Registry().MustRegister(np.Collectors()...)
		go func() {
			// Select devices once the Node (its addresses) is known.
			if a.WaitForSync(ctx) {
				if err := np.Run(ctx); err != nil {
					npErr <- err
					cancel()
				}
			}
		}()
	}
	var served <-chan error
	if addr := c.String("health-addr"); addr != "" {
		if _, served, err = agent.Serve(ctx, addr, a.Handler(c.Bool("metrics")), log); err != nil {
			return err
		}
	}
	err = a.Run(ctx)
	select {
	case nerr := <-npErr:
		err = errors.Join(nerr, err)
	default:
	}
	if served != nil {
		if serr := <-served; serr != nil {
			err = errors.Join(err, serr)
		}
	}
	log.Info("stopped; programs stay attached and maps pinned for the next start")
	return err
}

// mapSizes turns --lb-map-max and --ct-map-max into map sizes.
func mapSizes(c *cli.Context) (bpf.MapSizes, error) {
	lb, ct := c.Uint("lb-map-max"), c.Uint("ct-map-max")
	const most = 1 << 24
	if lb < 16 || lb > most {
		return bpf.MapSizes{}, usagef("--lb-map-max %d: want 16 to %d", lb, most)
	}
	if ct < 64 || ct > most {
		return bpf.MapSizes{}, usagef("--ct-map-max %d: want 64 to %d", ct, most)
	}
	n := uint32(lb)
	return bpf.MapSizes{Services: n, Backends: n, RevNat: n, AffinityMatch: n, CT: uint32(ct)}, nil
}

func healthChecks(in []model.HealthCheck) []healthcheck.Check {
	out := make([]healthcheck.Check, len(in))
	for i, h := range in {
		out[i] = healthcheck.Check{Namespace: h.Service.Namespace, Name: h.Service.Name, Port: h.Port, LocalEndpoints: h.LocalEndpoints}
	}
	return out
}

// restConfig builds the API server client config: a kubeconfig, or the pod's
// service account against --k8s-api-server.
func restConfig(server, kubeconfig string) (*rest.Config, string, error) {
	if kubeconfig != "" {
		cfg, err := clientcmd.BuildConfigFromFlags(server, kubeconfig)
		if err != nil {
			return nil, "", usagef("--kubeconfig: %v", err)
		}
		return cfg, "kubeconfig " + kubeconfig, nil
	}
	if _, err := os.Stat(saToken); err != nil {
		return nil, "", usagef("no credentials: pass --kubeconfig, or run as a pod (service account token at %s)", saToken)
	}
	if server == "" {
		// Through the kubernetes ClusterIP: works only while another proxy
		// (or this agent's previous run) serves it.
		cfg, err := rest.InClusterConfig()
		if err != nil {
			return nil, "", usagef("--k8s-api-server not set: %v", err)
		}
		return cfg, "service account via the kubernetes Service (set --k8s-api-server to avoid depending on a ClusterIP)", nil
	}
	return &rest.Config{
		Host:            server,
		BearerTokenFile: saToken, // re-read by client-go: token rotation works
		TLSClientConfig: rest.TLSClientConfig{CAFile: saCA},
	}, "service account token", nil
}

// checkKernel probes the kernel. A mandatory feature missing always refuses
// the start, with the full list; optional features missing are logged with
// their effect and the loader falls back (e.g. EPERM instead of
// ECONNREFUSED below 5.18, no getpeername translation below 5.8). Strict also
// refuses when the probe is inconclusive; --strict=false then lets the loader
// try anyway.
func checkKernel(strict, nodePort bool, log *slog.Logger) (*bpf.Report, error) {
	rep, perr := bpf.Probe()
	var missing []string
	for _, f := range rep.Missing() {
		missing = append(missing, fmt.Sprintf("  - %s: mandatory, needs Linux %s", f.Feature, f.Kernel))
	}
	degraded := rep.Degraded()
	if nodePort {
		for _, f := range rep.MissingForNodePort() {
			missing = append(missing, fmt.Sprintf("  - %s: mandatory for NodePort (--nodeport), needs Linux %s", f.Feature, f.Kernel))
		}
		degraded = append(degraded, rep.DegradedForNodePort()...)
	}
	for _, f := range degraded {
		log.Warn("optional kernel feature missing: running with the fallback", "feature", f.Feature, "kernel", f.Kernel, "effect", f.Effect)
	}
	if perr != nil && strict {
		missing = append(missing, fmt.Sprintf("  - probe inconclusive (privileges?): %v; --strict=false lets the loader try anyway", perr))
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("kernel lacks what the agent needs, refusing to start:\n%s", strings.Join(missing, "\n"))
	}
	if perr != nil {
		log.Warn("kernel probe inconclusive; the loader probes again", "err", perr)
		return nil, nil
	}
	return &rep, nil
}

// checkLBFlags validates the load balancing flags and returns the NodePort
// range.
func checkLBFlags(c *cli.Context) (lo, hi uint16, err error) {
	switch alg := c.String("lb-algorithm"); alg {
	case model.LBRandom, model.LBMaglev:
	default:
		return 0, 0, usagef("--lb-algorithm %q: must be random or maglev", alg)
	}
	first, last, ok := strings.Cut(c.String("nodeport-range"), "-")
	a, err1 := strconv.Atoi(first)
	b, err2 := strconv.Atoi(last)
	if !ok || err1 != nil || err2 != nil || a < 1 || a >= b || b > 65535 {
		return 0, 0, usagef("--nodeport-range %q: want FIRST-LAST with 1 <= FIRST < LAST <= 65535", c.String("nodeport-range"))
	}
	if !c.Bool("nodeport") && c.IsSet("devices") {
		return 0, 0, usagef("--devices needs --nodeport")
	}
	return uint16(a), uint16(b), nil
}
