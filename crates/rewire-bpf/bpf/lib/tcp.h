/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * TCP: the connect hook's logic and the hand-off of a flow's records from the
 * connecting socket to the proxy's accepted socket (sockops).
 *
 * API: map rw_handoff; rw_tcp_connect; rw_tuple_unmap, rw_tuple_of,
 * rw_handoff_claimable, rw_svc_handed, rw_side_door, rw_handoff_watch_done
 * (sockops helpers).
 */
#pragma once

#include "decision.h"

/* Connections between connect and accept. A plain hash, not an LRU: an
 * entry leaves when the proxy accepts it or when its connecting socket
 * closes (sockops state callback), so a flood by one user cannot push out
 * another flow's entry; a full table is counted and reported. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rw_tuple);
	__type(value, struct rw_sock);
} rw_handoff SEC(".maps");

/* ---- TCP connect ---- */

static __noinline int rw_tcp_connect(struct bpf_sock_addr *ctx, __u8 family, struct rw_conf *conf)
{
	struct bpf_sock *sk = ctx->sk;
	struct rw_sock *st;
	struct rw_choice c = {};
	struct rw_addr orig;
	int has_rec, r;

	rw_ctx_dst(ctx, family, &orig);
	rw_scope_of(ctx, &orig);
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	/* A socket that was one end of an accelerated leg stays in the
	 * sockhash under that leg's key after a disconnect (connect with
	 * AF_UNSPEC: the kernel takes a socket out only when it closes),
	 * with bytes of that flow perhaps queued on it: it never connects
	 * again (review s9, R1). */
	if (st && (st->flags & RW_F_ACCEL_IN))
		return rw_refuse(EISCONN);
	has_rec = st && (st->flags & RW_F_HAS_RECORDS);
	if (st) {
		/* Every attempt starts from the records as set: a refused or
		 * failed one changes nothing the next one sees. */
		st->flags &= ~(RW_F_REDIRECTED | RW_F_SVC_CONNECT);
		if (has_rec)
			st->rec.n_chain = st->n_set;
	}
	r = rw_bind_check(st, has_rec, &orig, IPPROTO_TCP);
	if (r < 0)
		return rw_refuse(-r);
	c.proto = IPPROTO_TCP;
	c.has_rec = has_rec;
	r = rw_choose(ctx, st, &orig, &c);
	if (r < 0)
		return rw_refuse(-r);
	if (r == RW_PASS)
		return 1;
	if (r == RW_DELIVER && !c.linked) {
		if (st) {
			rw_deliver(&st->rec, conf->hop_limit);
		}
		return 1;
	}
	if (!st) {
		st = rw_storage_create(&rw_sk, sk);
		if (!st) {
			if (r == RW_DELIVER)
				return 1; /* a linked flow whose chain is complete: it goes on as it is */
			/* Nothing passes unrecorded: refuse rather than let it through. */
			rw_report(RW_REASON_NO_STORAGE, -ENOBUFS, 0, 0, &orig, IPPROTO_TCP,
				  c.w.service_id, c.w.rule_id);
			return rw_refuse(ENOBUFS);
		}
	}
	if (c.linked && !rw_link_claim(&orig, c.link_flow, c.caller, &st->rec)) {
		/* The entry changed since the decision (another flow queried):
		 * a new flow of the proxy's, as without a link. */
		c.linked = 0;
		c.n = 1;
	}
	if (r == RW_DELIVER) {
		if (c.linked) {
			rw_deliver(&st->rec, conf->hop_limit);
		}
		return 1;
	}
	if (!has_rec && !c.linked) {
		rw_new_record(&st->rec, &orig, IPPROTO_TCP, c.w.cgroup_id, c.caller);
		st->rec.depth = c.depth;
		st->rec.origin_sel = c.w.origin;
	}
	rw_append(&st->rec, c.n, c.w.service_id);
	st->flags |= RW_F_REDIRECTED;
	/* Made by a service's process: known from the walk, or (a proxy's
	 * connect with records, whose walk does not ask) asked here. */
	if (c.caller || (has_rec && rw_caller_service()))
		st->flags |= RW_F_SVC_CONNECT;
	st->service_id = c.w.service_id;
	st->rule_id = c.w.rule_id;
	st->redirected_ns = bpf_ktime_get_boot_ns();
	rw_ctx_target(ctx, family, &c.target);
	rw_notify(RW_REASON_REDIRECT, 0, &st->rec, c.w.service_id, c.w.rule_id, conf->hop_limit);
	return 1;
}

/* ---- sockops: hand the record to the accepted socket ---- */

/* An IPv6 socket's IPv4 connection has IPv4-mapped addresses on its side
 * and plain IPv4 ones on an IPv4 listener's: both sides key it as IPv4. */
