//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * kpfree tc datapath: NodePort, ExternalIPs and LoadBalancer traffic that
 * enters the node from the wire. SCHED_CLS programs in direct-action mode on
 * the node's devices (tcx from 6.6, clsact + cls_bpf before):
 *
 *   kpf_tc_in4 / kpf_tc_in6    device ingress: reverse SNAT of replies, DNAT
 *                              of new and known flows to a backend;
 *   kpf_tc_out4 / kpf_tc_out6  device egress (after routing): restore the
 *                              frontend as source of replies, SNAT flows to
 *                              remote backends to the node's address.
 *
 * A netfilter-like split: only addresses and ports are rewritten, the
 * kernel's own routing and forwarding carry the packet. No encapsulation, so
 * no MTU change.
 *
 * Minimum kernel 4.19: every helper used (skb_load_bytes, skb_store_bytes,
 * l3/l4_csum_replace, csum_diff, get_prandom_u32, ktime_get_ns, map ops)
 * exists there; no loops, no bpf-to-bpf calls, everything inlined, map values
 * copied to the stack before their addresses are passed on. Headers are read
 * with bpf_skb_load_bytes (works on non-linear skbs, no packet pointers to
 * re-validate after a rewrite).
 *
 * Return values: TC_ACT_UNSPEC (-1, "next": nothing done, later filters and
 * the stack decide), TC_ACT_OK after a rewrite, TC_ACT_SHOT for a counted
 * drop. Fail open: a missing entry or a failed lookup leaves the packet as it
 * is, with a counter where it matters. Only Ethernet devices are supported
 * (the IP header is expected at offset 14).
 *
 * Addresses are the 16-byte form of kpf_maps.h (IPv4 as ::ffff:a.b.c.d).
 */

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "kpf_maps.h"

#define NSEC_PER_SEC 1000000000ULL
#define V4_MAPPED_PREFIX bpf_htonl(0x0000ffff)

/* Conntrack lifetimes. */
#define CT_LIFE_TCP (21600ULL * NSEC_PER_SEC)
#define CT_LIFE_TCP_SYN (60ULL * NSEC_PER_SEC)
#define CT_LIFE_CLOSING (10ULL * NSEC_PER_SEC)
#define CT_LIFE_UDP (120ULL * NSEC_PER_SEC)
/* An entry's deadline is written only when it moves by more than this. */
#define CT_REFRESH_SLACK NSEC_PER_SEC

/* SNAT ports when the client's own port is taken: 32768..60999. */
#define SNAT_PORT_MIN 32768
#define SNAT_PORT_SPAN (61000 - SNAT_PORT_MIN)

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

struct v4hdr {
	__u8 vihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct v6hdr {
	__be32 vtcfl;
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__be32 saddr[4];
	__be32 daddr[4];
};

#define V4_CSUM_OFF (ETH_HLEN + 10)
#define V4_SADDR_OFF (ETH_HLEN + 12)
#define V4_DADDR_OFF (ETH_HLEN + 16)
#define V6_SADDR_OFF (ETH_HLEN + 8)
#define V6_DADDR_OFF (ETH_HLEN + 24)

/* The packet's tuple and what else the programs need from its headers. */
struct flow {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 frag; /* IPv4 first fragment (MF set, offset 0) */
	__u8 pad;
	__u32 l4_off;
};

/* A rewrite target: address + port. */
struct endpoint {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
};

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *p = bpf_map_lookup_elem(&kpf_stats, &idx);

	if (p)
		*p += 1;
}

