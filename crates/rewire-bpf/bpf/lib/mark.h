/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Packets (cgroup_skb): a UDP flow's packet mark, checked on arrival, and
 * who may receive a flow's datagrams or a service's TCP answers.
 *
 * API: rw_skb_l4/rw_skb_udp/rw_skb_proto/rw_skb_sock (parse a packet),
 * rw_udp_dst_owned, rw_udp_reply_owned, rw_forged, rw_tcp_answer_owned.
 */
#pragma once

#include "udp.h"

/* ---- UDP datagrams: only a flow's own sockets speak for it ----
 *
 * Nothing in a datagram names its flow except its addresses, and any local
 * process can send from any local address (IP_PKTINFO) on a port it bound
 * elsewhere. So every UDP flow gets a random mark; its datagrams carry it as
 * their packet mark, set on the way out by the flow's own sockets (the
 * application's, by its slot; the proxy's flow socket, by its claimed
 * state), and checked on the way in by the receiving socket of the flow.
 * Nobody else can set a mark without CAP_NET_ADMIN, and a socket outside
 * the subtree runs no egress program here. A datagram whose mark is not the
 * flow's is dropped (counted, reported): a forged reply "from the original
 * server", an injected request, a later socket on a closed flow's port. */

/* The addresses of a UDP datagram or TCP segment (`proto`; 0 if it is not one). */
static __always_inline int rw_skb_l4(struct __sk_buff *skb, __u8 proto, struct rw_addr *src, struct rw_addr *dst)
{
	__u8 h[40];
	__u16 ports[2];
	__u32 l4;

	__builtin_memset(src, 0, sizeof(*src));
	__builtin_memset(dst, 0, sizeof(*dst));
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, h, 20) || h[9] != proto)
			return 0;
		l4 = (h[0] & 0xf) * 4;
		src->family = dst->family = AF_INET;
		__builtin_memcpy(src->addr, &h[12], 4);
		__builtin_memcpy(dst->addr, &h[16], 4);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 0, h, 40) || h[6] != proto)
			return 0;
		l4 = 40;
		src->family = dst->family = AF_INET6;
		__builtin_memcpy(src->addr, &h[8], 16);
		__builtin_memcpy(dst->addr, &h[24], 16);
	} else {
		return 0;
	}
	if (bpf_skb_load_bytes(skb, l4, ports, 4))
		return 0;
	src->port_be = ports[0];
	dst->port_be = ports[1];
	return 1;
}

#define rw_skb_udp(skb, src, dst) rw_skb_l4(skb, IPPROTO_UDP, src, dst)

/* The packet's transport protocol, read in place (no helper call: these
 * programs run for every packet of the subtree, so the common case, a TCP
 * segment, must cost next to nothing); 0 when not in the linear part. */
static __always_inline __u8 rw_skb_proto(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u8 *h = data;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (data + 20 > end)
			return 0;
		return h[9];
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (data + 40 > end)
			return 0;
		return h[6];
	}
	return 0;
}

static __always_inline struct bpf_sock *rw_skb_sock(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;

	if (!sk)
		return 0;
	return bpf_sk_fullsock(sk);
}

/* Whether the socket a datagram from `src` to `dst` reaches is service
 * `sid`'s own and, if it is a proxy's flow socket, this flow's (`mark`): a
 * flow socket left from an earlier flow of the same source (a closed
 * client whose port this socket got) would drop the datagram, so the send
 * fails instead, visibly. (A global function: its lookup's stack is its own.) */
__attribute__((noinline)) int rw_udp_dst_owned(struct __sk_buff *skb, const struct rw_addr *src,
					      const struct rw_addr *dst, __u64 sid_mark)
{
	struct bpf_sock *r;
	struct rw_sock *st;
	__u32 sid = sid_mark >> 32, mark = (__u32)sid_mark;
	int ok;

	if (!skb || !src || !dst)
		return 0;
	r = rw_udp_receiver(skb, src, dst);
	if (!r)
		return 1; /* nobody: the datagram is dropped by the kernel (ICMP unreachable) */
	ok = rw_sock_of_service(r, sid);
	if (ok) {
		st = bpf_sk_storage_get(&rw_sk, r, 0, 0);
		if (st && (st->flags & RW_F_ACCEPTED) && st->mark && st->mark != mark && rw_sock_peer_is(r, src))
			ok = 0;
	}
	bpf_sk_release(r);
	return ok;
}

/* Whether the socket a reply of a proxy's flow socket (`src` -> `dst`)
 * reaches holds that flow (a slot with its `mark`): the application's
 * socket, or the previous proxy's onward socket. UDP address reuse checks
 * no owner: a socket of any user bound more specifically to the flow's
 * address, beside an application socket that set SO_REUSEADDR on the
 * wildcard, would take the reply, and sockets outside the subtree run no
 * ingress check of ours. Then the reply is dropped (the proxy's send
 * fails) and counted as an impostor. (A global function: its lookup's
 * stack is its own.) */
__attribute__((noinline)) int rw_udp_reply_owned(struct __sk_buff *skb, const struct rw_addr *src,
						const struct rw_addr *dst, __u32 mark)
{
	struct rw_udp_sock *u;
	struct bpf_sock *r;
	int ok = 0;

	if (!skb || !src || !dst)
		return 0;
	r = rw_udp_receiver(skb, src, dst);
	if (!r)
		return 1; /* nobody: the datagram is dropped by the kernel (ICMP unreachable) */
	u = bpf_sk_storage_get(&rw_udp_sk, r, 0, 0);
	if (u) {
#pragma unroll
		for (int i = 0; i < RW_UDP_SLOTS; i++) {
			if (u->slot[i].rec.magic == RW_MAGIC && u->slot[i].mark == mark) {
				ok = 1;
				break;
			}
		}
	}
	bpf_sk_release(r);
	return ok;
}

__attribute__((noinline)) int rw_forged(const struct rw_addr *src)
{
	struct rw_conf *conf = rw_get_conf();
	__u32 zero = 0;
	struct rw_records *r;

	r = bpf_map_lookup_elem(&rw_scratch, &zero);
	if (r && src && conf) {
		__builtin_memset(r, 0, sizeof(*r));
		r->proto = IPPROTO_UDP;
		r->orig_dst = *src; /* reported: the address it claimed to come from */
	} else {
		r = 0;
	}
	rw_notify(RW_REASON_UDP_FORGED, 0, r, 0, 0, conf ? conf->hop_limit : 0);
	return 0;
}

/* A redirected TCP connect's answer (SYN-ACK) must come from the service's
 * own listener: the connect hook checked who held the service's address,
 * but a SYN the kernel retransmits later (a full accept queue, a restart)
 * may meet somebody else there by then. The lookup of the answering
 * connection finds its listener (a request socket's listener). */
__attribute__((noinline)) int rw_tcp_answer_owned(struct __sk_buff *skb, __u32 sid)
{
	struct rw_addr src, dst;
	struct bpf_sock_tuple t;
	struct bpf_sock *l;
	__u32 len;
	int ok;

	if (!skb || !rw_skb_l4(skb, IPPROTO_TCP, &src, &dst))
		return 1;
	len = rw_sk_tuple(&t, &dst, &src); /* as the client's segments go */
	l = bpf_sk_lookup_tcp(skb, &t, len, BPF_F_CURRENT_NETNS, 0);
	if (!l)
		return 1; /* no full socket answers (a time-wait twin): no impostor to name */
	ok = rw_sock_of_service(l, sid);
	bpf_sk_release(l);
	return ok;
}
