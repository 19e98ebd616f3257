// Package bpf holds kpfree's socket load balancer: the C datapath
// (sock_lb.c, cgroup sock_addr programs), the objects bpf2go generated from it,
// and the loader that probes the kernel, loads the programs, pins the maps and
// attaches the programs to a cgroup2 directory without a gap on restart.
//
// Minimum kernel 4.19.57 (5.2 mainline) with the prog-attach path
// (Options.ForceProgAttach, or automatically without bpf_link); 5.7+ uses
// pinned bpf_links; 5.8+ adds getpeername; 5.18+ refuses Services without
// backends with ECONNREFUSED instead of EPERM. See README.md for the map
// layout and the decisions behind it.
//
// The tc datapath (nodeport.c, tc.go: Datapath.LoadNodePort) serves NodePort,
// ExternalIP and LoadBalancer traffic entering the node, over the same maps:
// DNAT at device ingress, reverse NAT and SNAT at egress, tcx links from 6.6,
// clsact + cls_bpf before.
//
// The maps are written through agent/lbmap, which owns the byte order; this
// package only loads, attaches and hands out the *ebpf.Map handles.
package bpf
