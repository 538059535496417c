/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Linking an unmodified proxy's onward connect to the flow it accepted,
 * through its SO_ORIGINAL_DST query.
 *
 * API: maps rw_link, rw_link_sk; rw_live_up/rw_live_down/rw_live_one
 * (per-service count of queried sockets), rw_link_peek/rw_link_claim (the
 * connect side), rw_link_offer/rw_origdst (the query side, and the
 * SO_ORIGINAL_DST answer), rw_link_release (the socket's release).
 */
#pragma once

#include "records.h"
#include "notify.h"
#include "rules.h"
#include "service.h"
#include "sockopt.h"

/* Entries of map rw_link (user space may make it smaller for a test). */
#define RW_LINK_ENTRIES 65536

/* Accepted sockets an unmodified transparent proxy queried SO_ORIGINAL_DST
 * of and has not released yet, per (process, destination) (linking; see
 * rw_link_offer). A plain hash, not an LRU, and no age: an entry leaves only
 * when its last socket is released, so nothing (time, a flood of other
 * entries) makes it forget a flow that waits. When it is full, the socket
 * is counted in its service's link_unrecorded and nothing of that service
 * is linked until it is released. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, RW_LINK_ENTRIES);
	__type(key, struct rw_link_key);
	__type(value, struct rw_link);
} rw_link SEC(".maps");

/* An accepted socket counted by rw_link_offer: where to count it down when
 * it is released (rw_link_release). Set once, atomically: a socket is
 * counted once however often and from however many threads it is queried. */
#define RW_LINK_COUNTED (1ULL << 32)    /* in rw_link under (tgid, its destination) */
#define RW_LINK_UNRECORDED (1ULL << 33) /* in its service's link_unrecorded */
struct rw_link_sk {
	__u64 state;      /* the querying tgid (low 32 bits) | RW_LINK_COUNTED or RW_LINK_UNRECORDED */
	__u16 service_id; /* whose link_unrecorded */
	__u8 _pad[6];
	struct rw_addr dst; /* the entry's destination (the socket's records may be set anew) */
};
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct rw_link_sk);
} rw_link_sk SEC(".maps");

/* ---- linking an unmodified proxy's onward connect to its flow ----
 *
 * A proxy that does not carry records but asks SO_ORIGINAL_DST of the
 * socket it accepted (every netfilter-based transparent proxy does) counts
 * that socket as pending in an rw_link entry keyed by (its process, the
 * flow's original destination) until it releases the socket. Its
 * record-less connect to that destination continues that flow (same
 * records, flow id, origin, chain, as if it had set them) only while that
 * socket is the only queried one live in the whole service (rw_live_one)
 * and the only one ever pending in the entry: with two or more alive,
 * nobody can tell which connect belongs to which, and the connect is the
 * proxy's own new flow, until every one of them is released. A linked flow
 * stays pending: it may connect again (a second request, a retry), and a
 * flow queried meanwhile must not become "the only one". */

/* Per service, its queried sockets not released yet (rw_svc_state.link_live):
 * a connect is linked only while exactly one is live in the whole service
 * and no two were live at once since the count was last 0. The entry's key
 * (process, destination) cannot tell flows apart: a connect to another
 * flow's destination (a proxy routing by Host), or a flow handed to another
 * process (fork, SCM_RIGHTS, pidfd_getfd), would find another flow alone
 * under its key. One word, changed only by compare-and-swap, so the count
 * never goes above 1 without the ambiguity set first. */
static __always_inline void rw_live_up(struct rw_svc_state *s)
{
	__u64 old, new;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		old = s->link_live;
		new = old + 1;
		if ((__u32)old)
			new |= RW_LIVE_AMBIGUOUS;
		if (__sync_val_compare_and_swap(&s->link_live, old, new) == old)
			return;
	}
	/* Contended: ambiguous (until the count is 0 again), then counted. */
	__sync_fetch_and_or(&s->link_live, RW_LIVE_AMBIGUOUS);
	__sync_fetch_and_add(&s->link_live, 1);
}