static __always_inline void addr_copy(__be32 *dst, const __be32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

/* Parse eth + IPv4/IPv6 + TCP/UDP ports. Returns 0 when the packet is
 * something the programs handle; non-first IPv4 fragments carry no ports and
 * are not handled. */
static __always_inline int parse(struct __sk_buff *skb, struct flow *f, const int v6)
{
	if (!v6) {
		struct v4hdr ip;
		__u16 frag;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			return -1;
		if ((ip.vihl >> 4) != 4 || (ip.vihl & 0xf) < 5)
			return -1;
		frag = bpf_ntohs(ip.frag_off);
		if (frag & IP_OFFSET)
			return -1;
		f->frag = (frag & IP_MF) != 0;
		f->proto = ip.protocol;
		f->l4_off = ETH_HLEN + (ip.vihl & 0xf) * 4;
		f->saddr[2] = V4_MAPPED_PREFIX;
		f->saddr[3] = ip.saddr;
		f->daddr[2] = V4_MAPPED_PREFIX;
		f->daddr[3] = ip.daddr;
	} else {
		struct v6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return -1;
		if ((bpf_ntohl(ip6.vtcfl) >> 28) != 6)
			return -1;
		f->proto = ip6.nexthdr; /* extension headers: not handled */
		f->l4_off = ETH_HLEN + sizeof(struct v6hdr);
		addr_copy(f->saddr, ip6.saddr);
		addr_copy(f->daddr, ip6.daddr);
	}
	if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
		return -1;
	if (bpf_skb_load_bytes(skb, f->l4_off, &f->sport, 4) < 0)
		return -1;
	if (f->proto == IPPROTO_TCP && bpf_skb_load_bytes(skb, f->l4_off + 13, &f->tcp_flags, 1) < 0)
		return -1;
	return 0;
}

/*
 * Rewrite the source (dst == 0) or destination (dst == 1) of the packet to
 * ep, fixing the IPv4 header checksum and the TCP/UDP checksum (pseudo-header
 * and port). A UDP/IPv4 checksum of 0 (none) stays 0 (BPF_F_MARK_MANGLED_0).
 * Returns < 0 when a helper failed.
 */
static __always_inline int rewrite(struct __sk_buff *skb, const struct flow *f, const int v6, const int dst,
				   const struct endpoint *ep)
{
	__u32 csum_off = f->l4_off + (f->proto == IPPROTO_TCP ? 16 : 6);
	__u64 l4flags = f->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be16 old_port = dst ? f->dport : f->sport;
	__be16 new_port = ep->port;

	if (!v6) {
		__be32 old = dst ? f->daddr[3] : f->saddr[3];
		__be32 new = ep->addr[3];

		if (old != new) {
			if (bpf_l4_csum_replace(skb, csum_off, old, new, l4flags | BPF_F_PSEUDO_HDR | 4) < 0)
				return -1;
			if (bpf_l3_csum_replace(skb, V4_CSUM_OFF, old, new, 4) < 0)
				return -1;
			if (bpf_skb_store_bytes(skb, dst ? V4_DADDR_OFF : V4_SADDR_OFF, &new, 4, 0) < 0)
				return -1;
		}
	} else {
		struct endpoint old = {};
		struct endpoint new = *ep;
		__s64 diff;

		addr_copy(old.addr, dst ? f->daddr : f->saddr);
		diff = bpf_csum_diff(old.addr, 16, new.addr, 16, 0);
		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, l4flags | BPF_F_PSEUDO_HDR) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, dst ? V6_DADDR_OFF : V6_SADDR_OFF, new.addr, 16, 0) < 0)
			return -1;
	}
	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, l4flags | 2) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, f->l4_off + (dst ? 2 : 0), &new_port, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* Rewrite, counting and dropping a packet a helper may have left half
 * rewritten. */
