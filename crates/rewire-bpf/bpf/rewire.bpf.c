// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * rewire kernel programs: WFP-style connection redirect with redirect
 * records, attached to a cgroup that rewire created.
 *
 *   cgroup/connect4,6     walk the rules in configured order, redirect to the
 *                         first matching service not yet in the flow's chain
 *                         (TCP, and connected UDP)
 *   cgroup/sendmsg4,6     the same per datagram of unconnected UDP sockets
 *   cgroup/recvmsg4,6     UDP replies are shown as coming from the original
 *                         destination; a service's listener receiving a
 *                         redirected datagram publishes the flow's record
 *                         for the proxy to claim
 *   cgroup/sock_release   a UDP socket closing before the proxy read its
 *                         datagrams publishes its flows itself
 *   sockops               hand the flow record from the client socket to the
 *                         proxy's accepted socket (keyed by the 4-tuple)
 *   cgroup/getpeername4,6 the client sees its original destination
 *   cgroup/getsockopt     RW_SOL/RW_OPT_RECORDS, RW_OPT_CONTEXT: the queries;
 *                         RW_OPT_UDP_PEER: has a UDP flow's sender closed;
 *                         SO_ORIGINAL_DST on a redirected accepted socket, as
 *                         netfilter answers it, for unmodified proxies (and
 *                         the link of their onward connect to the flow)
 *   cgroup/setsockopt     RW_SOL/RW_OPT_RECORDS: the set call; RW_OPT_ACCEL: a
 *                         service opts its sockets in to accelerated legs
 *   sk_msg                the accelerated leg between two proxies (lib/accel.h),
 *                         attached to the sockhash rw_accel, not to the cgroup
 *
 * All per-flow state lives in socket-local storage, which the kernel frees
 * with the socket; the only shared tables (the TCP and UDP hand-offs) are
 * LRU hashes whose entries are deleted when claimed, so nothing grows
 * without bound. A UDP socket holds at most RW_UDP_SLOTS live flows; a flow
 * idle for `udp_idle_ns` frees its slot. Blobs handed to user space carry a SipHash
 * MAC under a per-load random key: user space cannot forge or edit them.
 *
 * This file holds the entry points (the SEC programs) only; their logic
 * lives in lib/, one header per concern, each opening with what it offers:
 *   lib/common.h     kernel constants, the configuration, refusal, storage
 *   lib/addr.h       addresses of contexts and sockets, scope ids
 *   lib/records.h    per-socket state, the records' MAC, new records
 *   lib/notify.h     events and counters, rw_report
 *   lib/select.h     origin selectors: cgroup path prefix, executable
 *   lib/rules.h      the rule walk and the choice it feeds
 *   lib/service.h    services, their identity, own sockets, side doors
 *   lib/sockopt.h    who may use the private socket options
 *   lib/link.h       linking an unmodified proxy's onward connect; SO_ORIGINAL_DST
 *   lib/decision.h   rw_choose, the decision shared by TCP and UDP
 *   lib/broadcast.h  broadcast and multicast sends
 *   lib/tcp.h        the TCP connect and the sockops hand-off
 *   lib/udp.h        UDP flows, replies, hand-off, closes
 *   lib/mark.h       packets: the UDP flow mark, who may receive
 *   lib/accel.h      accelerated legs between proxies (sockhash, sk_msg)
 * Still one object: every program shares the maps.
 */

#include "lib/common.h"
#include "lib/addr.h"
#include "lib/records.h"
#include "lib/notify.h"
#include "lib/select.h"
#include "lib/rules.h"
#include "lib/service.h"
#include "lib/sockopt.h"
#include "lib/link.h"
#include "lib/decision.h"
#include "lib/broadcast.h"
#include "lib/tcp.h"
#include "lib/udp.h"
#include "lib/mark.h"
#include "lib/accel.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