static __always_inline void rw_live_down(struct rw_svc_state *s)
{
	__u64 old, new;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		old = s->link_live;
		if (!(__u32)old)
			return; /* counted in a state map since replaced */
		new = (__u32)old == 1 ? 0 : old - 1; /* back to 0: unambiguous again */
		if (__sync_val_compare_and_swap(&s->link_live, old, new) == old)
			return;
	}
	__sync_fetch_and_add(&s->link_live, -1); /* stays ambiguous until a later 0 */
}

/* Whether exactly one queried socket is live in service `s`, unambiguously. */
static __always_inline int rw_live_one(const struct rw_svc_state *s)
{
	return s->link_live == 1;
}

/* Whether a connect of service `sid` may be linked to entry `l`. */
static __always_inline int rw_link_usable(const struct rw_link *l, __u32 sid)
{
	return l->pending == 1 && !l->ambiguous && l->service_id == sid;
}

/* A connect of service `c->caller` to `orig` without records: if it
 * continues a flow (see above), marks `c` linked and lets the walk see that
 * flow's chain and origin. A global function (its key's stack is not added
 * to its callers'), called only on that path. Deletes nothing: an entry is
 * the memory of flows that wait. */
__attribute__((noinline)) int rw_link_peek(const struct rw_addr *orig, struct rw_choice *c, struct rw_walk *w)
{
	struct rw_link_key k = {};
	struct rw_svc_state *s;
	struct rw_link *l;
	__u32 sid;

	if (!orig || !c || !w)
		return 0;
	sid = c->caller;
	s = bpf_map_lookup_elem(&rw_svc_state, &sid);
	if (!s || s->link_unrecorded)
		return 0; /* a queried flow the table had no room for may be waiting */
	if (!rw_live_one(s))
		return 0; /* another flow of the service is (or was) waiting too */
	k.tgid = bpf_get_current_pid_tgid() >> 32;
	k.dst = *orig;
	l = bpf_map_lookup_elem(&rw_link, &k);
	if (!l || !rw_link_usable(l, sid))
		return 0;
	if (!rw_svc_quiet(sid, l->ts_ns)) {
		/* A side door was open or used since (or shortly before) the
		 * query: this connect may be for that client. */
		rw_count_svc(sid, RW_REASON_SIDE_DOOR);
		return 0;
	}
	w->seen = 0;
	c->n = rw_walk_from(w, &l->rec);
	c->depth = l->rec.depth;
	c->linked = 1;
	c->link_flow = l->rec.flow_id;
	return 1;
}

/* Copies the linked flow's records into `out` (the onward socket's); 0 if
 * the entry changed since rw_link_peek. The entry stays (see above). */
__attribute__((noinline)) int rw_link_claim(const struct rw_addr *orig, __u64 flow_id, __u32 sid, struct rw_records *out)
{
	struct rw_link_key k = {};
	struct rw_svc_state *s;
	struct rw_link *l;

	if (!orig || !out)
		return 0;
	s = bpf_map_lookup_elem(&rw_svc_state, &sid);
	if (!s || s->link_unrecorded || !rw_live_one(s))
		return 0;
	k.tgid = bpf_get_current_pid_tgid() >> 32;
	k.dst = *orig;
	l = bpf_map_lookup_elem(&rw_link, &k);
	if (!l || l->rec.flow_id != flow_id || !rw_link_usable(l, sid))
		return 0;
	*out = l->rec;
	rw_count_svc(sid, RW_REASON_LINK);
	return 1;
}

/* A TCP socket is released: if rw_link_offer counted it, it is pending no
 * more; the entry goes with its last socket. */
