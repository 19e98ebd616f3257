package install

import (
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// requestTimeout bounds every API request (Helm's client calls take no
// context), unless the caller's rest.Config sets its own.
const requestTimeout = time.Minute

// restGetter is the genericclioptions.RESTClientGetter Helm needs, built from
// a rest.Config, with discovery cached in memory (kubectl's ConfigFlags cache
// on disk under $HOME/.kube).
type restGetter struct {
	cfg       *rest.Config
	raw       clientcmd.ClientConfig
	once      sync.Once
	discovery discovery.CachedDiscoveryInterface
	err       error
}

var _ genericclioptions.RESTClientGetter = (*restGetter)(nil)

// newGetter returns a getter for a kubeconfig file (context: empty for the
// current one) or, when cfg is not nil, for cfg. namespace is the default
// namespace it reports.
func newGetter(kubeconfig, context string, cfg *rest.Config, namespace string) (*restGetter, error) {
	overrides := &clientcmd.ConfigOverrides{CurrentContext: context, Context: clientcmdapi.Context{Namespace: namespace}}
	var raw clientcmd.ClientConfig
	if cfg == nil {
		raw = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(&clientcmd.ClientConfigLoadingRules{ExplicitPath: kubeconfig}, overrides)
		c, err := raw.ClientConfig()
		if err != nil {
			return nil, err
		}
		cfg = c
	} else {
		cfg = rest.CopyConfig(cfg)
		raw = clientcmd.NewDefaultClientConfig(*clientcmdapi.NewConfig(), overrides)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = requestTimeout
	}
	if cfg.QPS == 0 {
		cfg.QPS, cfg.Burst = 50, 100
	}
	return &restGetter{cfg: cfg, raw: raw}, nil
}

func (g *restGetter) ToRESTConfig() (*rest.Config, error) { return rest.CopyConfig(g.cfg), nil }

func (g *restGetter) ToDiscoveryClient() (discovery.CachedDiscoveryInterface, error) {
	g.once.Do(func() {
		var dc *discovery.DiscoveryClient
		dc, g.err = discovery.NewDiscoveryClientForConfig(g.cfg)
		if g.err == nil {
			g.discovery = memory.NewMemCacheClient(dc)
		}
	})
	return g.discovery, g.err
}

func (g *restGetter) ToRESTMapper() (meta.RESTMapper, error) {
	dc, err := g.ToDiscoveryClient()
	if err != nil {
		return nil, err
	}
	return restmapper.NewShortcutExpander(restmapper.NewDeferredDiscoveryRESTMapper(dc), dc, nil), nil
}

func (g *restGetter) ToRawKubeConfigLoader() clientcmd.ClientConfig { return g.raw }
