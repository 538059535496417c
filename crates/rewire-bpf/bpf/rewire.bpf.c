// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * rewire kernel programs: WFP-style connection redirect with redirect
 * records, attached to a cgroup that rewire created.
 *
 *   cgroup/connect4,6     walk the rules in configured order, redirect to the
 *                         first matching service not yet in the flow's chain
 *   sockops               hand the flow record from the client socket to the
 *                         proxy's accepted socket (keyed by the 4-tuple)
 *   cgroup/getpeername4,6 the client sees its original destination
 *   cgroup/getsockopt     RW_SOL/RW_OPT_RECORDS, RW_OPT_CONTEXT: the queries
 *   cgroup/setsockopt     RW_SOL/RW_OPT_RECORDS: the set call
 *
 * All per-flow state lives in socket-local storage, which the kernel frees
 * with the socket; the only shared table (the hand-off) is an LRU hash, so
 * nothing grows without bound. Blobs handed to user space carry a SipHash
 * tag under a per-load random key: user space cannot forge or edit them.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "rewire_abi.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define SOCK_STREAM 1
#define SOCK_DGRAM 2

#define EPERM 1
#define ENOENT 2
#define ENOBUFS 105
#define EINVAL 22
#define EACCES 13
#define ELOOP 40
#define EPROTOTYPE 91
#define EOPNOTSUPP 95
#define EISCONN 106

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_conf);
} rw_conf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RW_MAX_RULES);
	__type(key, __u32);
	__type(value, struct rw_rule);
} rw_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RW_MAX_SERVICES + 1);
	__type(key, __u32);
	__type(value, struct rw_service);
} rw_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct rw_access_key);
	__type(value, __u8);
} rw_access SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct rw_sock);
} rw_sk SEC(".maps");

/* Connections between connect and accept: bounded, self-evicting. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rw_tuple);
	__type(value, struct rw_sock);
} rw_handoff SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} rw_events SEC(".maps");

/* ---- SipHash-2-4 over the first RW_TAGGED_LEN bytes of a record ---- */

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                               \
	do {                                                                   \
		v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);      \
		v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                         \
		v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                         \
		v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);      \
	} while (0)

static __always_inline __u64 rw_tag(const struct rw_records *r, const struct rw_conf *conf)
{
	const __u64 *m = (const __u64 *)r;
	__u64 k0 = conf->key[0], k1 = conf->key[1];
	__u64 v0 = 0x736f6d6570736575ULL ^ k0;
	__u64 v1 = 0x646f72616e646f6dULL ^ k1;
	__u64 v2 = 0x6c7967656e657261ULL ^ k0;
	__u64 v3 = 0x7465646279746573ULL ^ k1;
	__u64 b = ((__u64)RW_TAGGED_LEN) << 56;

#pragma unroll
	for (int i = 0; i < RW_TAGGED_LEN / 8; i++) {
		__u64 mi = m[i];
		v3 ^= mi;
		SIPROUND;
		SIPROUND;
		v0 ^= mi;
	}
	v3 ^= b;
	SIPROUND;
	SIPROUND;
	v0 ^= b;
	v2 ^= 0xff;
	SIPROUND;
	SIPROUND;
	SIPROUND;
	SIPROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

static __always_inline struct rw_conf *rw_get_conf(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&rw_conf, &zero);
}