static __always_inline void rw_link_release(struct bpf_sock *sk)
{
	struct rw_link_key k = {};
	struct rw_svc_state *s;
	struct rw_link_sk *m;
	struct rw_link *l;
	struct rw_sock *st;
	__u32 sid;

	m = bpf_sk_storage_get(&rw_link_sk, sk, 0, 0);
	if (!m || !m->state) {
		st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
		if (st && (st->flags & RW_F_LINK_LOST)) {
			sid = st->service_id;
			s = bpf_map_lookup_elem(&rw_svc_state, &sid);
			if (s && s->link_unrecorded)
				__sync_fetch_and_add(&s->link_unrecorded, -1);
			st->flags &= ~RW_F_LINK_LOST;
		}
		return;
	}
	sid = m->service_id;
	s = bpf_map_lookup_elem(&rw_svc_state, &sid);
	if (m->state & RW_LINK_UNRECORDED) {
		if (s && s->link_unrecorded)
			__sync_fetch_and_add(&s->link_unrecorded, -1);
	} else {
		k.tgid = (__u32)m->state;
		k.dst = m->dst;
		l = bpf_map_lookup_elem(&rw_link, &k);
		/* Nobody counts an entry up from 0: the one that takes it to 0 deletes it. */
		if (l && __sync_fetch_and_add(&l->pending, -1) == 1)
			bpf_map_delete_elem(&rw_link, &k);
	}
	/* Last: until its entry is gone, the socket still counts as live, so
	 * no other flow is "the only one" while this one can still be found. */
	if (s)
		rw_live_down(s);
	m->state = 0;
}

/* ---- SO_ORIGINAL_DST for unmodified transparent proxies ----
 *
 * netfilter answers getsockopt(SOL_IP, SO_ORIGINAL_DST) with a struct
 * sockaddr_in and getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) with a struct
 * sockaddr_in6 from the connection's conntrack entry
 * (net/netfilter/nf_conntrack_proto.c, getorigdst and ipv6_getorigdst).
 * On a socket rewire redirected and a proxy accepted, this program gives
 * the same answer from the flow's record, with netfilter's errors: EINVAL
 * for a buffer shorter than the structure; ENOENT when the family asked
 * for is not the flow's (netfilter finds no conntrack entry for the tuple:
 * SOL_IP works on an IPv6 socket carrying an IPv4 flow, SOL_IPV6 does not).
 * It leaves the length as the caller gave it, as netfilter does. SOL_IPV6
 * on an IPv4 socket is refused by the kernel before netfilter
 * (EOPNOTSUPP): that answer stands. Any other socket keeps the kernel's
 * own answer (a NAT redirect's, or its error). No privilege is needed, as
 * with netfilter: the answer is about the caller's own connection. */

struct rw_sin {
	__u16 family;
	__u16 port_be;
	__u32 addr;
	__u8 zero[8];
};

struct rw_sin6 {
	__u16 family;
	__u16 port_be;
	__u32 flowinfo;
	__u8 addr[16];
	__u32 scope_id;
};

/* The querying process is the service this accepted socket belongs to:
 * count the socket as pending under (this process, the flow's destination)
 * until it is released (rw_link_release), once. An entry is never replaced
 * or deleted here, whatever its age or the service's side doors: a second
 * socket makes it ambiguous. No room: the socket is counted in the
 * service's link_unrecorded instead, which stops its links while it lasts.
 * `m`: the socket's rw_link_sk (0 if it could not be made). */