static __always_inline int rw_connect(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_conf *conf = rw_get_conf();

	if (!conf || !ctx->sk)
		return 1;
	if (!conf->n_rules) {
		/* No rule: nothing to redirect, but an accelerated leg's end
		 * still never connects again (lib/tcp.h). */
		struct rw_sock *st = ctx->protocol == IPPROTO_TCP ? bpf_sk_storage_get(&rw_sk, ctx->sk, 0, 0) : 0;

		return st && (st->flags & RW_F_ACCEL_IN) ? rw_refuse(EISCONN) : 1;
	}
	if (ctx->protocol == IPPROTO_TCP)
		return rw_tcp_connect(ctx, family, conf);
	if (ctx->protocol == IPPROTO_UDP)
		return rw_udp_route(ctx, family, 1, conf);
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

static __always_inline int rw_sendmsg(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_conf *conf = rw_get_conf();

	if (!conf || !conf->n_rules || !ctx->sk || ctx->protocol != IPPROTO_UDP)
		return 1;
	return rw_udp_route(ctx, family, 0, conf);
}

SEC("cgroup/sendmsg4")
int rw_sendmsg4(struct bpf_sock_addr *ctx)
{
	return rw_sendmsg(ctx, AF_INET);
}

SEC("cgroup/sendmsg6")
int rw_sendmsg6(struct bpf_sock_addr *ctx)
{
	return rw_sendmsg(ctx, AF_INET6);
}

SEC("cgroup/recvmsg4")
int rw_recvmsg4(struct bpf_sock_addr *ctx)
{
	return rw_recvmsg(ctx, AF_INET);
}

SEC("cgroup/recvmsg6")
int rw_recvmsg6(struct bpf_sock_addr *ctx)
{
	return rw_recvmsg(ctx, AF_INET6);
}

SEC("cgroup/sock_release")
int rw_sock_release(struct bpf_sock *sk)
{
	struct rw_udp_sock *u;
	struct rw_tuple key;
	__u8 family = sk->family;

	if (family != AF_INET && family != AF_INET6)
		return 1;
	if (sk->protocol == IPPROTO_TCP) {
		rw_link_release(sk);
		return 1;
	}
	if (sk->protocol != IPPROTO_UDP)
		return 1;
	u = bpf_sk_storage_get(&rw_udp_sk, sk, 0, 0);
	if (!u)
		return 1;
#pragma unroll
	for (int i = 0; i < RW_UDP_SLOTS; i++) {
		struct rw_udp_slot *sl = &u->slot[i];
		if (sl->rec.magic != RW_MAGIC || !sl->service_id)
			continue;
		rw_udp_gone_mark(sl->rec.flow_id);
		if (sl->published || !sl->src.family)
			continue;
		rw_udp_tuple(&key, &sl->src, &sl->target);
		rw_udp_handoff_put(&key, sl, 0);
	}
	return 1;
}

/* ---- getpeername: the client never notices ---- */

static __always_inline int rw_peername(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_sock *st;
	struct rw_udp_sock *u;
	struct rw_udp_slot *sl;
	struct rw_addr peer;

	if (!ctx->sk)
		return 1;
	st = bpf_sk_storage_get(&rw_sk, ctx->sk, 0, 0);
	if (st && (st->flags & RW_F_REDIRECTED)) {
		/* An IPv6 socket's IPv4 flow shows its destination mapped. */
		rw_ctx_target(ctx, family, &st->rec.orig_dst);
		return 1;
	}
	u = bpf_sk_storage_get(&rw_udp_sk, ctx->sk, 0, 0);
	if (!u)
		return 1;
	rw_ctx_dst(ctx, family, &peer);
	sl = rw_slot_of_target(u, &peer);
	if (sl)
		rw_ctx_target(ctx, family, &sl->rec.orig_dst);
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

SEC("sockops")
int rw_sock_ops(struct bpf_sock_ops *skops)
{
	struct rw_tuple t = {};
	struct rw_sock *st, *v;
	struct rw_conf *conf;
	struct bpf_sock *sk;
	__u32 from_accel;
	__u64 peer_cookie;

	/* Every TCP socket of the subtree runs this program at a fixed set of
	 * points whatever its flags (RTO and window init, ECN, connect, active
	 * and passive establishment): the three used here are told apart
	 * first, the others return at once. */
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_STATE_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		break;
	default:
		return 1;
	}
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
		st->cookie = bpf_get_socket_cookie(skops);
		st->flags = (st->flags & ~RW_F_ACCEL) | ((st->flags & RW_F_SVC_CONNECT) ? rw_accel_flag(sk) : 0);
		if (bpf_map_update_elem(&rw_handoff, &t, st, BPF_NOEXIST)) {
			/* Full (or a stale twin): the proxy will find no records
			 * and refuse the connection; never a misattributed flow. */
			conf = rw_get_conf();
			rw_notify(RW_REASON_HANDOFF_FULL, -ENOBUFS, conf ? &st->rec : 0, st->service_id, st->rule_id,
				  conf ? conf->hop_limit : 0);
			return 1;
		}
		/* Watch the socket: its entry goes when it closes unaccepted. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE) {
			rw_handoff_watch_done(skops, sk);
			return 1;
		}
		rw_side_door(skops, sk, 0);
		st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
		if (!st || !(st->flags & RW_F_REDIRECTED))
			return 1;
		rw_tuple_of(skops, &t, 0);
		v = bpf_map_lookup_elem(&rw_handoff, &t);
		if (v && v->cookie == st->cookie)
			bpf_map_delete_elem(&rw_handoff, &t);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		rw_tuple_of(skops, &t, 1);
		v = bpf_map_lookup_elem(&rw_handoff, &t);
		if (!v) {
			/* Reached a service's socket another way: a side door. */
			rw_side_door(skops, sk, 1);
			return 1;
		}
		if (!rw_handoff_claimable(skops, sk, v->service_id)) {
			/* Somebody else's socket with the flow's 4-tuple (its own
			 * namespace, its own listener): it gets nothing, and the
			 * entry stays for the flow's own SYN (retransmitted). No
			 * hand-off: a side door if the socket is a service's. */
			rw_side_door(skops, sk, 1);
			conf = rw_get_conf();
			rw_notify(RW_REASON_HANDOFF_REFUSED, -EACCES, conf ? &v->rec : 0, v->service_id, v->rule_id,
				  conf ? conf->hop_limit : 0);
			return 1;
		}
		rw_svc_handed(v->service_id, (__u32)v->rec.depth + v->rec.n_chain);
		from_accel = v->flags & RW_F_ACCEL;
		peer_cookie = v->cookie;
		st = bpf_sk_storage_get(&rw_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (st) {
			st->service_id = v->service_id;
			st->rule_id = v->rule_id;
			st->redirected_ns = v->redirected_ns;
			st->rec = v->rec;
			st->flags = RW_F_ACCEPTED;
		}
		bpf_map_delete_elem(&rw_handoff, &t);
		rw_accel_passive(skops, sk, from_accel, peer_cookie);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		rw_accel_active(skops, sk);
		break;
	}
	return 1;
}