static __always_inline int rw_addr_eq(const struct rw_addr *a, const struct rw_addr *b)
{
	const __u32 *x = (const __u32 *)a->addr, *y = (const __u32 *)b->addr;
	return a->family == b->family && a->port_be == b->port_be && x[0] == y[0] &&
	       x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline void rw_emit(__u32 kind, int err, const struct rw_records *rec,
				    __u16 service_id, __u16 rule_id, __u16 hop_limit)
{
	struct rw_event *e = bpf_ringbuf_reserve(&rw_events, sizeof(*e), 0);
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->err = err;
	e->flow_id = rec->flow_id;
	e->service_id = service_id;
	e->rule_id = rule_id;
	e->n_chain = rec->n_chain;
	e->proto = rec->proto;
	e->hop_limit = hop_limit;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->orig_dst = rec->orig_dst;
	__builtin_memcpy(e->chain, rec->chain, sizeof(e->chain));
	bpf_ringbuf_submit(e, 0);
}

/* ---- the rule walk ---- */

struct rw_walk {
	struct rw_addr dst;
	__u64 seen; /* bit per service id already in the chain */
	__u64 cgroup_id;
	__u32 uid;
	__u32 n_rules;
	__u8 proto;
	__u8 found;
	__u16 service_id;
	__u16 rule_id;
};

static long rw_walk_rule(__u32 i, void *data)
{
	struct rw_walk *w = data;
	struct rw_rule *r;
	struct rw_service *s;
	__u32 k = i, sid;
	const __u32 *d = (const __u32 *)w->dst.addr;
	__u16 port;

	if (i >= w->n_rules)
		return 1;
	r = bpf_map_lookup_elem(&rw_rules, &k);
	if (!r || !r->service_id)
		return 0;
	if (r->family && r->family != w->dst.family)
		return 0;
	if (r->proto && r->proto != w->proto)
		return 0;
	port = bpf_ntohs(w->dst.port_be);
	if (port < r->port_lo || port > r->port_hi)
		return 0;
	if (r->has_uid && r->uid != w->uid)
		return 0;
	if (r->has_cgroup && r->cgroup_id != w->cgroup_id)
		return 0;
	{
		const __u32 *a = (const __u32 *)r->addr, *m = (const __u32 *)r->mask;
		if ((d[0] & m[0]) != a[0] || (d[1] & m[1]) != a[1] || (d[2] & m[2]) != a[2] ||
		    (d[3] & m[3]) != a[3])
			return 0;
	}
	/* Already in the chain: REDIRECTED_BY_SELF or PREVIOUSLY_REDIRECTED_BY_SELF. */
	if (w->seen & (1ULL << (r->service_id & 63)))
		return 0;
	sid = r->service_id;
	s = bpf_map_lookup_elem(&rw_services, &sid);
	if (!s)
		return 0;
	if (w->dst.family == AF_INET ? !s->has_v4 : !s->has_v6)
		return 0;
	/* NOT_REDIRECTED or REDIRECTED_BY_OTHER: take it. */
	w->found = 1;
	w->service_id = r->service_id;
	w->rule_id = r->rule_id;
	return 1;
}

static __always_inline int rw_connect(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_conf *conf = rw_get_conf();
	struct bpf_sock *sk = ctx->sk;
	struct rw_sock *st;
	struct rw_walk w = {};
	struct rw_service *svc;
	__u32 sid;
	__u8 n = 0;
	int has_rec;

	if (!conf || !conf->n_rules || !sk)
		return 1;
	if (ctx->protocol != IPPROTO_TCP)
		return 1;

	w.dst.family = family;
	w.dst.port_be = (__u16)ctx->user_port;
	if (family == AF_INET) {
		*(__u32 *)w.dst.addr = ctx->user_ip4;
	} else {
		__u32 *d = (__u32 *)w.dst.addr;
		d[0] = ctx->user_ip6[0];
		d[1] = ctx->user_ip6[1];
		d[2] = ctx->user_ip6[2];
		d[3] = ctx->user_ip6[3];
	}

	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	has_rec = st && (st->flags & RW_F_HAS_RECORDS);
	if (has_rec) {
		if (!rw_addr_eq(&st->rec.orig_dst, &w.dst)) {
			/* Records of another flow: they may not let this socket skip proxies. */
			rw_emit(RW_EV_MISMATCH, -EINVAL, &st->rec, 0, 0, conf->hop_limit);
			bpf_set_retval(-EINVAL);
			return 0;
		}
		n = st->rec.n_chain;
#pragma unroll
		for (int i = 0; i < RW_MAX_CHAIN; i++)
			if (i < n)
				w.seen |= 1ULL << (st->rec.chain[i] & 63);
		w.uid = st->rec.uid;
		w.cgroup_id = st->rec.cgroup_id;
	} else {
		w.uid = (__u32)bpf_get_current_uid_gid();
		w.cgroup_id = bpf_get_current_cgroup_id();
	}
	w.proto = IPPROTO_TCP;
	w.n_rules = conf->n_rules;
	bpf_loop(RW_MAX_RULES, rw_walk_rule, &w, 0);

	if (!w.found) {
		if (has_rec)
			rw_emit(RW_EV_DELIVER, 0, &st->rec, 0, 0, conf->hop_limit);
		return 1;
	}
	if (!st) {
		st = bpf_sk_storage_get(&rw_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st)
			return 1; /* out of memory: fail open rather than break the app */
	}
	if (!has_rec) {
		__u64 ug = bpf_get_current_uid_gid();
		__builtin_memset(&st->rec, 0, sizeof(st->rec));
		st->rec.magic = RW_MAGIC;
		st->rec.version = RW_VERSION;
		st->rec.proto = IPPROTO_TCP;
		st->rec.flow_id = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
		st->rec.orig_dst = w.dst;
		st->rec.pid = bpf_get_current_pid_tgid() >> 32;
		st->rec.uid = (__u32)ug;
		st->rec.gid = ug >> 32;
		st->rec.cgroup_id = w.cgroup_id;
		bpf_get_current_comm(st->rec.comm, sizeof(st->rec.comm));
		st->rec.created_ns = bpf_ktime_get_boot_ns();
		n = 0;
	}
	if (n >= conf->hop_limit || n >= RW_MAX_CHAIN) {
		rw_emit(RW_EV_HOP_LIMIT, -ELOOP, &st->rec, w.service_id, w.rule_id, conf->hop_limit);
		bpf_set_retval(-ELOOP);
		return 0;
	}
	sid = w.service_id;
	svc = bpf_map_lookup_elem(&rw_services, &sid);
	if (!svc)
		return 1;

	st->rec.chain[n & (RW_MAX_CHAIN - 1)] = w.service_id;
	st->rec.n_chain = n + 1;
	st->flags |= RW_F_REDIRECTED;
	st->service_id = w.service_id;
	st->rule_id = w.rule_id;
	st->redirected_ns = bpf_ktime_get_boot_ns();

	if (family == AF_INET) {
		ctx->user_ip4 = *(__u32 *)svc->addr4;
		ctx->user_port = svc->port4_be;
	} else {
		const __u32 *a = (const __u32 *)svc->addr6;
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
		ctx->user_port = svc->port6_be;
	}
	rw_emit(RW_EV_REDIRECT, 0, &st->rec, w.service_id, w.rule_id, conf->hop_limit);
	return 1;
}

SEC("cgroup/connect4")
int rw_connect4(struct bpf_sock_addr *ctx)
{
	return rw_connect(ctx, AF_INET);
}

SEC("cgroup/connect6")
int rw_connect6(struct bpf_sock_addr *ctx)
{
	return rw_connect(ctx, AF_INET6);
}

/* ---- getpeername: the client never notices ---- */

static __always_inline int rw_peername(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_sock *st;

	if (!ctx->sk)
		return 1;
	st = bpf_sk_storage_get(&rw_sk, ctx->sk, 0, 0);
	if (!st || !(st->flags & RW_F_REDIRECTED) || st->rec.orig_dst.family != family)
		return 1;
	if (family == AF_INET) {
		ctx->user_ip4 = *(__u32 *)st->rec.orig_dst.addr;
	} else {
		const __u32 *a = (const __u32 *)st->rec.orig_dst.addr;
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	}
	ctx->user_port = st->rec.orig_dst.port_be;
	return 1;
}

SEC("cgroup/getpeername4")
int rw_getpeername4(struct bpf_sock_addr *ctx)
{
	return rw_peername(ctx, AF_INET);
}

SEC("cgroup/getpeername6")
int rw_getpeername6(struct bpf_sock_addr *ctx)
{
	return rw_peername(ctx, AF_INET6);
}

/* ---- sockops: hand the record to the accepted socket ---- */

static __always_inline void rw_tuple_of(struct bpf_sock_ops *skops, struct rw_tuple *t, int passive)
{
	__u32 *c = (__u32 *)t->caddr, *s = (__u32 *)t->saddr;
	__u16 lport = skops->local_port;
	__u16 rport = bpf_ntohl(skops->remote_port);

	t->family = skops->family;
	if (skops->family == AF_INET) {
		c[0] = passive ? skops->remote_ip4 : skops->local_ip4;
		s[0] = passive ? skops->local_ip4 : skops->remote_ip4;
	} else {
		if (passive) {
			c[0] = skops->remote_ip6[0]; c[1] = skops->remote_ip6[1];
			c[2] = skops->remote_ip6[2]; c[3] = skops->remote_ip6[3];
			s[0] = skops->local_ip6[0]; s[1] = skops->local_ip6[1];
			s[2] = skops->local_ip6[2]; s[3] = skops->local_ip6[3];
		} else {
			c[0] = skops->local_ip6[0]; c[1] = skops->local_ip6[1];
			c[2] = skops->local_ip6[2]; c[3] = skops->local_ip6[3];
			s[0] = skops->remote_ip6[0]; s[1] = skops->remote_ip6[1];
			s[2] = skops->remote_ip6[2]; s[3] = skops->remote_ip6[3];
		}
	}
	t->cport = passive ? rport : lport;
	t->sport = passive ? lport : rport;
}

SEC("sockops")
int rw_sock_ops(struct bpf_sock_ops *skops)
{
	struct rw_tuple t = {};
	struct rw_sock *st, *v;
	struct bpf_sock *sk;

	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	sk = skops->sk;
	if (!sk)
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
		if (!st || !(st->flags & RW_F_REDIRECTED))
			return 1;
		rw_tuple_of(skops, &t, 0);
		bpf_map_update_elem(&rw_handoff, &t, st, BPF_ANY);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		rw_tuple_of(skops, &t, 1);
		v = bpf_map_lookup_elem(&rw_handoff, &t);
		if (!v)
			return 1;
		st = bpf_sk_storage_get(&rw_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (st) {
			st->service_id = v->service_id;
			st->rule_id = v->rule_id;
			st->redirected_ns = v->redirected_ns;
			st->rec = v->rec;
			st->flags = RW_F_ACCEPTED;
		}
		bpf_map_delete_elem(&rw_handoff, &t);
		break;
	}
	return 1;
}

/* ---- the three control codes as private socket options ---- */

static __always_inline int rw_allowed(void)
{
	__u64 ug = bpf_get_current_uid_gid();
	struct rw_access_key k = { .kind = 0, .id = (__u32)ug };

	if (k.id == 0)
		return 1;
	if (bpf_map_lookup_elem(&rw_access, &k))
		return 1;
	k.kind = 1;
	k.id = ug >> 32;
	return bpf_map_lookup_elem(&rw_access, &k) != 0;
}

/* 0 if the socket is one rewire serves; otherwise the errno to report. */
static __always_inline int rw_check_socket(struct bpf_sock *sk)
{
	if (!sk)
		return EOPNOTSUPP;
	if (sk->family != AF_INET && sk->family != AF_INET6)
		return EOPNOTSUPP;
	if (sk->type != SOCK_STREAM || sk->protocol != IPPROTO_TCP)
		return EPROTOTYPE;
	return 0;
}

SEC("cgroup/getsockopt")
int rw_getsockopt(struct bpf_sockopt *ctx)
{
	struct rw_conf *conf;
	struct rw_sock *st;
	struct bpf_sock *sk = ctx->sk;
	void *end;
	int err;

	if (ctx->level != RW_SOL)
		return 1;
	if (!rw_allowed()) {
		ctx->retval = -EACCES;
		return 1;
	}
	err = rw_check_socket(sk);
	if (err) {
		ctx->retval = -err;
		return 1;
	}
	conf = rw_get_conf();
	if (!conf || !sk) {
		ctx->retval = -EOPNOTSUPP;
		return 1;
	}
	if (ctx->optname != RW_OPT_RECORDS && ctx->optname != RW_OPT_CONTEXT) {
		ctx->retval = -EINVAL;
		return 1;
	}
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	if (!st || !(st->flags & RW_F_ACCEPTED)) {
		ctx->retval = -ENOENT;
		return 1;
	}
	end = ctx->optval_end;

	if (ctx->optname == RW_OPT_RECORDS) {
		struct rw_records r = st->rec;
		void *p = ctx->optval;

		if (ctx->optlen < (int)sizeof(r) || p + sizeof(r) > end) {
			ctx->retval = -ENOBUFS;
			return 1;
		}
		r.tag = rw_tag(&r, conf);
		__builtin_memcpy(p, &r, sizeof(r));
		ctx->optlen = sizeof(r);
		ctx->retval = 0;
		return 1;
	} else {
		struct rw_context c = {};
		void *p = ctx->optval;

		if (ctx->optlen < (int)sizeof(c) || p + sizeof(c) > end) {
			ctx->retval = -ENOBUFS;
			return 1;
		}
		c.magic = RW_MAGIC;
		c.version = RW_VERSION;
		c.state = RW_STATE_REDIRECTED_BY_SELF;
		c.service_id = st->service_id;
		c.rule_id = st->rule_id;
		c.hop = st->rec.n_chain;
		c.redirected_ns = st->redirected_ns;
		c.records = st->rec;
		c.records.tag = rw_tag(&c.records, conf);
		__builtin_memcpy(p, &c, sizeof(c));
		ctx->optlen = sizeof(c);
		ctx->retval = 0;
		return 1;
	}
}

static __always_inline int rw_set_fail(int err)
{
	bpf_set_retval(-err);
	return 0;
}

SEC("cgroup/setsockopt")
int rw_setsockopt(struct bpf_sockopt *ctx)
{
	struct rw_records r;
	struct rw_conf *conf;
	struct rw_sock *st;
	struct bpf_sock *sk = ctx->sk;
	void *p, *end;
	int err;

	if (ctx->level != RW_SOL)
		return 1;
	if (!rw_allowed())
		return rw_set_fail(EACCES);
	err = rw_check_socket(sk);
	if (err)
		return rw_set_fail(err);
	conf = rw_get_conf();
	if (!conf || !sk)
		return rw_set_fail(EOPNOTSUPP);
	if (ctx->optname != RW_OPT_RECORDS)
		return rw_set_fail(EINVAL);
	if (sk->state != BPF_TCP_CLOSE)
		return rw_set_fail(EISCONN);
	p = ctx->optval;
	end = ctx->optval_end;
	if (ctx->optlen != (int)sizeof(r) || p + sizeof(r) > end)
		return rw_set_fail(EINVAL);
	__builtin_memcpy(&r, p, sizeof(r));
	if (r.magic != RW_MAGIC || r.version != RW_VERSION || r.n_chain == 0 ||
	    r.n_chain > RW_MAX_CHAIN || r.proto != IPPROTO_TCP)
		return rw_set_fail(EINVAL);
	if (rw_tag(&r, conf) != r.tag)
		return rw_set_fail(EINVAL);

	st = bpf_sk_storage_get(&rw_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return rw_set_fail(ENOBUFS);
	st->rec = r;
	st->flags = RW_F_HAS_RECORDS;
	st->service_id = 0;
	st->rule_id = 0;
	st->redirected_ns = 0;
	ctx->optlen = -1; /* handled here: the kernel's own setsockopt is skipped */
	return 1;
}
