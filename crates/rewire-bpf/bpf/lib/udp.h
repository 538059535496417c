/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * UDP flows: connect and every unconnected send routed per flow (up to
 * RW_UDP_SLOTS flows a socket), replies shown as from the original server,
 * the hand-off to the proxy's connected flow socket, closes published.
 *
 * API: maps rw_udp_sk, rw_udp_handoff, rw_udp_gone, rw_udp_rate;
 * rw_udp_receiver, rw_udp_owned, rw_udp_tuple, rw_udp_port_taken,
 * rw_slot_live, rw_udp_forget, rw_udp_rate_ok, rw_udp_live, rw_udp_forget_idle,
 * rw_udp_scan, rw_udp_pick_port (rw_udp_route's loops, global functions
 * for the verifier), rw_udp_route (the send and
 * connect logic), rw_slot_of_target, rw_udp_handoff_put, rw_recvmsg,
 * rw_udp_gone_mark, rw_udp_claim (RW_OPT_* on a proxy's flow socket).
 */
#pragma once

#include "decision.h"
#include "broadcast.h"

/* UDP flows between the proxy's listener and its connected socket. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct rw_tuple);
	__type(value, struct rw_udp_handoff);
} rw_udp_handoff SEC(".maps");

/* UDP flows whose sending socket has closed (key: flow id, value: when,
 * CLOCK_BOOTTIME): marked by cgroup/sock_release, read by the proxy's
 * RW_OPT_UDP_PEER query on its flow socket, so a proxy ends the flow at once
 * instead of keeping its sockets for udp_idle_ms (a user who opens and
 * closes thousands of sockets would otherwise hold thousands of proxy
 * descriptors and ephemeral ports). An LRU: under a flood of closes the
 * oldest marks go first, and their flows end by idleness as before. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} rw_udp_gone SEC(".maps");

/* New UDP flows per user (key: uid; value: the GCRA's theoretical arrival
 * time, CLOCK_BOOTTIME): a user who starts flows faster than
 * rw_conf.udp_flows_per_user a second (beyond a burst of two seconds' worth)
 * is refused with EAGAIN, so one user's burst cannot fill a proxy's listener
 * queue ahead of everyone else's flows. An LRU: a user evicted starts with a
 * full burst again. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u64);
} rw_udp_rate SEC(".maps");

/* The UDP socket a datagram from `from` to `to` would reach (a reference the
 * caller releases), or NULL. */
static __always_inline struct bpf_sock *rw_udp_receiver(void *ctx, const struct rw_addr *from, const struct rw_addr *to)
{
	struct bpf_sock_tuple t;
	__u32 len = rw_sk_tuple(&t, from, to);

	return bpf_sk_lookup_udp(ctx, &t, len, BPF_F_CURRENT_NETNS, 0);
}

/* Whether the socket a datagram from `client` to `server` would reach is a
 * connected one: a proxy's flow socket owns that (source, service port). */
static __always_inline int rw_udp_owned(void *ctx, const struct rw_addr *client, const struct rw_addr *server)
{
	struct bpf_sock *s = rw_udp_receiver(ctx, client, server);
	int owned;

	if (!s)
		return 0;
	/* Connected to this very source (not a flow socket of another client
	 * that a lookup of the reuseport group returned). */
	owned = rw_sock_peer_is(s, client);
	bpf_sk_release(s);
	return owned;
}

static __always_inline void rw_udp_tuple(struct rw_tuple *t, const struct rw_addr *client, const struct rw_addr *server)
{
	__builtin_memset(t, 0, sizeof(*t));
	t->family = client->family;
	t->cport = bpf_ntohs(client->port_be);
	t->sport = bpf_ntohs(server->port_be);
	__builtin_memcpy(t->caddr, client->addr, 16);
	__builtin_memcpy(t->saddr, server->addr, 16);
}

/* Whether service port `target` is still owned by a flow of this socket's
 * address (`local`; for an unbound socket or a wildcard address, the flow's
 * source is the service's own address): a proxy flow socket connected to
 * it, or a published flow not claimed yet. A global function: its lookup's
 * stack is not added to its callers'. */
__attribute__((noinline)) int rw_udp_port_taken(struct bpf_sock_addr *ctx, const struct rw_addr *local,
						const struct rw_addr *target, __u32 unbound)
{
	struct rw_addr client;
	struct rw_tuple key;

	if (!ctx || !local || !target)
		return 0;
	client = unbound || rw_addr_is_any(local) ? *target : *local;
	client.port_be = local->port_be;
	/* A flow of this source published there and not claimed yet (a
	 * socket that reconnects before the proxy took its first flow, or a
	 * closed sender's flow on a port now someone else's): its datagrams
	 * carry that flow's mark, a new flow's would be dropped on arrival. */
	rw_udp_tuple(&key, &client, target);
	if (bpf_map_lookup_elem(&rw_udp_handoff, &key))
		return 1;
	return rw_udp_owned(ctx, &client, target);
}

/* ---- UDP: connect and every unconnected send ----
 *
 * A UDP flow is (socket, original destination). Its slot in the socket's
 * rw_udp_sk storage makes the flow sticky (every datagram to the original
 * destination goes to the same service port without a new rule walk) and
 * lets the reply path and getpeername show the original destination.
 * Nothing marks a datagram with its flow, so the pair (socket address,
 * service address) must name one flow: the live flows of one socket through
 * one service each get their own port of the service's UDP port range
 * (base .. base + udp_ports - 1). When all are taken, a further destination
 * is refused with EADDRINUSE rather than being confused with another flow. */

static __always_inline int rw_slot_live(const struct rw_udp_slot *sl, __u64 now, const struct rw_conf *conf)
{
	return sl->rec.magic == RW_MAGIC && now - sl->last_ns < conf->udp_idle_ns;
}

static __always_inline void rw_udp_forget(struct rw_udp_sock *u, int keep)
{
#pragma unroll
	for (int i = 0; i < RW_UDP_SLOTS; i++)
		if (i != keep)
			u->slot[i].rec.magic = 0;
}

/* Whether `uid` may start one more UDP flow now (at most `per_sec` a second,
 * bursts of two seconds' worth; 0: no limit). Approximate across CPUs: two
 * flows started at once may both see the same arrival time. */
__attribute__((noinline)) int rw_udp_rate_ok(__u32 uid, __u32 per_sec)
{
	__u64 now = bpf_ktime_get_boot_ns(), cost, tat, *p;

	if (!per_sec)
		return 1;
	cost = 1000000000ULL / per_sec;
	p = bpf_map_lookup_elem(&rw_udp_rate, &uid);
	if (!p) {
		tat = now + cost;
		bpf_map_update_elem(&rw_udp_rate, &uid, &tat, BPF_ANY);
		return 1;
	}
	tat = *p > now ? *p : now;
	if (tat - now > 2000000000ULL)
		return 0;
	*p = tat + cost;
	return 1;
}

/* The live slot of `u` whose flow goes to `orig`, or -1. A global
 * function, as rw_udp_scan. */
__attribute__((noinline)) int rw_udp_live(struct rw_udp_sock *u, const struct rw_addr *orig, __u64 now, __u64 idle_ns)
{
	if (!u || !orig)
		return -1;
#pragma unroll
	for (int i = 0; i < RW_UDP_SLOTS; i++) {
		struct rw_udp_slot *sl = &u->slot[i];
		if (sl->rec.magic == RW_MAGIC && now - sl->last_ns < idle_ns && rw_addr_eq(&sl->rec.orig_dst, orig))
			return i;
	}
	return -1;
}

/* Forgets the idle flows of `u` other than slot `keep` whose service port
 * is `target` or whose destination is `orig`, so a late reply can only be
 * matched to the new flow. A global function, as rw_udp_scan. */
__attribute__((noinline)) int rw_udp_forget_idle(struct rw_udp_sock *u, int keep, const struct rw_addr *target,
						 const struct rw_addr *orig, __u64 now)
{
	struct rw_conf *conf = rw_get_conf();
	__u64 idle_ns;

	if (!u || !target || !orig || !conf)
		return 0;
	idle_ns = conf->udp_idle_ns;
#pragma unroll
	for (int i = 0; i < RW_UDP_SLOTS; i++) {
		struct rw_udp_slot *sl = &u->slot[i];
		if (i != keep && sl->rec.magic == RW_MAGIC && !(now - sl->last_ns < idle_ns) &&
		    (rw_addr_eq(&sl->target, target) || rw_addr_eq(&sl->rec.orig_dst, orig)))
			sl->rec.magic = 0;
	}
	return 0;
}

/* The slots of socket `u` at a new flow: the first free one (at connect
 * every slot is, if the connect succeeds), and which ports of the chosen
 * service (`want`: its id in bits 0-15, its base port in bits 16-31; 0 when
 * not redirected) its live flows use. Returns (free + 1) | used << 8; free
 * + 1 == 0: none. A global function: verified once, its result one
 * unknown value to its callers. Inline, each slot's outcome was a path of
 * its own through the rest of rw_udp_route, and which slot was free a
 * value the verifier kept apart (it indexes the slot), so sendmsg4 and
 * sendmsg6 took 195k and 297k verified instructions (88 % of the object's,
 * about 2.8 s of the daemon's start); with this and the three functions
 * beside it, 29k and 32k. */
__attribute__((noinline)) int rw_udp_scan(struct rw_udp_sock *u, __u64 now, __u64 idle_ns, int is_connect, __u32 want)
{
	__u32 used = 0, sid = want & 0xffff;
	__u16 base = want >> 16;
	int free = -1;

	if (!u)
		return 0;
#pragma unroll
	for (int i = 0; i < RW_UDP_SLOTS; i++) {
		struct rw_udp_slot *sl = &u->slot[i];
		/* At connect, earlier flows end (if it succeeds; see below). */
		if (is_connect || !(sl->rec.magic == RW_MAGIC && now - sl->last_ns < idle_ns)) {
			if (free < 0)
				free = i;
			continue;
		}
		if (sid && sl->service_id == sid) {
			__u16 k = bpf_ntohs(sl->target.port_be) - base;
			if (k < RW_MAX_UDP_PORTS)
				used |= 1u << k;
		}
	}
	return (free + 1) | used << 8;
}

/* The first port of the service's range (`opts`: base port in bits 0-15,
 * the range's length in bits 16-31, bit 32: the source is known, bit 33:
 * the socket is unbound) that no live flow of this socket (`used`) and no
 * earlier flow of its source (rw_udp_port_taken) holds; -1: none. Leaves
 * `target`'s port at the last one tried. A global function, as rw_udp_scan. */
__attribute__((noinline)) int rw_udp_pick_port(struct bpf_sock_addr *ctx, const struct rw_addr *local, struct rw_addr *target,
					       __u32 used, __u64 opts)
{
	__u16 base = opts & 0xffff, nports = (opts >> 16) & 0xffff;
	__u32 known = (opts >> 32) & 1, unbound = (opts >> 33) & 1;
	int k = -1;

	if (!ctx || !local || !target)
		return -1;
#pragma unroll
	for (int i = 0; i < RW_MAX_UDP_PORTS; i++) {
		if (k >= 0 || i >= nports || (used & (1u << i)))
			continue;
		/* A proxy flow socket still connected to this source on this
		 * port (an earlier flow of a socket that reconnected or closed,
		 * whose proxy has not expired it yet) owns it. */
		target->port_be = bpf_htons(base + i);
		if (known && rw_udp_port_taken(ctx, local, target, unbound))
			continue;
		k = i;
	}
	return k;
}

static __noinline int rw_udp_route(struct bpf_sock_addr *ctx, __u8 family, int is_connect,
				   struct rw_conf *conf)
{
	struct bpf_sock *sk = ctx->sk;
	struct rw_sock *st;
	struct rw_udp_sock *u;
	struct rw_udp_slot *sl;
	struct rw_choice c = {};
	struct rw_addr orig, local;
	__u64 now = bpf_ktime_get_boot_ns();
	int has_rec, free = -1, r;
	__u32 used = 0; /* ports of the service's range this socket's live flows use */
	__u16 base = 0;
	int unbound, r2;

	rw_ctx_dst(ctx, family, &orig);
	rw_scope_of(ctx, &orig);
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	has_rec = st && (st->flags & RW_F_HAS_RECORDS);
	r = rw_bind_check(st, has_rec, &orig, IPPROTO_UDP);
	if (r < 0)
		return rw_refuse(-r);
	/* An unbound socket's datagrams get a fixed source (the service's own
	 * address), so the proxy's view of the flow, (source, service), is
	 * known here and stays the same for every datagram. */
	rw_sock_local(sk, family, &local);
	unbound = !is_connect && rw_addr_is_any(&local);
	if (rw_v4mapped(&local))
		rw_unmap(&local);
	u = bpf_sk_storage_get(&rw_udp_sk, sk, 0, 0);
	if (u && !is_connect) {
		/* Live flow: same service port as before, no rule walk. (An idle
		 * one is over: its next datagram starts a new flow.) */
		int i = rw_udp_live(u, &orig, now, conf->udp_idle_ns);

		if (i >= 0) {
			sl = &u->slot[i & (RW_UDP_SLOTS - 1)];
			sl->last_ns = now;
			if (sl->service_id) {
				rw_ctx_target(ctx, family, &sl->target);
				if (unbound)
					rw_ctx_set_src(ctx, family, &sl->target);
			}
			return 1;
		}
	}

	/* To many receivers at once: refused, or passed as sent. (After the
	 * live flows: a slot is never made for such a destination.) */
	r = rw_fanout(st, &orig, has_rec);
	if (r < 0)
		return rw_refuse(-r);
	if (r > 0) {
		if (u && is_connect)
			rw_udp_forget(u, -1); /* one peer per connected socket */
		return 1;
	}

	c.proto = IPPROTO_UDP;
	c.has_rec = has_rec;
	r = rw_choose(ctx, st, &orig, &c);
	if (r < 0)
		return rw_refuse(-r);
	if (r == RW_PASS) {
		/* Not ours: no state, no event; a socket connecting elsewhere
		 * leaves its earlier flow (one peer per connected socket). */
		if (u && is_connect)
			rw_udp_forget(u, -1);
		return 1;
	}
	if (r == RW_REDIRECT)
		base = bpf_ntohs(c.target.port_be);
	else
		c.target = orig; /* records delivered: remember it so we report once */

	if (!u) {
		u = rw_storage_create(&rw_udp_sk, sk);
		if (!u) {
			rw_report(RW_REASON_NO_STORAGE, -ENOBUFS, st, has_rec, &orig, IPPROTO_UDP,
				  c.w.service_id, c.w.rule_id);
			return rw_refuse(ENOBUFS);
		}
	}
	r2 = rw_udp_scan(u, now, conf->udp_idle_ns, is_connect, r == RW_REDIRECT ? c.w.service_id | (__u32)base << 16 : 0);
	free = (r2 & 0xff) - 1;
	used = r2 >> 8;
	/* A new flow an application starts (not one a proxy continues with
	 * its records): within its user's rate. */
	if (r == RW_REDIRECT && !has_rec && !rw_udp_rate_ok((__u32)bpf_get_current_uid_gid(), conf->udp_flows_per_user)) {
		rw_count_svc(c.w.service_id, RW_REASON_UDP_RATE);
		return rw_refuse(EAGAIN);
	}
	if (r == RW_REDIRECT) {
		/* The source the proxy will see is known now for an unconnected
		 * send, or a bound socket's connect (a wildcard address is then
		 * routed; for a loopback service that is the service's). */
		int known = !is_connect || local.port_be;
		int k = rw_udp_pick_port(ctx, &local, &c.target, used,
					 (__u64)base | (__u64)c.nports << 16 | (__u64)!!known << 32 | (__u64)!!unbound << 33);

		if (k < 0) {
			/* Every port of the service carries a live flow of this socket. */
			rw_report(RW_REASON_UDP_CONFLICT, -EADDRINUSE, st, has_rec, &orig,
				  IPPROTO_UDP, c.w.service_id, c.w.rule_id);
			return rw_refuse(EADDRINUSE);
		}
		c.target.port_be = bpf_htons(base + k);
		/* The first port was checked by rw_choose; the others too. */
		if (k && rw_owner_of(ctx, IPPROTO_UDP, &c.target, c.w.service_id) != RW_OWNER_SERVICE) {
			rw_report(RW_REASON_IMPOSTOR, -ECONNREFUSED, st, has_rec, &orig, IPPROTO_UDP,
				  c.w.service_id, c.w.rule_id);
			return rw_refuse(ECONNREFUSED);
		}
	}
	if (free < 0) {
		rw_report(RW_REASON_UDP_CONFLICT, -ENOBUFS, st, has_rec, &orig, IPPROTO_UDP,
			  c.w.service_id, c.w.rule_id);
		return rw_refuse(ENOBUFS);
	}
	/* Forget the flows this one replaces: a connected socket's earlier one;
	 * idle ones with the same destination or service port, so a late reply
	 * can only be matched to this flow. */
	if (is_connect) {
		rw_udp_forget(u, free);
	} else {
		rw_udp_forget_idle(u, free, &c.target, &orig, now);
	}
	sl = &u->slot[free & (RW_UDP_SLOTS - 1)];
	if (has_rec && st)
		sl->rec = st->rec;
	else {
		rw_new_record(&sl->rec, &orig, IPPROTO_UDP, c.w.cgroup_id, c.caller);
		sl->rec.depth = c.depth;
		sl->rec.origin_sel = c.w.origin;
	}
	sl->target = c.target;
	__builtin_memset(&sl->src, 0, sizeof(sl->src));
	sl->published = 0;
	sl->mark = bpf_get_prandom_u32() | 1;
	sl->last_ns = now;
	sl->redirected_ns = now;
	sl->service_id = r == RW_REDIRECT ? c.w.service_id : 0;
	sl->rule_id = c.w.rule_id;
	if (r == RW_DELIVER) {
		rw_deliver(&sl->rec, conf->hop_limit);
		return 1;
	}
	rw_append(&sl->rec, c.n, c.w.service_id);
	rw_ctx_target(ctx, family, &c.target);
	if (!is_connect) {
		/* The flow's source as the proxy will see it, kept for sock_release. */
		sl->src = unbound ? c.target : local;
		sl->src.port_be = local.port_be;
		if (unbound)
			rw_ctx_set_src(ctx, family, &c.target);
	}
	rw_notify(RW_REASON_REDIRECT, 0, &sl->rec, c.w.service_id, c.w.rule_id, conf->hop_limit);
	return 1;
}

/* ---- UDP receive: replies look like the original server; listeners publish ---- */

/* The slot of `u` whose service sent a datagram from `src`. */
static __always_inline struct rw_udp_slot *rw_slot_of_target(struct rw_udp_sock *u, const struct rw_addr *src)
{
#pragma unroll
	for (int i = 0; i < RW_UDP_SLOTS; i++) {
		struct rw_udp_slot *sl = &u->slot[i];
		if (sl->rec.magic == RW_MAGIC && sl->service_id && rw_addr_eq(&sl->target, src))
			return sl;
	}
	return 0;
}

/* Publishes slot `sl`'s flow for the proxy's claim, unless an entry is
 * there already: an entry is never replaced (the datagrams that reach the
 * proxy from that source were checked against the entry's mark on arrival;
 * another flow's records must not take its place). With `want` (the mark a
 * datagram's mark proved), only that flow: the slot may be rewritten
 * meanwhile by its socket's own hooks (a new flow), so the mark is read
 * before and after the copy. A global function: its value's stack (168
 * bytes) is not added to its callers' (cgroup_skb/ingress is near the
 * verifier's 512-byte limit). */
__attribute__((noinline)) int rw_udp_handoff_put(const struct rw_tuple *key, struct rw_udp_slot *sl, __u32 want)
{
	struct rw_udp_handoff v = {};

	if (!key || !sl)
		return 0;
	v.s.mark = *(volatile __u32 *)&sl->mark;
	asm volatile("" ::: "memory");
	v.s.flags = RW_F_ACCEPTED;
	v.s.service_id = sl->service_id;
	v.s.rule_id = sl->rule_id;
	v.s.redirected_ns = sl->redirected_ns;
	v.s.rec = sl->rec;
	asm volatile("" ::: "memory");
	if (want && (v.s.mark != want || *(volatile __u32 *)&sl->mark != want))
		return 0;
	v.published_ns = bpf_ktime_get_boot_ns();
	sl->published = 1;
	bpf_map_update_elem(&rw_udp_handoff, key, &v, BPF_NOEXIST);
	return 0;
}

static __always_inline int rw_recvmsg(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_conf *conf = rw_get_conf();
	struct bpf_sock *sk = ctx->sk;
	struct rw_udp_sock *u;
	struct rw_udp_slot *sl;
	struct rw_addr key;

	if (!conf || !conf->n_rules || !sk)
		return 1;
	/* An application's reply: shown from the original destination. (A
	 * service's socket publishes nothing here: its flows are published
	 * when their datagrams arrive, see cgroup_skb/ingress.) */
	u = bpf_sk_storage_get(&rw_udp_sk, sk, 0, 0);
	if (u) {
		/* A dual-stack IPv6 socket's IPv4 flows: their replies come
		 * here as ::ffff:a.b.c.d and are shown the same way. */
		rw_ctx_dst(ctx, family, &key);
		sl = rw_slot_of_target(u, &key);
		if (sl) {
			sl->last_ns = bpf_ktime_get_boot_ns();
			rw_ctx_target(ctx, family, &sl->rec.orig_dst);
		}
	}
	return 1;
}

/* ---- a UDP socket closing: publish what no proxy has read yet ----
 *
 * A sender may close its socket before the proxy's listener reads the
 * datagram (a fire-and-forget sender); the listener could then no longer find
 * the socket, so the flows it never published are published now. This
 * program may not read the socket's own address, so it uses the source the
 * sendmsg hook recorded: unconnected sockets only. (A connected socket's
 * port does not exist yet when its connect hook runs.) */

/* The flow `flow_id` of a closing socket is over: its proxies (each hop's
 * flow socket carries the same flow id) learn it with RW_OPT_UDP_PEER. */
__attribute__((noinline)) int rw_udp_gone_mark(__u64 flow_id)
{
	__u64 now = bpf_ktime_get_boot_ns();

	bpf_map_update_elem(&rw_udp_gone, &flow_id, &now, BPF_ANY);
	return 0;
}

/* The flow of a proxy's UDP socket connected to a datagram's source: claim
 * the published hand-off into the socket's own storage (freed with it). */
static __always_inline struct rw_sock *rw_udp_claim(struct bpf_sock *sk, int *err)
{
	struct rw_udp_handoff *v;
	struct rw_addr client, server;
	struct rw_tuple key;
	struct rw_sock *st;
	__u8 family = sk->family;

	if (sk->state != BPF_TCP_ESTABLISHED) {
		*err = ENOTCONN;
		return 0;
	}
	rw_sock_local(sk, family, &server);
	rw_sock_peer(sk, family, &client);
	rw_udp_tuple(&key, &client, &server);
	v = bpf_map_lookup_elem(&rw_udp_handoff, &key);
	if (!v) {
		*err = ENOENT;
		return 0;
	}
	if (!rw_sock_marked_of_service(sk, v->s.service_id)) {
		*err = ENOENT; /* not the service's own socket: no flow of its */
		return 0;
	}
	st = bpf_sk_storage_get(&rw_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		*err = ENOBUFS;
		return 0;
	}
	*st = v->s;
	st->flags = RW_F_ACCEPTED;
	bpf_map_delete_elem(&rw_udp_handoff, &key);
	return st;
}