SEC("cgroup/bind4")
int rw_bind4(struct bpf_sock_addr *ctx)
{
	return rw_bind(ctx, AF_INET);
}

SEC("cgroup/bind6")
int rw_bind6(struct bpf_sock_addr *ctx)
{
	return rw_bind(ctx, AF_INET6);
}

SEC("cgroup/getsockopt")
int rw_getsockopt(struct bpf_sockopt *ctx)
{
	struct rw_conf *conf;
	struct rw_sock *st;
	struct bpf_sock *sk = ctx->sk;
	void *end;
	int err;

	if (ctx->level == SOL_IP || ctx->level == SOL_IPV6)
		return ctx->optname == SO_ORIGINAL_DST ? rw_origdst(ctx) : 1;
	if (ctx->level != RW_SOL)
		return 1;
	if (!rw_allowed() || !rw_home_netns(ctx)) {
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
	if (ctx->optname == RW_OPT_ACCEL) {
		int *p = ctx->optval;

		if (ctx->optlen < (int)sizeof(*p) || (void *)(p + 1) > ctx->optval_end) {
			ctx->retval = -ENOBUFS;
			return 1;
		}
		*p = rw_accel_inserted(sk);
		RW_READ(ctx->optlen) = sizeof(*p);
		ctx->retval = 0;
		return 1;
	}
	if (ctx->optname != RW_OPT_RECORDS && ctx->optname != RW_OPT_CONTEXT && ctx->optname != RW_OPT_UDP_PEER) {
		ctx->retval = -EINVAL;
		return 1;
	}
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	if ((!st || !(st->flags & RW_F_ACCEPTED)) && sk->protocol == IPPROTO_UDP) {
		err = ENOENT;
		st = rw_udp_claim(sk, &err);
		if (!st) {
			ctx->retval = -err;
			return 1;
		}
	}
	if (!st || !(st->flags & RW_F_ACCEPTED)) {
		ctx->retval = -ENOENT;
		return 1;
	}
	end = ctx->optval_end;

	if (ctx->optname == RW_OPT_UDP_PEER) {
		__u32 *p = ctx->optval;
		__u64 id = st->rec.flow_id;

		if (sk->protocol != IPPROTO_UDP) {
			ctx->retval = -EOPNOTSUPP;
			return 1;
		}
		if (ctx->optlen < (int)sizeof(*p) || (void *)(p + 1) > end) {
			ctx->retval = -ENOBUFS;
			return 1;
		}
		*p = bpf_map_lookup_elem(&rw_udp_gone, &id) ? 1 : 0;
		RW_READ(ctx->optlen) = sizeof(*p);
		ctx->retval = 0;
		return 1;
	}
	if (ctx->optname == RW_OPT_RECORDS) {
		struct rw_records r = st->rec;
		void *p = ctx->optval;

		if (ctx->optlen < (int)sizeof(r) || p + sizeof(r) > end) {
			ctx->retval = -ENOBUFS;
			return 1;
		}
		r.mac = rw_mac(&r, conf);
		__builtin_memcpy(p, &r, sizeof(r));
		RW_READ(ctx->optlen) = sizeof(r); /* volatile: two 4-byte stores, never one 8-byte */
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
		c.records.mac = rw_mac(&c.records, conf);
		__builtin_memcpy(p, &c, sizeof(c));
		RW_READ(ctx->optlen) = sizeof(c);
		ctx->retval = 0;
		return 1;
	}
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
	if (!rw_allowed() || !rw_home_netns(ctx))
		return rw_set_fail(EACCES);
	err = rw_check_socket(sk);
	if (err)
		return rw_set_fail(err);
	conf = rw_get_conf();
	if (!conf || !sk)
		return rw_set_fail(EOPNOTSUPP);
	if (ctx->optname == RW_OPT_ACCEL)
		return rw_accel_optin(ctx);
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
	    r.n_chain > RW_MAX_CHAIN || r.proto != sk->protocol)
		return rw_set_fail(EINVAL);
	if (rw_mac(&r, conf) != r.mac)
		return rw_set_fail(EINVAL);

	st = bpf_sk_storage_get(&rw_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return rw_set_fail(ENOBUFS);
	st->rec = r;
	st->n_set = r.n_chain;
	st->flags = RW_F_HAS_RECORDS;
	st->service_id = 0;
	st->rule_id = 0;
	st->redirected_ns = 0;
	ctx->optlen = -1; /* handled here: the kernel's own setsockopt is skipped */
	return 1;
}

/* ---- transports: what a process in the subtree may open ----
 *
 * TCP and UDP are redirected; ICMP echo ("ping") sockets and raw sockets
 * (root only) carry no flow to a service. Every other transport of the
 * Internet families (UDP-Lite, SCTP, MPTCP, DCCP, anything unknown) would
 * reach its destination unseen, so its socket is refused at creation with
 * EPROTONOSUPPORT, as on a kernel without it (applications that try MPTCP
 * fall back to TCP), and a `protocol` event. */

SEC("cgroup/sock_create")
int rw_sock_create(struct bpf_sock *sk)
{
	__u32 family = sk->family, type = sk->type, proto = sk->protocol;
	struct rw_conf *conf;
	__u32 zero = 0;
	struct rw_records *r;

	if (type == SOCK_STREAM && proto == IPPROTO_TCP)
		return rw_svc_sock_mark(sk);
	if (type == SOCK_DGRAM && proto == IPPROTO_UDP)
		return 1;
	conf = rw_get_conf();
	if (!conf || (family != AF_INET && family != AF_INET6))
		return 1;
	if (type == SOCK_DGRAM && (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6))
		return 1;
	if (type == 3 /* SOCK_RAW */)
		return 1;
	r = bpf_map_lookup_elem(&rw_scratch, &zero);
	if (r) {
		__builtin_memset(r, 0, sizeof(*r));
		r->proto = proto > 255 ? 255 : proto;
		r->orig_dst.family = family;
		r->orig_dst.port_be = proto; /* reported as the protocol number */
	}
	rw_notify(RW_REASON_PROTOCOL, -EPROTONOSUPPORT, r, 0, 0, conf->hop_limit);
	bpf_set_retval(-EPROTONOSUPPORT);
	return 0;
}

SEC("cgroup_skb/egress")
int rw_skb_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk;
	struct rw_addr src, dst;
	struct rw_udp_sock *u;
	struct rw_udp_slot *sl;
	struct rw_sock *st;
	__u8 proto = rw_skb_proto(skb);

	if (proto == IPPROTO_TCP)
		return 1;
	sk = rw_skb_sock(skb);
	if (!sk || sk->protocol != IPPROTO_UDP || !rw_skb_udp(skb, &src, &dst))
		return 1;
	u = bpf_sk_storage_get(&rw_udp_sk, sk, 0, 0);
	if (u) {
		sl = rw_slot_of_target(u, &dst);
		if (sl && sl->mark) {
			/* Every datagram, connected socket or not, goes only to the
			 * service's own socket: a proxy that died and an impostor
			 * that took its port get nothing (the send fails). */
			if (!rw_udp_dst_owned(skb, &src, &dst, ((__u64)sl->service_id << 32) | sl->mark)) {
				rw_count_svc(sl->service_id, RW_REASON_IMPOSTOR);
				return 0;
			}
			skb->mark = sl->mark;
			return 1;
		}
	}
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	if (st && (st->flags & RW_F_ACCEPTED) && st->mark) {
		/* A proxy's reply goes only to the flow's own socket. */
		if (!rw_udp_reply_owned(skb, &src, &dst, st->mark)) {
			rw_count_svc(st->service_id, RW_REASON_IMPOSTOR);
			return 0;
		}
		skb->mark = st->mark;
	}
	return 1;
}