static __always_inline int rewrite_verdict(struct __sk_buff *skb, const struct flow *f, const int v6, const int dst,
					   const struct endpoint *ep)
{
	if (rewrite(skb, f, v6, dst, ep) < 0) {
		stat_inc(STAT_ERR_REWRITE);
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}

static __always_inline int flow_closing(const struct flow *f)
{
	return f->proto == IPPROTO_TCP && (f->tcp_flags & (TCP_FIN | TCP_RST));
}

static __always_inline __u64 ct_lifetime(const struct flow *f, int closing)
{
	if (f->proto != IPPROTO_TCP)
		return CT_LIFE_UDP;
	if (closing)
		return CT_LIFE_CLOSING;
	if ((f->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
		return CT_LIFE_TCP_SYN;
	return CT_LIFE_TCP;
}

static __always_inline void ct_key_fill(struct ct_key *k, const __be32 *saddr, const __be32 *daddr, __be16 sport,
					__be16 dport, __u8 proto, __u8 type)
{
	addr_copy(k->saddr, saddr);
	addr_copy(k->daddr, daddr);
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->type = type;
	k->pad = 0;
}

/* Look up an entry; an expired one counts as missing. */
static __always_inline struct ct_val *ct_lookup(const struct ct_key *k, __u64 now)
{
	struct ct_val *p = bpf_map_lookup_elem(&kpf_ct, k);

	if (p && p->expires < now)
		return 0;
	return p;
}

/* Extend an entry's lifetime for this packet (in place; written only when the
 * deadline moves by more than a second) and mark it closing on FIN/RST. */
static __always_inline void ct_refresh(struct ct_val *p, const struct flow *f, __u64 now)
{
	__u8 flags = p->flags;
	__u64 old = p->expires;
	__u64 exp;

	if (flow_closing(f) && !(flags & CT_F_CLOSING)) {
		flags |= CT_F_CLOSING;
		p->flags = flags;
	}
	exp = now + ct_lifetime(f, flags & CT_F_CLOSING);
	if (exp > old + CT_REFRESH_SLACK || exp + CT_REFRESH_SLACK < old)
		p->expires = exp;
}

/* Copy an entry's target out of the map value. */
static __always_inline void ct_target(struct endpoint *ep, const struct ct_val *v)
{
	addr_copy(ep->addr, v->addr);
	ep->port = v->port;
	ep->pad = 0;
}

static __always_inline int aff_match(__u32 backend_id, __u32 rev_nat_id)
{
	struct aff_match_key mk = {};

	mk.backend_id = backend_id;
	mk.rev_nat_id = rev_nat_id;
	return bpf_map_lookup_elem(&kpf_aff_match, &mk) != 0;
}

/*
 * Maglev hash of a flow: FNV-1a over the 32-bit words saddr[0..3],
 * sport << 16 | dport (network order as loaded) and proto, then the
 * MurmurHash3 finalizer. The destination address is left out on purpose: a
 * flow to the same Service reaches the same backend through any node
 * (a NodePort differs in address per node).
 */
static __always_inline __u32 flow_hash(const struct flow *f)
{
	__u32 h = 2166136261U;

	h = (h ^ f->saddr[0]) * 16777619U;
	h = (h ^ f->saddr[1]) * 16777619U;
	h = (h ^ f->saddr[2]) * 16777619U;
	h = (h ^ f->saddr[3]) * 16777619U;
	h = (h ^ (((__u32)f->sport << 16) | f->dport)) * 16777619U;
	h = (h ^ f->proto) * 16777619U;
	h ^= h >> 16;
	h *= 0x85ebca6bU;
	h ^= h >> 13;
	h *= 0xc2b2ae35U;
	h ^= h >> 16;
	return h;
}

/* The backend of a ClientIP-affinity Service remembered for this client
 * (0: none, expired, or no longer in the Service). */
static __always_inline __u32 affinity_get(const struct aff_key *ak, const struct svc_val *svc, __u64 now)
{
	struct aff_val *ap = bpf_map_lookup_elem(&kpf_affinity, ak);
	struct aff_val av;

	if (!ap)
		return 0;
	av = *ap;
	if (now - av.last_used > (__u64)svc->affinity_timeout * NSEC_PER_SEC)
		return 0;
	if (!aff_match(av.backend_id, svc->rev_nat_id))
		return 0;
	return av.backend_id;
}

static __always_inline __u32 maglev_pick(const struct flow *f, __u32 rev_nat_id)
{
	struct maglev_val *mp = bpf_map_lookup_elem(&kpf_maglev, &rev_nat_id);
	__u32 idx;

	if (!mp)
		return 0;
	idx = flow_hash(f) % MAGLEV_M;
	barrier_var(idx);
	if (idx >= MAGLEV_M)
		return 0;
	return mp->backend_id[idx];
}

/* Insert the CT_REPLY_SNAT entry that claims SNAT address:port for a flow;
 * fails when the port is in use by a live entry. */
static __always_inline int snat_claim(struct ct_key *rk, const struct ct_val *rv, __u64 now)
{
	struct ct_val *p;

	if (bpf_map_update_elem(&kpf_ct, rk, rv, BPF_NOEXIST) == 0)
		return 0;
	p = bpf_map_lookup_elem(&kpf_ct, rk);
	if (p && p->expires < now)
		return bpf_map_update_elem(&kpf_ct, rk, rv, BPF_ANY);
	return -1;
}

static __always_inline __be16 snat_random_port(void)
{
	return bpf_htons(SNAT_PORT_MIN + bpf_get_prandom_u32() % SNAT_PORT_SPAN);
}

/* Ingress: un-SNAT replies, DNAT flows to external frontends. */
static __always_inline int tc_ingress(struct __sk_buff *skb, const int v6)
{
	struct flow f = {};
	struct ct_key k = {};
	struct ct_val v = {};
	struct endpoint ep = {};
	struct svc_key sk = {};
	struct svc_val svc;
	struct backend_val be;
	struct svc_val *sp;
	struct backend_val *bp;
	struct ct_val *cp;
	__u32 backend_id = 0;
	__u64 now;
	int snat;

	if (parse(skb, &f, v6) < 0)
		return TC_ACT_UNSPEC;
	now = bpf_ktime_get_ns();

	if (!f.frag) {
		/* Reply to a flow SNATed at egress: back to the real client. */
		ct_key_fill(&k, f.saddr, f.daddr, f.sport, f.dport, f.proto, CT_REPLY_SNAT);
		cp = ct_lookup(&k, now);
		if (cp) {
			ct_target(&ep, cp);
			ct_refresh(cp, &f, now);
			return rewrite_verdict(skb, &f, v6, 1, &ep);
		}
		/* A flow whose backend is chosen, while the backend stays in the
		 * Service. */
		k.type = CT_FWD;
		cp = ct_lookup(&k, now);
		if (cp && aff_match(cp->backend_id, cp->rev_nat_id)) {
			ct_target(&ep, cp);
			ct_refresh(cp, &f, now);
			return rewrite_verdict(skb, &f, v6, 1, &ep);
		}
	}

	/* External entry first (externalTrafficPolicy Local), else the
	 * Service's own one; only external frontends are served here. */
	addr_copy(sk.addr, f.daddr);
	sk.port = f.dport;
	sk.proto = f.proto;
	sk.scope = SCOPE_EXTERNAL;
	sp = bpf_map_lookup_elem(&kpf_services, &sk);
	if (!sp) {
		sk.scope = SCOPE_INTERNAL;
		sp = bpf_map_lookup_elem(&kpf_services, &sk);
		if (!sp)
			return TC_ACT_UNSPEC;
	}
	svc = *sp;
	if (!(svc.flags & SVC_F_EXTERNAL))
		return TC_ACT_UNSPEC;
	if (f.frag) {
		stat_inc(STAT_DROP_FRAG);
		return TC_ACT_SHOT;
	}
	if (svc.flags & SVC_F_SRC_RANGES) {
		struct src_range_key rk = {};

		rk.prefixlen = 32 + 128;
		rk.rev_nat_id = bpf_htonl(svc.rev_nat_id);
		addr_copy(rk.addr, f.saddr);
		if (!bpf_map_lookup_elem(&kpf_src_ranges, &rk)) {
			stat_inc(STAT_DROP_SRC_RANGE);
			return TC_ACT_SHOT;
		}
	}
	if (svc.count == 0) {
		stat_inc(STAT_DROP_NO_BACKEND);
		return TC_ACT_SHOT;
	}

	/* Backend: remembered (affinity), Maglev, or a random slot. */
	if (svc.flags & SVC_F_AFFINITY) {
		struct aff_key ak = {};

		addr_copy(ak.client_addr, f.saddr);
		ak.rev_nat_id = svc.rev_nat_id;
		backend_id = affinity_get(&ak, &svc, now);
	}
	if (!backend_id && (svc.flags & SVC_F_MAGLEV))
		backend_id = maglev_pick(&f, svc.rev_nat_id);
	if (!backend_id) {
		sk.slot = (bpf_get_prandom_u32() % svc.count) + 1;
		sp = bpf_map_lookup_elem(&kpf_services, &sk);
		if (!sp)
			return TC_ACT_UNSPEC;
		backend_id = sp->backend_id;
	}
	bp = bpf_map_lookup_elem(&kpf_backends, &backend_id);
	if (!bp)
		return TC_ACT_UNSPEC;
	be = *bp;
	addr_copy(ep.addr, be.addr);
	ep.port = be.port;
	snat = !(svc.flags & SVC_F_LOCAL) && !(be.flags & BE_F_LOCAL);

	/* Conntrack: the reverse entries first, the forward one last, so a
	 * forward hit always has its replies covered. */
	v.expires = now + ct_lifetime(&f, flow_closing(&f));
	v.rev_nat_id = svc.rev_nat_id;
	v.flags = flow_closing(&f) ? CT_F_CLOSING : 0;
	addr_copy(v.addr, f.daddr);
	v.port = f.dport;
	ct_key_fill(&k, be.addr, f.saddr, be.port, f.sport, f.proto, CT_REPLY);
	if (bpf_map_update_elem(&kpf_ct, &k, &v, BPF_ANY) < 0)
		goto ct_full;
	if (snat) {
		addr_copy(v.addr, be.addr); /* no SNAT address yet */
		v.port = be.port;
		v.flags |= CT_F_PENDING;
		ct_key_fill(&k, f.saddr, be.addr, f.sport, be.port, f.proto, CT_OUT);
		if (bpf_map_update_elem(&kpf_ct, &k, &v, BPF_ANY) < 0)
			goto ct_full;
		v.flags &= ~CT_F_PENDING;
		v.flags |= CT_F_SNAT;
	}
	addr_copy(v.addr, be.addr);
	v.port = be.port;
	v.backend_id = backend_id;
	ct_key_fill(&k, f.saddr, f.daddr, f.sport, f.dport, f.proto, CT_FWD);
	if (bpf_map_update_elem(&kpf_ct, &k, &v, BPF_ANY) < 0)
		goto ct_full;

	if (svc.flags & SVC_F_AFFINITY) {
		struct aff_key ak = {};
		struct aff_val av = {};

		addr_copy(ak.client_addr, f.saddr);
		ak.rev_nat_id = svc.rev_nat_id;
		av.last_used = now;
		av.backend_id = backend_id;
		bpf_map_update_elem(&kpf_affinity, &ak, &av, BPF_ANY);
	}
	stat_inc(STAT_DNAT);
	return rewrite_verdict(skb, &f, v6, 1, &ep);

ct_full:
	stat_inc(STAT_DROP_CT_FULL);
	return TC_ACT_UNSPEC;
}

/* Egress: restore the frontend as source of replies, SNAT flows that leave
 * for a remote backend. */
static __always_inline int tc_egress(struct __sk_buff *skb, const int v6)
{
	struct flow f = {};
	struct ct_key k = {};
	struct ct_key rk = {};
	struct ct_val rv = {};
	struct ct_val v;
	struct endpoint ep = {};
	struct dev_val dev;
	struct dev_val *dp;
	struct ct_val *cp;
	__u32 ifindex;
	__u64 now;

	if (parse(skb, &f, v6) < 0 || f.frag)
		return TC_ACT_UNSPEC;
	now = bpf_ktime_get_ns();

	/* A backend's reply: the client must see the frontend. */
	ct_key_fill(&k, f.saddr, f.daddr, f.sport, f.dport, f.proto, CT_REPLY);
	cp = ct_lookup(&k, now);
	if (cp) {
		ct_target(&ep, cp);
		ct_refresh(cp, &f, now);
		stat_inc(STAT_REVNAT);
		return rewrite_verdict(skb, &f, v6, 0, &ep);
	}

	/* A DNATed flow leaving for a remote backend: SNAT to this device's
	 * address, claiming a port on the first packet. */
	k.type = CT_OUT;
	cp = ct_lookup(&k, now);
	if (!cp)
		return TC_ACT_UNSPEC;
	if (!(cp->flags & CT_F_PENDING)) {
		ct_target(&ep, cp);
		ct_refresh(cp, &f, now);
		return rewrite_verdict(skb, &f, v6, 0, &ep);
	}
	v = *cp;

	ifindex = skb->ifindex;
	dp = bpf_map_lookup_elem(&kpf_devices, &ifindex);
	if (!dp) {
		stat_inc(STAT_ERR_REWRITE);
		return TC_ACT_UNSPEC;
	}
	dev = *dp;
	if (!v6) {
		if (!dev.addr4) {
			stat_inc(STAT_ERR_REWRITE);
			return TC_ACT_UNSPEC;
		}
		ep.addr[2] = V4_MAPPED_PREFIX;
		ep.addr[3] = dev.addr4;
	} else {
		if (!(dev.addr6[0] | dev.addr6[1] | dev.addr6[2] | dev.addr6[3])) {
			stat_inc(STAT_ERR_REWRITE);
			return TC_ACT_UNSPEC;
		}
		addr_copy(ep.addr, dev.addr6);
	}

	/* Claim SNAT address:port: the client's port, else up to three random
	 * ones. The claim is the CT_REPLY_SNAT entry itself. */
	rv.expires = now + ct_lifetime(&f, flow_closing(&f));
	rv.rev_nat_id = v.rev_nat_id;
	addr_copy(rv.addr, f.saddr);
	rv.port = f.sport;
	ep.port = f.sport;
	ct_key_fill(&rk, f.daddr, ep.addr, f.dport, ep.port, f.proto, CT_REPLY_SNAT);
	if (snat_claim(&rk, &rv, now) < 0) {
		ep.port = snat_random_port();
		rk.dport = ep.port;
		if (snat_claim(&rk, &rv, now) < 0) {
			ep.port = snat_random_port();
			rk.dport = ep.port;
			if (snat_claim(&rk, &rv, now) < 0) {
				ep.port = snat_random_port();
				rk.dport = ep.port;
				if (snat_claim(&rk, &rv, now) < 0) {
					stat_inc(STAT_DROP_SNAT_PORT);
					return TC_ACT_SHOT;
				}
			}
		}
	}
	addr_copy(v.addr, ep.addr);
	v.port = ep.port;
	v.flags &= ~CT_F_PENDING;
	if (flow_closing(&f))
		v.flags |= CT_F_CLOSING;
	v.expires = now + ct_lifetime(&f, v.flags & CT_F_CLOSING);
	if (bpf_map_update_elem(&kpf_ct, &k, &v, BPF_ANY) < 0)
		stat_inc(STAT_DROP_CT_FULL);
	stat_inc(STAT_SNAT);
	return rewrite_verdict(skb, &f, v6, 0, &ep);
}

/* Entry points: thin, one family each. */

SEC("tc")
int kpf_tc_in4(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	return tc_ingress(skb, 0);
}

SEC("tc")
int kpf_tc_in6(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_UNSPEC;
	return tc_ingress(skb, 1);
}

SEC("tc")
int kpf_tc_out4(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	return tc_egress(skb, 0);
}

SEC("tc")
int kpf_tc_out6(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_UNSPEC;
	return tc_egress(skb, 1);
}

char __license[] SEC("license") = "Dual MIT/GPL";
