/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * kpfree datapath: the map layouts shared by the socket load balancer
 * (sock_lb.c) and the tc programs for traffic entering a node (nodeport.c).
 *
 * Both objects define every map here (unused ones included), pinned by name,
 * so whichever loads first creates them and the other reuses them. A change
 * to any key, value, type or flag here needs a new PinVersion (datapath.go).
 *
 * Addresses are one 16-byte form everywhere: IPv6 as is, IPv4 as
 * ::ffff:a.b.c.d, all in network byte order; ports in network byte order.
 */
#ifndef KPF_MAPS_H
#define KPF_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Default map sizes; the loader overrides them through MaxEntries. */
#define SERVICES_MAX 65536
#define BACKENDS_MAX 65536
#define REVNAT_MAX 65536
#define AFFINITY_MAX 65536
#define AFF_MATCH_MAX 65536
#define SOCK_REVNAT_MAX 131072
#define CT_MAX 131072
#define SRC_RANGES_MAX 16384
#define MAGLEV_MAX 16384
#define DEVICES_MAX 64

/* Maglev lookup table size per Service (a prime; see agent/lbmap/maglev.go). */
#define MAGLEV_M 1021

/* svc_key.scope */
#define SCOPE_INTERNAL 0 /* socket LB, and tc when no external entry exists */
#define SCOPE_EXTERNAL 1 /* tc only: externalTrafficPolicy Local backends */

/* svc_val.flags */
#define SVC_F_AFFINITY (1 << 0)   /* ClientIP session affinity */
#define SVC_F_EXTERNAL (1 << 1)   /* NodePort, ExternalIP or LoadBalancer: tc serves it */
#define SVC_F_LOCAL (1 << 2)      /* externalTrafficPolicy Local: never SNAT */
#define SVC_F_SRC_RANGES (1 << 3) /* loadBalancerSourceRanges in kpf_src_ranges */
#define SVC_F_MAGLEV (1 << 4)     /* tc picks from kpf_maglev[rev_nat_id] */

/* backend_val.flags */
#define BE_F_LOCAL (1 << 0) /* the backend runs on this node: no SNAT */

/* ct_key.type */
#define CT_FWD 1        /* client -> frontend (ingress): backend chosen */
#define CT_OUT 2        /* client -> backend (egress): SNAT address to use */
#define CT_REPLY_SNAT 3 /* backend -> SNAT address (ingress): real client */
#define CT_REPLY 4      /* backend -> client (egress): frontend to restore */

/* ct_val.flags */
#define CT_F_SNAT (1 << 0)    /* CT_FWD: the flow is SNATed at egress */
#define CT_F_PENDING (1 << 1) /* CT_OUT: SNAT address not chosen yet */
#define CT_F_CLOSING (1 << 2) /* FIN or RST seen: short lifetime */

/* kpf_stats indexes: per-CPU packet counters, read by the agent. */
enum {
	STAT_DNAT = 0,        /* new flows translated to a backend */
	STAT_REVNAT,          /* replies translated back */
	STAT_SNAT,            /* flows SNATed to the node */
	STAT_DROP_NO_BACKEND, /* external frontend with zero backends */
	STAT_DROP_SRC_RANGE,  /* source outside loadBalancerSourceRanges */
	STAT_DROP_FRAG,       /* fragment of a packet for a frontend */
	STAT_DROP_SNAT_PORT,  /* no free SNAT port */
	STAT_DROP_CT_FULL,    /* conntrack update failed */
	STAT_ERR_REWRITE,     /* a packet rewrite helper failed */
	STAT_MAX,
};

/*
 * kpf_services: one master entry per frontend and scope (slot 0) carrying
 * the backend count, plus one entry per backend slot (1..count) carrying a
 * backend id.
 */
struct svc_key {
	__be32 addr[4]; /* frontend address */
	__be16 port;    /* frontend port */
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 scope;     /* SCOPE_* */
	__u16 slot;     /* 0: master entry; 1..count: backend slot */
	__u16 pad;
};

