//go:build linux

package bpf

// Map key and value types, generated from the BTF of sock_lb.c by bpf2go, so
// the Go and C layouts cannot drift. Addresses are 16 bytes in network byte
// order (IPv4 as ::ffff:a.b.c.d) held in [4]uint32, ports are network byte
// order in a uint16: convert only through agent/lbmap, which owns byte order.
type (
	SvcKey      = sockLBSvcKey      // struct svc_key: kpf_services key
	SvcVal      = sockLBSvcVal      // struct svc_val: kpf_services value
	BackendVal  = sockLBBackendVal  // struct backend_val: kpf_backends value (key: uint32 id)
	RevNatVal   = sockLBRevnatVal   // struct revnat_val: kpf_revnat value (key: uint32 id)
	AffKey      = sockLBAffKey      // struct aff_key: kpf_affinity key
	AffVal      = sockLBAffVal      // struct aff_val: kpf_affinity value
	AffMatchKey = sockLBAffMatchKey // struct aff_match_key: kpf_aff_match key (value: uint32)
	SockKey     = sockLBSockKey     // struct sock_key: kpf_sock_revnat key
	SockVal     = sockLBSockVal     // struct sock_val: kpf_sock_revnat value
)

// SvcFlagAffinity is svc_val.flags SVC_F_AFFINITY (ClientIP session affinity).
const SvcFlagAffinity = 1 << 0

// Map names in sock_lb.c; they are also the pin names under PinDir/PinVersion/maps.
const (
	MapServices   = sockLBMapKpfServices
	MapBackends   = sockLBMapKpfBackends
	MapRevNat     = sockLBMapKpfRevnat
	MapAffinity   = sockLBMapKpfAffinity
	MapAffMatch   = sockLBMapKpfAffMatch
	MapSockRevNat = sockLBMapKpfSockRevnat
)
