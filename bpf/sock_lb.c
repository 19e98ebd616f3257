//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * kpfree socket load balancer: cgroup sock_addr programs that translate a
 * Service VIP into a backend address when a socket connects (TCP, connected
 * UDP) or sends (unconnected UDP), and translate the backend back into the VIP
 * when the socket receives (UDP recvmsg) or asks for its peer (getpeername).
 *
 * Minimum kernel 4.19.57 (cgroup/recvmsg4/6 were backported there; mainline
 * 5.2). The loader probes for the optional parts and adapts at load time:
 *   - cgroup/getpeername4/6 (5.8): skipped when missing, getpeername() then
 *     reports the backend address;
 *   - bpf_set_retval (5.18): without it a Service with no backends fails
 *     connect()/sendmsg() with EPERM instead of ECONNREFUSED;
 *   - bpf_get_netns_cookie (5.7): without it ClientIP affinity is shared by
 *     every client of the node instead of one per network namespace;
 *   - bpf_get_socket_cookie (4.19): without it the reverse translation is
 *     keyed by backend address only.
 * A missing helper is replaced by "r0 = 0" in the instruction stream before
 * loading (see polyfill.go), so this file has no compile-time variants.
 *
 * Rules kept for the 4.19 verifier: no loops, everything inlined, each program
 * well under 4096 instructions, map values copied to the stack before use,
 * and every access to the context is a full 32-bit load or store (older
 * kernels reject narrow or combined 64-bit accesses to user_ip6/user_port).
 *
 * Fail open: whatever is not a known VIP, or any missing map entry, leaves the
 * address unchanged. The only refusal is a Service that exists with zero
 * backends.
 *
 * Addresses are one 16-byte form in every map: IPv6 as is, IPv4 as
 * ::ffff:a.b.c.d, all in network byte order. An IPv6 socket connecting to a
 * v4-mapped address therefore hits the same IPv4 Service.
 */

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SYS_REJECT 0
#define SYS_PROCEED 1

#define NSEC_PER_SEC 1000000000ULL

#include "kpf_maps.h"

/*
 * Context access: always one full 32-bit load or store. volatile keeps clang
 * from narrowing a load (user_port) or merging two stores into one 64-bit
 * store (user_ip6), both of which older verifiers reject.
 */
#define ctx_load(field) (*(volatile __u32 *)&(field))
#define ctx_store(field, val) (*(volatile __u32 *)&(field) = (__u32)(val))

#define V4_MAPPED_PREFIX bpf_htonl(0x0000ffff)

static __always_inline int addr_is_v4_mapped(const __be32 *addr)
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_PREFIX;
}

enum {
	XLATE_PASS = 0,   /* not a Service, or a missing entry: leave as is */
	XLATE_DONE,       /* backend chosen */
	XLATE_NO_BACKEND, /* Service exists with zero backends: refuse */
};

struct lb_target {
	__be32 addr[4];
	__be16 port;
	__u16 pad;
	__u32 rev_nat_id;
};

/* Affinity lookup: returns a backend id or 0. */
static __always_inline __u32 affinity_get(const struct aff_key *ak, const struct svc_val *svc, __u64 now)
{
	struct aff_match_key mk = {};
	struct aff_val *ap;
	struct aff_val av;

	ap = bpf_map_lookup_elem(&kpf_affinity, ak);
	if (!ap)
		return 0;
	av = *ap;
	if (now - av.last_used > (__u64)svc->affinity_timeout * NSEC_PER_SEC)
		return 0;
	mk.backend_id = av.backend_id;
	mk.rev_nat_id = svc->rev_nat_id;
	if (!bpf_map_lookup_elem(&kpf_aff_match, &mk))
		return 0;
	return av.backend_id;
}

/*
 * Pick a backend for the frontend in key (addr, port, proto set; slot is
 * overwritten). Random over the slots, or the affinity backend.
 */