struct svc_val {
	__u32 backend_id;       /* slot entries: backend id; master: 0 */
	__u32 rev_nat_id;       /* id in kpf_revnat (same in master and slots) */
	__u16 count;            /* master: number of slots; 0 refuses */
	__u8 flags;             /* SVC_F_* */
	__u8 pad;
	__u32 affinity_timeout; /* master: ClientIP affinity timeout, seconds */
};

/* kpf_backends: backend id -> address. */
struct backend_val {
	__be32 addr[4];
	__be16 port;
	__u8 flags; /* BE_F_* */
	__u8 pad;
};

/* kpf_revnat: rev-nat id -> frontend, for the reverse translation. */
struct revnat_val {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

/* kpf_affinity (LRU): client + service -> backend last used. The socket LB
 * names the client by its netns cookie (addr zero), tc by its address
 * (cookie zero). */
struct aff_key {
	__be32 client_addr[4];
	__u64 client_cookie;
	__u32 rev_nat_id;
	__u32 pad;
};

struct aff_val {
	__u64 last_used; /* bpf_ktime_get_ns() */
	__u32 backend_id;
	__u32 pad;
};

/* kpf_aff_match: (backend, service) pairs, so a remembered backend (affinity,
 * conntrack) is used only while it still belongs to the service. */
struct aff_match_key {
	__u32 backend_id;
	__u32 rev_nat_id;
};

/* kpf_sock_revnat (LRU): socket + backend -> VIP it was translated from. */
struct sock_key {
	__u64 cookie; /* socket cookie; 0 when the kernel has none */
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 pad2;
};

struct sock_val {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 rev_nat_id;
};

/* kpf_ct (LRU): the tc datapath's connection tracking, one entry per
 * direction and stage (CT_*), as the packet is seen at that hook. */
struct ct_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 type; /* CT_* */
	__u16 pad;
};

struct ct_val {
	__be32 addr[4];   /* FWD: backend; OUT: SNAT address; REPLY_SNAT: client; REPLY: frontend */
	__be16 port;      /* the port that goes with addr */
	__u8 flags;       /* CT_F_* */
	__u8 pad;
	__u32 rev_nat_id; /* the Service (FWD, REPLY) */
	__u32 backend_id; /* FWD: backend id, checked against kpf_aff_match */
	__u32 pad2;
	__u64 expires;    /* bpf_ktime_get_ns() deadline; expired = missing */
};

/* kpf_src_ranges (LPM trie): rev_nat_id + client prefix -> allowed.
 * prefixlen counts the 32 bits of rev_nat_id, then the address bits (an IPv4
 * /n is 32 + 96 + n). rev_nat_id is stored in network byte order. */
struct src_range_key {
	__u32 prefixlen;
	__be32 rev_nat_id;
	__be32 addr[4];
};

/* kpf_maglev: rev_nat_id -> Maglev lookup table of backend ids. */
struct maglev_val {
	__u32 backend_id[MAGLEV_M];
};

/* kpf_devices: ifindex -> the node addresses used as SNAT source on it
 * (zero: that family is not SNATed on this device). */
struct dev_val {
	__be32 addr4;
	__be32 addr6[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SERVICES_MAX);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BACKENDS_MAX);
	__type(key, __u32);
	__type(value, struct backend_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, REVNAT_MAX);
	__type(key, __u32);
	__type(value, struct revnat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AFFINITY_MAX);
	__type(key, struct aff_key);
	__type(value, struct aff_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AFF_MATCH_MAX);
	__type(key, struct aff_match_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_aff_match SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SOCK_REVNAT_MAX);
	__type(key, struct sock_key);
	__type(value, struct sock_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_sock_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CT_MAX);
	__type(key, struct ct_key);
	__type(value, struct ct_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SRC_RANGES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct src_range_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_src_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAGLEV_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct maglev_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEVICES_MAX);
	__type(key, __u32);
	__type(value, struct dev_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_devices SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kpf_stats SEC(".maps");

#endif /* KPF_MAPS_H */