SEC("cgroup_skb/ingress")
int rw_skb_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct rw_addr src, dst;
	struct rw_udp_handoff *h;
	struct rw_udp_sock *u;
	struct rw_udp_slot *sl;
	struct rw_owner *own;
	struct rw_sock *st;
	struct rw_tuple key;
	__u8 proto = rw_skb_proto(skb);
	__u32 want = 0;

	/* TCP: only the answer to a connect (the socket is in SYN_SENT). */
	if (!sk || (proto == IPPROTO_TCP && sk->state != BPF_TCP_SYN_SENT))
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	if (sk->protocol == IPPROTO_TCP) {
		st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
		if (!st || !(st->flags & RW_F_REDIRECTED) || !st->service_id)
			return 1;
		if (rw_tcp_answer_owned(skb, st->service_id))
			return 1;
		rw_count_svc(st->service_id, RW_REASON_IMPOSTOR);
		return 0; /* never established with an impostor: the connect times out */
	}
	if (sk->protocol != IPPROTO_UDP || !rw_skb_udp(skb, &src, &dst))
		return 1;
	/* A proxy's flow socket: only its application's socket sends to it
	 * (a stray from another source is judged below, as at the listener). */
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	if (st && (st->flags & RW_F_ACCEPTED) && st->mark && rw_sock_peer_is(sk, &src))
		return skb->mark == st->mark ? 1 : rw_forged(&src);
	/* An application's socket: a datagram from a service address it has a
	 * flow with comes from that flow's proxy socket. */
	u = bpf_sk_storage_get(&rw_udp_sk, sk, 0, 0);
	if (u) {
		sl = rw_slot_of_target(u, &src);
		if (sl && sl->mark)
			return skb->mark == sl->mark ? 1 : rw_forged(&src);
	}
	own = bpf_sk_storage_get(&rw_owner, sk, 0, 0);
	if (!own) {
		/* Anyone else: nothing from a service's address (a flow that
		 * ended, its port now somebody else's). */
		if (bpf_map_lookup_elem(&rw_svc_addr, &src))
			return rw_forged(&src);
		return 1;
	}
	/* A service's listener: the first datagrams of a flow come from the
	 * flow's application socket, with its mark (published already, or
	 * still in the sender's slot). */
	rw_udp_tuple(&key, &src, &dst);
	h = bpf_map_lookup_elem(&rw_udp_handoff, &key);
	if (h) {
		want = h->s.mark;
	} else {
		/* The socket a datagram back to `src` would reach: the sender. */
		struct bpf_sock *app = rw_udp_receiver(skb, &dst, &src);

		if (app) {
			u = bpf_sk_storage_get(&rw_udp_sk, app, 0, 0);
			if (u) {
				sl = rw_slot_of_target(u, &dst);
				if (sl) {
					want = sl->mark;
					/* Published now, by the datagram that proves
					 * whose flow it is (its mark is the slot's mark):
					 * not later from whoever holds the source port
					 * when the proxy reads it (the sender may have
					 * closed and another socket bound its port). */
					if (skb->mark == want)
						rw_udp_handoff_put(&key, sl, want);
				}
			}
			bpf_sk_release(app);
		}
	}
	if (want && skb->mark != want)
		return rw_forged(&src);
	/* No flow of the subtree sent it (no published hand-off, no sender's
	 * slot): it has no records, and the proxy could only refuse it. Dropped
	 * here, counted, before it takes the listener's buffer or the proxy's
	 * time: a flood of them from outside once filled the listener's queue
	 * and the first datagrams of genuine flows were lost unseen. */
	if (!want) {
		rw_count(RW_REASON_UDP_NO_FLOW);
		return 0;
	}
	return 1;
}

/* The accelerated leg between two proxies (lib/accel.h): attached to the
 * sockhash rw_accel (its sockets only), not to the cgroup. */
SEC("sk_msg")
int rw_accel_msg(struct sk_msg_md *msg)
{
	return rw_accel_verdict(msg);
}