__attribute__((noinline)) int rw_link_offer(struct rw_link_sk *m, struct rw_sock *st)
{
	struct rw_link_key k = {};
	struct rw_link v = {};
	struct rw_svc_state *s;
	struct rw_link *l;
	__u64 tgid, old;
	__u32 sid;
	__u16 caller;

	if (!st)
		return 0;
	caller = rw_caller_service();
	if (!caller || caller != st->service_id)
		return 0;
	sid = caller;
	s = bpf_map_lookup_elem(&rw_svc_state, &sid);
	if (!s)
		return 0;
	if (!m) {
		/* No room for the socket's own mark: counted where nothing can
		 * push it out, until the socket is released. */
		if (!(st->flags & RW_F_LINK_LOST)) {
			st->flags |= RW_F_LINK_LOST;
			__sync_fetch_and_add(&s->link_unrecorded, 1);
		}
		return 0;
	}
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (__sync_val_compare_and_swap(&m->state, 0, tgid | RW_LINK_COUNTED) != 0)
		return 0; /* counted already */
	m->service_id = caller;
	rw_live_up(s);
	m->dst = st->rec.orig_dst;
	k.tgid = tgid;
	k.dst = st->rec.orig_dst;
	v.ts_ns = bpf_ktime_get_boot_ns();
	v.pending = 1;
	v.service_id = caller;
	v.rec = st->rec;
	if (!bpf_map_update_elem(&rw_link, &k, &v, BPF_NOEXIST))
		return 0;
	l = bpf_map_lookup_elem(&rw_link, &k);
	if (l) {
		/* Another flow pending under the key: which connect is whose
		 * cannot be told any more. Marked before it is counted, so no
		 * reader ever sees one pending and not ambiguous meanwhile. */
		l->ambiguous = 1;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			old = l->pending;
			if (!old)
				break; /* its last socket is going: the entry is being deleted */
			if (__sync_val_compare_and_swap(&l->pending, old, old + 1) == old)
				return 0;
		}
	}
	/* Full, or the entry is going away under us: count it where nothing
	 * can push it out. */
	m->state = tgid | RW_LINK_UNRECORDED;
	__sync_fetch_and_add(&s->link_unrecorded, 1);
	return 0;
}

static __always_inline int rw_origdst(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct rw_sock *st;
	void *p, *end;
	int v6;

	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	if (!st || !(st->flags & RW_F_ACCEPTED))
		return 1;
	/* Answered only where rewire serves, as the records calls are. */
	if (!rw_home_netns(ctx))
		return 1;
	v6 = ctx->level == SOL_IPV6;
	if (v6 && sk->family != AF_INET6)
		return 1;
	if (ctx->optlen < (v6 ? (int)sizeof(struct rw_sin6) : (int)sizeof(struct rw_sin))) {
		ctx->retval = -EINVAL;
		return 1;
	}
	if (st->rec.orig_dst.family != (v6 ? AF_INET6 : AF_INET)) {
		ctx->retval = -ENOENT;
		return 1;
	}
	p = ctx->optval;
	end = ctx->optval_end;
	if (v6) {
		struct rw_sin6 a = {};
		if (p + sizeof(a) > end) {
			ctx->retval = -EFAULT;
			return 1;
		}
		a.family = AF_INET6;
		a.port_be = st->rec.orig_dst.port_be;
		__builtin_memcpy(a.addr, st->rec.orig_dst.addr, 16);
		/* Link-local: the interface the application named (kept in the
		 * records), else the socket's device, as the kernel's
		 * ipv6_iface_scope_id gives it. */
		if (a.addr[0] == 0xfe && (a.addr[1] & 0xc0) == 0x80)
			a.scope_id = st->rec.orig_dst.scope_id ? st->rec.orig_dst.scope_id : sk->bound_dev_if;
		__builtin_memcpy(p, &a, sizeof(a));
		if (ctx->optlen > end - p) /* longer than the page the kernel lets us see */
			RW_READ(ctx->optlen) = sizeof(a); /* volatile: never merged with retval's store */
	} else {
		struct rw_sin a = {};
		if (p + sizeof(a) > end) {
			ctx->retval = -EFAULT;
			return 1;
		}
		a.family = AF_INET;
		a.port_be = st->rec.orig_dst.port_be;
		a.addr = *(const __u32 *)st->rec.orig_dst.addr;
		__builtin_memcpy(p, &a, sizeof(a));
		if (ctx->optlen > end - p)
			RW_READ(ctx->optlen) = sizeof(a);
	}
	ctx->retval = 0;
	rw_link_offer(bpf_sk_storage_get(&rw_link_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE), st);
	return 1;
}
