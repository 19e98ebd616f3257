package main

import (
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
	"github.com/kpfree/kpfree/agent/lbmap"
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
			// NodePort flags: the chart passes them already; the NodePort
			// datapath is a later issue, so they are validated and reported.
			&cli.StringSliceFlag{Name: "devices", Usage: "NodePort: interfaces to attach to (not implemented yet: accepted and ignored)"},
			&cli.StringFlag{Name: "nodeport-range", Value: "30000-32767", Usage: "NodePort: `FIRST-LAST`, as kube-apiserver's --service-node-port-range (not used yet)"},
			&cli.StringFlag{Name: "lb-algorithm", Value: "random", Usage: "how a backend is picked: random (maglev is not implemented)"},
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

	if err := checkLBFlags(c, log); err != nil {
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

	report, err := checkKernel(c.Bool("strict"), log)
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
	if d, err := maps.Dump(); err == nil {
		log.Info("restored from pinned maps; serving them until the first sync", "services", len(d))
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

	a, err := agent.New(agent.Config{
		Client:          client,
		Maps:            maps,
		Reload:          func() (lbmap.Maps, error) { return lbmap.New(dp.Maps) },
		NodeName:        node,
		ProxyName:       c.String("proxy-name"),
		MinSyncInterval: c.Duration("min-sync-interval"),
		ResyncInterval:  c.Duration("resync-interval"),
		Log:             log,
	})
	if err != nil {
		return err
	}
	ctx := c.Context
	var served <-chan error
	if addr := c.String("health-addr"); addr != "" {
		if _, served, err = agent.Serve(ctx, addr, a.Handler(c.Bool("metrics")), log); err != nil {
			return err
		}
	}
	err = a.Run(ctx)
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
func checkKernel(strict bool, log *slog.Logger) (*bpf.Report, error) {
	rep, perr := bpf.Probe()
	var missing []string
	for _, f := range rep.Missing() {
		missing = append(missing, fmt.Sprintf("  - %s: mandatory, needs Linux %s", f.Feature, f.Kernel))
	}
	for _, f := range rep.Degraded() {
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

// checkLBFlags validates the flags of features that are not there yet, so a
// chart value that cannot be honoured fails the start instead of being
// silently ignored.
func checkLBFlags(c *cli.Context, log *slog.Logger) error {
	switch alg := c.String("lb-algorithm"); alg {
	case "random":
	case "maglev":
		return usagef("--lb-algorithm=maglev is not implemented yet; use random")
	default:
		return usagef("--lb-algorithm %q: must be random or maglev", alg)
	}
	first, last, ok := strings.Cut(c.String("nodeport-range"), "-")
	a, err1 := strconv.Atoi(first)
	b, err2 := strconv.Atoi(last)
	if !ok || err1 != nil || err2 != nil || a < 1 || a >= b || b > 65535 {
		return usagef("--nodeport-range %q: want FIRST-LAST with 1 <= FIRST < LAST <= 65535", c.String("nodeport-range"))
	}
	if d := c.StringSlice("devices"); len(d) > 0 {
		log.Warn("NodePort is not implemented yet: --devices ignored", "devices", strings.Join(d, ","))
	}
	return nil
}
