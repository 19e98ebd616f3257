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
	CTKey       = sockLBCtKey       // struct ct_key: kpf_ct key
	CTVal       = sockLBCtVal       // struct ct_val: kpf_ct value
	SrcRangeKey = sockLBSrcRangeKey // struct src_range_key: kpf_src_ranges key (value: uint8)
	MaglevVal   = sockLBMaglevVal   // struct maglev_val: kpf_maglev value (key: uint32 rev-nat id)
	DevVal      = sockLBDevVal      // struct dev_val: kpf_devices value (key: uint32 ifindex)
)

// svc_val.flags, backend_val.flags, svc_key.scope, ct_key.type and
// ct_val.flags, as in kpf_maps.h.
const (
	SvcFlagAffinity  = 1 << 0 // SVC_F_AFFINITY: ClientIP session affinity
	SvcFlagExternal  = 1 << 1 // SVC_F_EXTERNAL: NodePort, ExternalIP or LoadBalancer; tc serves it
	SvcFlagLocal     = 1 << 2 // SVC_F_LOCAL: externalTrafficPolicy Local, never SNAT
	SvcFlagSrcRanges = 1 << 3 // SVC_F_SRC_RANGES: check kpf_src_ranges
	SvcFlagMaglev    = 1 << 4 // SVC_F_MAGLEV: tc picks from kpf_maglev

	BackendFlagLocal = 1 << 0 // BE_F_LOCAL: backend on this node, no SNAT

	ScopeInternal = 0 // SCOPE_INTERNAL: socket LB, and tc without an external entry
	ScopeExternal = 1 // SCOPE_EXTERNAL: tc only (externalTrafficPolicy Local)

	CTFwd       = 1 // CT_FWD: client -> frontend, backend chosen
	CTOut       = 2 // CT_OUT: client -> backend at egress, SNAT address
	CTReplySNAT = 3 // CT_REPLY_SNAT: backend -> SNAT address, real client
	CTReply     = 4 // CT_REPLY: backend -> client, frontend to restore

	CTFlagSNAT    = 1 << 0 // CT_F_SNAT
	CTFlagPending = 1 << 1 // CT_F_PENDING
	CTFlagClosing = 1 << 2 // CT_F_CLOSING
)

// MaglevM is MAGLEV_M: the size of each Service's Maglev lookup table.
const MaglevM = 1021

// Stat is an index into kpf_stats (enum in kpf_maps.h).
type Stat uint32

// kpf_stats counters.
const (
	StatDNAT Stat = iota
	StatRevNAT
	StatSNAT
	StatDropNoBackend
	StatDropSrcRange
	StatDropFrag
	StatDropSNATPort
	StatDropCTFull
	StatErrRewrite
	StatMax
)

// StatNames are the counters' names as exported in metrics, by index.
var StatNames = [StatMax]string{
	"dnat", "revnat", "snat", "drop_no_backend", "drop_src_range",
	"drop_frag", "drop_snat_port", "drop_ct_full", "err_rewrite",
}

// Map names in sock_lb.c; they are also the pin names under PinDir/PinVersion/maps.
const (
	MapServices   = sockLBMapKpfServices
	MapBackends   = sockLBMapKpfBackends
	MapRevNat     = sockLBMapKpfRevnat
	MapAffinity   = sockLBMapKpfAffinity
	MapAffMatch   = sockLBMapKpfAffMatch
	MapSockRevNat = sockLBMapKpfSockRevnat
	MapCT         = sockLBMapKpfCt
	MapSrcRanges  = sockLBMapKpfSrcRanges
	MapMaglev     = sockLBMapKpfMaglev
	MapDevices    = sockLBMapKpfDevices
	MapStats      = sockLBMapKpfStats
)