static __always_inline int lb_select(struct bpf_sock_addr *ctx, struct svc_key *key, struct lb_target *t)
{
	struct aff_key ak = {};
	struct backend_val *bp;
	struct svc_val *p;
	struct svc_val svc;
	__u32 backend_id = 0;
	__u64 now = 0;

	key->slot = 0;
	p = bpf_map_lookup_elem(&kpf_services, key);
	if (!p)
		return XLATE_PASS;
	svc = *p;
	if (svc.count == 0)
		return XLATE_NO_BACKEND;

	if (svc.flags & SVC_F_AFFINITY) {
		ak.client_cookie = bpf_get_netns_cookie(ctx);
		ak.rev_nat_id = svc.rev_nat_id;
		now = bpf_ktime_get_ns();
		backend_id = affinity_get(&ak, &svc, now);
	}

	if (!backend_id) {
		key->slot = (bpf_get_prandom_u32() % svc.count) + 1;
		p = bpf_map_lookup_elem(&kpf_services, key);
		if (!p)
			return XLATE_PASS;
		backend_id = p->backend_id;
	}

	bp = bpf_map_lookup_elem(&kpf_backends, &backend_id);
	if (!bp)
		return XLATE_PASS;
	t->addr[0] = bp->addr[0];
	t->addr[1] = bp->addr[1];
	t->addr[2] = bp->addr[2];
	t->addr[3] = bp->addr[3];
	t->port = bp->port;
	t->rev_nat_id = svc.rev_nat_id;

	if (svc.flags & SVC_F_AFFINITY) {
		struct aff_val av = {};

		av.last_used = now;
		av.backend_id = backend_id;
		bpf_map_update_elem(&kpf_affinity, &ak, &av, BPF_ANY);
	}
	return XLATE_DONE;
}

/* Remember which VIP this socket's backend stands for (recvmsg, getpeername). */
static __always_inline void sock_revnat_record(struct bpf_sock_addr *ctx, const struct lb_target *t,
					       const struct svc_key *vip)
{
	struct sock_key sk = {};
	struct sock_val sv = {};
	struct sock_val *cur;

	sk.cookie = bpf_get_socket_cookie(ctx);
	sk.addr[0] = t->addr[0];
	sk.addr[1] = t->addr[1];
	sk.addr[2] = t->addr[2];
	sk.addr[3] = t->addr[3];
	sk.port = t->port;
	sv.addr[0] = vip->addr[0];
	sv.addr[1] = vip->addr[1];
	sv.addr[2] = vip->addr[2];
	sv.addr[3] = vip->addr[3];
	sv.port = vip->port;
	sv.rev_nat_id = t->rev_nat_id;
	/* Unconnected UDP records on every send: skip the write when the entry
	 * is already there, as LRU updates take a lock. */
	cur = bpf_map_lookup_elem(&kpf_sock_revnat, &sk);
	if (cur && cur->rev_nat_id == sv.rev_nat_id && cur->port == sv.port && cur->addr[0] == sv.addr[0] &&
	    cur->addr[1] == sv.addr[1] && cur->addr[2] == sv.addr[2] && cur->addr[3] == sv.addr[3])
		return;
	bpf_map_update_elem(&kpf_sock_revnat, &sk, &sv, BPF_ANY);
}

/*
 * Find the VIP for a backend address seen by this socket. The entry counts
 * only while kpf_revnat still maps its rev-nat id to the same VIP, so a
 * deleted (or re-created elsewhere) Service stops being reported.
 */
static __always_inline int sock_revnat_lookup(struct sock_key *sk, struct sock_val *out)
{
	struct revnat_val *rp;
	struct sock_val *p;

	p = bpf_map_lookup_elem(&kpf_sock_revnat, sk);
	if (!p)
		return 0;
	*out = *p;
	rp = bpf_map_lookup_elem(&kpf_revnat, &out->rev_nat_id);
	if (!rp || rp->port != out->port || rp->addr[0] != out->addr[0] || rp->addr[1] != out->addr[1] ||
	    rp->addr[2] != out->addr[2] || rp->addr[3] != out->addr[3]) {
		bpf_map_delete_elem(&kpf_sock_revnat, sk);
		return 0;
	}
	return 1;
}

static __always_inline int l4_supported(__u32 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}