static __always_inline void rw_tuple_unmap(struct rw_tuple *t)
{
	__u32 *c = (__u32 *)t->caddr, *s = (__u32 *)t->saddr;
	__u32 m = bpf_htonl(0xffff);

	if (t->family != AF_INET6 || c[0] || c[1] || c[2] != m || s[0] || s[1] || s[2] != m)
		return;
	t->family = AF_INET;
	c[0] = c[3];
	s[0] = s[3];
	c[2] = c[3] = s[2] = s[3] = 0;
}

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
	rw_tuple_unmap(t);
}

/* Whether the accepted socket `sk` may take a hand-off of service `sid`:
 * it lives in the namespace rewire serves and was accepted on a listener the
 * service's own processes bound (rw_owner, cloned from the listener) or made
 * (rw_sock_of_service: its cgroup, cloned too, is the service's now). The
 * hand-off is keyed by 4-tuple alone, and a 4-tuple is unique only within a
 * namespace: in a private one (`unshare -rn`) anybody can listen on the
 * service's address and connect from a pending flow's source port. */
static __always_inline int rw_handoff_claimable(struct bpf_sock_ops *skops, struct bpf_sock *sk, __u16 sid)
{
	struct rw_conf *conf = rw_get_conf();

	if (!conf)
		return 0;
	if (conf->netns_cookie && bpf_get_netns_cookie(skops) != conf->netns_cookie)
		return 0;
	return rw_sock_of_service(sk, sid);
}

/* A connection accepted with a hand-off: a flow of service `sid` with
 * `total` hops (its depth and chain). Raises the service's depth. */
__attribute__((noinline)) int rw_svc_handed(__u32 sid, __u32 total)
{
	struct rw_svc_state *s;
	__u32 k = sid;
	__u64 now;

	s = bpf_map_lookup_elem(&rw_svc_state, &k);
	if (!s)
		return 0;
	now = bpf_ktime_get_boot_ns();
	if (total > 255)
		total = 255;
	if (total >= s->depth || now - s->depth_ns > RW_SIDE_DOOR_QUIET_NS) {
		s->depth = total;
		s->depth_ns = now;
	}
	return 0;
}

/* A connecting socket's state callbacks (BPF_SOCK_OPS_STATE_CB, enabled at
 * its connect) serve only to delete its hand-off if it closes unaccepted.
 * Once the proxy's socket has claimed the entry (or it is not this
 * socket's any more), they are switched off for the socket's remaining
 * changes (FIN_WAIT*, CLOSE...): each one would run this program for
 * nothing. Not at ESTABLISHED: the claim comes when the client's last
 * handshake segment reaches the proxy, after that change. An accepted
 * socket's callbacks (a side door's count) are left alone. */
static __always_inline void rw_handoff_watch_done(struct bpf_sock_ops *skops, struct bpf_sock *sk)
{
	struct rw_tuple t = {};
	struct rw_sock *st, *v;

	if (skops->args[1] == BPF_TCP_ESTABLISHED)
		return;
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	if (!st || !(st->flags & RW_F_REDIRECTED))
		return;
	rw_tuple_of(skops, &t, 0);
	v = bpf_map_lookup_elem(&rw_handoff, &t);
	if (v && v->cookie == st->cookie)
		return; /* still waiting for the proxy: watched until it closes */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* A side door opens (`open`, on a connection accepted without a hand-off
 * on a socket a service's process bound) or closes: counted in the
 * service's rw_svc_state until the connection closes. */
static __always_inline void rw_side_door(struct bpf_sock_ops *skops, struct bpf_sock *sk, int open)
{
	struct rw_svc_state *s;
	struct rw_svc_sock *o;
	__u32 k;

	o = bpf_sk_storage_get(&rw_svc_sock, sk, 0, 0);
	if (!o && open) {
		/* Accepted on a listener made in a service's cgroup (such a
		 * socket carries no mark, see rw_svc_sock_mark; or made before
		 * the daemon wrote its unit's new cgroup id): the connection has
		 * the listener's cgroup, asked now. */
		k = rw_sk_made_by_service(sk);
		if (!k)
			return;
		o = rw_storage_create(&rw_svc_sock, sk);
		if (!o) {
			/* No room to remember it: counted open for good (the
			 * service is never quiet again while this state lasts),
			 * never unseen. */
			s = bpf_map_lookup_elem(&rw_svc_state, &k);
			if (s) {
				__sync_fetch_and_add(&s->side_open, 1);
				s->side_ns = bpf_ktime_get_boot_ns();
			}
			return;
		}
		o->service_id = k;
	}
	if (!o || !o->service_id || o->side_door == open)
		return;
	k = o->service_id;
	s = bpf_map_lookup_elem(&rw_svc_state, &k);
	if (!s)
		return;
	if (open) {
		__sync_fetch_and_add(&s->side_open, 1);
		/* Watch it: the count goes down when it closes. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	} else if (s->side_open) {
		__sync_fetch_and_add(&s->side_open, -1);
	}
	o->side_door = open;
	s->side_ns = bpf_ktime_get_boot_ns();
}
