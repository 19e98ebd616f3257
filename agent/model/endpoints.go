package model

import (
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/kpfree/kpfree/agent/lbmap"
)

// candidate is one endpoint of one Service port, merged over all slices.
type candidate struct {
	be          lbmap.Backend
	ready       bool
	serving     bool
	terminating bool
	node        string
}

// rank orders the states of a duplicated endpoint: the best one wins.
func (c candidate) rank() int {
	switch {
	case c.ready:
		return 2
	case c.serving && c.terminating:
		return 1
	}
	return 0
}

// candidates collects the endpoints of the Service port (portName, proto) of
// one address family from all the Service's slices. The target port comes
// from each slice's own ports, so a named targetPort that resolves to
// different numbers on different pods yields the right port per endpoint.
//
// Conditions follow the EndpointSlice API (and kube-proxy): ready and serving
// are true unless set to false, terminating is false unless set to true.
// An endpoint listed in several slices (during a slice migration, say) is
// kept once, in its best state: ready, else serving and terminating, else
// whatever it is; on a tie a local copy wins, then the first slice by name.
func (b *builder) candidates(portName string, proto corev1.Protocol, is4 bool) []candidate {
	want := discoveryv1.AddressTypeIPv6
	if is4 {
		want = discoveryv1.AddressTypeIPv4
	}
	merged := map[netip.AddrPort]candidate{}
	var order []netip.AddrPort
	for _, es := range b.slices {
		if es.AddressType != want {
			continue
		}
		for _, p := range es.Ports {
			if p.Name != portName || p.Protocol != proto {
				continue
			}
			if p.Port < 1 || p.Port > 65535 {
				continue // no port: the endpoints cannot be reached on it
			}
			for _, ep := range es.Endpoints {
				if ep.Address == "" {
					continue
				}
				// Only the first address counts, as for kube-proxy: the
				// others are alternatives of the same endpoint.
				a, err := netip.ParseAddr(ep.Address)
				if err != nil || a.Zone() != "" || a.Unmap().Is4() != is4 {
					b.warn(ReasonInvalidEndpoint, "EndpointSlice %s: address %q is not an %s address; endpoint ignored",
						es.Name, ep.Address, want)
					continue
				}
				c := candidate{
					be:          lbmap.Backend{Addr: a.Unmap(), Port: uint16(p.Port)},
					ready:       ep.Ready,
					serving:     ep.Serving,
					terminating: ep.Terminating,
					node:        ep.Node,
				}
				c.be.Local = b.isLocal(c)
				k := netip.AddrPortFrom(c.be.Addr, c.be.Port)
				old, seen := merged[k]
				if !seen {
					order = append(order, k)
				}
				if !seen || c.rank() > old.rank() ||
					(c.rank() == old.rank() && c.be.Local && !old.be.Local) {
					merged[k] = c
				}
			}
		}
	}
	out := make([]candidate, 0, len(order))
	for _, be := range order {
		out = append(out, merged[be])
	}
	return out
}

func (b *builder) isLocal(c candidate) bool {
	return b.opts.NodeName != "" && c.node == b.opts.NodeName
}

// pick chooses the backends among the candidates, sorted by address and
// port:
//   - local (internalTrafficPolicy Local for a ClusterIP, the external scope
//     of externalTrafficPolicy Local): only this node's endpoints; none
//     means no backends (the datapath refuses), never a remote one;
//   - the ready endpoints; only when none is ready, the ones that are serving
//     and terminating (graceful termination, as kube-proxy);
//   - endpoints neither ready nor serving-and-terminating never.
func pick(cands []candidate, local bool, node string) []lbmap.Backend {
	pool := cands
	if local {
		pool = nil
		for _, c := range cands {
			if node != "" && c.node == node {
				pool = append(pool, c)
			}
		}
	}
	out := []lbmap.Backend{}
	for _, c := range pool {
		if c.ready {
			out = append(out, c.be)
		}
	}
	if len(out) == 0 {
		for _, c := range pool {
			if c.serving && c.terminating {
				out = append(out, c.be)
			}
		}
	}
	slices.SortFunc(out, lbmap.Backend.Compare)
	return out
}
