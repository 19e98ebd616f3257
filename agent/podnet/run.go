package podnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Config of Run.
type Config struct {
	Client kubernetes.Interface
	// NodeName is this node.
	NodeName string
	Options  Options
	// Resync is how often the node is brought in line even without a change
	// of the Node objects (repairs a deleted route or file); default 1m.
	Resync time.Duration
	Log    *slog.Logger
	// Apply applies a plan; nil means Apply (netlink and the file system).
	// Tests replace it.
	Apply func(Plan) ([]string, error)
}

// Run keeps this node's pod networking in line with the Node objects until
// ctx ends: it follows every Node (pod CIDRs, InternalIPs) and applies the
// plan at each change and every Resync. Errors (this node has no pod CIDR
// yet, a route refused) are logged and retried; Run returns only ctx's
// error, or an error when the informer cannot sync.
//
// kpfree-agent runs it beside the load balancer when built-in pod
// networking is on:
//
//	go podnet.Run(ctx, podnet.Config{Client: cs, NodeName: node, Log: log})
func Run(ctx context.Context, c Config) error {
	if c.Client == nil || c.NodeName == "" {
		return errors.New("podnet: Client and NodeName are required")
	}
	if c.Resync <= 0 {
		c.Resync = time.Minute
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	if c.Apply == nil {
		c.Apply = Apply
	}
	log := c.Log.With("component", "podnet", "node", c.NodeName)

	factory := informers.NewSharedInformerFactory(c.Client, 0)
	nodes := factory.Core().V1().Nodes()
	kick := make(chan struct{}, 1)
	poke := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	_, err := nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { poke() },
		UpdateFunc: func(oldObj, newObj any) {
			o, ok1 := oldObj.(*corev1.Node)
			n, ok2 := newObj.(*corev1.Node)
			// Heartbeats change conditions every few seconds: only pod CIDRs
			// and addresses matter here.
			if !ok1 || !ok2 || !reflect.DeepEqual(FromNode(o), FromNode(n)) {
				poke()
			}
		},
		DeleteFunc: func(any) { poke() },
	})
	if err != nil {
		return fmt.Errorf("podnet: %w", err)
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), nodes.Informer().HasSynced) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return errors.New("podnet: Node informer did not sync")
	}

	ticker := time.NewTicker(c.Resync)
	defer ticker.Stop()
	retry := time.NewTimer(0)
	defer retry.Stop()
	<-retry.C
	backoff := time.Second
	lastWarn := ""
	sync := func() error {
		list, err := nodes.Lister().List(labels.Everything())
		if err != nil {
			return err
		}
		all := make([]Node, len(list))
		for i, n := range list {
			all[i] = FromNode(n)
		}
		p, err := Desired(c.NodeName, all, c.Options)
		if err != nil {
			return err
		}
		if w := fmt.Sprint(p.Warnings); w != lastWarn && len(p.Warnings) > 0 {
			log.Warn("nodes without routes", "warnings", p.Warnings)
			lastWarn = w
		}
		changed, err := c.Apply(p)
		if len(changed) > 0 {
			log.Info("pod networking updated", "changes", changed)
		}
		return err
	}
	poke()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ticker.C:
		case <-retry.C:
		case <-kick:
		}
		if err := sync(); err != nil {
			log.Warn("pod networking not in line yet; retrying", "err", err, "in", backoff)
			retry.Reset(backoff)
			backoff = min(backoff*2, 30*time.Second)
			continue
		}
		backoff = time.Second
	}
}