static __always_inline int refuse(void)
{
	/* Replaced by "r0 = 0" on kernels without bpf_set_retval: EPERM then. */
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

/* connect4 / sendmsg4 */
static __always_inline int sock4_fwd(struct bpf_sock_addr *ctx)
{
	struct svc_key key = {};
	struct lb_target t = {};
	__u32 proto = ctx_load(ctx->protocol);
	int ret;

	if (!l4_supported(proto))
		return SYS_PROCEED;
	key.addr[2] = V4_MAPPED_PREFIX;
	key.addr[3] = ctx_load(ctx->user_ip4);
	key.port = (__be16)ctx_load(ctx->user_port);
	key.proto = (__u8)proto;

	ret = lb_select(ctx, &key, &t);
	if (ret == XLATE_NO_BACKEND)
		return refuse();
	if (ret != XLATE_DONE || !addr_is_v4_mapped(t.addr))
		return SYS_PROCEED;

	ctx_store(ctx->user_ip4, t.addr[3]);
	ctx_store(ctx->user_port, t.port);
	sock_revnat_record(ctx, &t, &key);
	return SYS_PROCEED;
}

/* connect6 / sendmsg6; a v4-mapped destination finds the IPv4 Service. */
static __always_inline int sock6_fwd(struct bpf_sock_addr *ctx)
{
	struct svc_key key = {};
	struct lb_target t = {};
	__u32 proto = ctx_load(ctx->protocol);
	int ret;

	if (!l4_supported(proto))
		return SYS_PROCEED;
	key.addr[0] = ctx_load(ctx->user_ip6[0]);
	key.addr[1] = ctx_load(ctx->user_ip6[1]);
	key.addr[2] = ctx_load(ctx->user_ip6[2]);
	key.addr[3] = ctx_load(ctx->user_ip6[3]);
	key.port = (__be16)ctx_load(ctx->user_port);
	key.proto = (__u8)proto;

	ret = lb_select(ctx, &key, &t);
	if (ret == XLATE_NO_BACKEND)
		return refuse();
	if (ret != XLATE_DONE)
		return SYS_PROCEED;

	ctx_store(ctx->user_ip6[0], t.addr[0]);
	ctx_store(ctx->user_ip6[1], t.addr[1]);
	ctx_store(ctx->user_ip6[2], t.addr[2]);
	ctx_store(ctx->user_ip6[3], t.addr[3]);
	ctx_store(ctx->user_port, t.port);
	sock_revnat_record(ctx, &t, &key);
	return SYS_PROCEED;
}

/* recvmsg4 / getpeername4: backend -> VIP. Must always return 1. */
static __always_inline int sock4_rev(struct bpf_sock_addr *ctx)
{
	struct sock_key sk = {};
	struct sock_val vip;

	sk.cookie = bpf_get_socket_cookie(ctx);
	sk.addr[2] = V4_MAPPED_PREFIX;
	sk.addr[3] = ctx_load(ctx->user_ip4);
	sk.port = (__be16)ctx_load(ctx->user_port);
	if (!sock_revnat_lookup(&sk, &vip) || !addr_is_v4_mapped(vip.addr))
		return SYS_PROCEED;

	ctx_store(ctx->user_ip4, vip.addr[3]);
	ctx_store(ctx->user_port, vip.port);
	return SYS_PROCEED;
}

/* recvmsg6 / getpeername6. Must always return 1. */
static __always_inline int sock6_rev(struct bpf_sock_addr *ctx)
{
	struct sock_key sk = {};
	struct sock_val vip;

	sk.cookie = bpf_get_socket_cookie(ctx);
	sk.addr[0] = ctx_load(ctx->user_ip6[0]);
	sk.addr[1] = ctx_load(ctx->user_ip6[1]);
	sk.addr[2] = ctx_load(ctx->user_ip6[2]);
	sk.addr[3] = ctx_load(ctx->user_ip6[3]);
	sk.port = (__be16)ctx_load(ctx->user_port);
	if (!sock_revnat_lookup(&sk, &vip))
		return SYS_PROCEED;

	ctx_store(ctx->user_ip6[0], vip.addr[0]);
	ctx_store(ctx->user_ip6[1], vip.addr[1]);
	ctx_store(ctx->user_ip6[2], vip.addr[2]);
	ctx_store(ctx->user_ip6[3], vip.addr[3]);
	ctx_store(ctx->user_port, vip.port);
	return SYS_PROCEED;
}

/* Entry points: thin, one translate call each. */

SEC("cgroup/connect4")
int kpf_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx);
}

SEC("cgroup/connect6")
int kpf_connect6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx);
}

SEC("cgroup/sendmsg4")
int kpf_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_fwd(ctx);
}

SEC("cgroup/sendmsg6")
int kpf_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_fwd(ctx);
}

SEC("cgroup/recvmsg4")
int kpf_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx);
}

SEC("cgroup/recvmsg6")
int kpf_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx);
}

SEC("cgroup/getpeername4")
int kpf_getpeer4(struct bpf_sock_addr *ctx)
{
	return sock4_rev(ctx);
}

SEC("cgroup/getpeername6")
int kpf_getpeer6(struct bpf_sock_addr *ctx)
{
	return sock6_rev(ctx);
}

char __license[] SEC("license") = "Dual MIT/GPL";
