/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Addresses: struct rw_addr from and to sock_addr contexts and sockets,
 * IPv4-mapped forms, the link-local scope id, lookup tuples.
 *
 * API: rw_addr_eq, rw_addr_is_any, rw_v4mapped/rw_unmap/rw_map,
 * rw_ctx_addr/rw_ctx_dst (a connect's or send's destination),
 * rw_ctx_set/rw_ctx_target/rw_ctx_set_src (rewrite it), rw_scope_of (map
 * rw_scope, filled by scope.bpf.c), rw_match_addr (what the rules see),
 * RW_READ, rw_addr_from/rw_sock_local/rw_sock_peer/rw_sock_peer_is (a
 * socket's ends), rw_sk_tuple (a bpf_sk_lookup_* tuple).
 */
#pragma once

#include "common.h"
#include "scope.h"

/* The scope id of the link-local address the current connect6/sendmsg6
 * names, left by the scope program (scope.bpf.c) that runs before the hooks
 * in the same call (see rw_scope_of). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_scope_stash);
} rw_scope SEC(".maps");

static __always_inline int rw_addr_eq(const struct rw_addr *a, const struct rw_addr *b)
{
	const __u32 *x = (const __u32 *)a->addr, *y = (const __u32 *)b->addr;
	return a->family == b->family && a->port_be == b->port_be && x[0] == y[0] &&
	       x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* ---- addresses ---- */

static __always_inline void rw_ctx_addr(struct bpf_sock_addr *ctx, __u8 family, struct rw_addr *out)
{
	__builtin_memset(out, 0, sizeof(*out));
	out->family = family;
	out->port_be = (__u16)ctx->user_port;
	if (family == AF_INET) {
		*(__u32 *)out->addr = ctx->user_ip4;
	} else {
		__u32 *d = (__u32 *)out->addr;
		d[0] = ctx->user_ip6[0];
		d[1] = ctx->user_ip6[1];
		d[2] = ctx->user_ip6[2];
		d[3] = ctx->user_ip6[3];
	}
}

static __always_inline void rw_ctx_set(struct bpf_sock_addr *ctx, __u8 family, const __u8 *addr, __u16 port_be)
{
	if (family == AF_INET) {
		ctx->user_ip4 = *(const __u32 *)addr;
	} else {
		const __u32 *a = (const __u32 *)addr;
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	}
	ctx->user_port = port_be;
}

/* IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) and back. */
static __always_inline int rw_v4mapped(const struct rw_addr *a)
{
	const __u32 *d = (const __u32 *)a->addr;
	return a->family == AF_INET6 && d[0] == 0 && d[1] == 0 && d[2] == bpf_htonl(0xffff);
}

static __always_inline void rw_unmap(struct rw_addr *a)
{
	__u32 *d = (__u32 *)a->addr;
	d[0] = d[3];
	d[1] = d[2] = d[3] = 0;
	a->family = AF_INET;
}

static __always_inline void rw_map(struct rw_addr *a)
{
	__u32 *d = (__u32 *)a->addr;
	if (a->family != AF_INET)
		return;
	d[3] = d[0];
	d[0] = d[1] = 0;
	d[2] = bpf_htonl(0xffff);
	a->family = AF_INET6;
}

static __always_inline int rw_addr_is_any(const struct rw_addr *a)
{
	const __u32 *d = (const __u32 *)a->addr;
	return (d[0] | d[1] | d[2] | d[3]) == 0;
}

/* A connect's or send's destination as the kernel will route it: an
 * IPv4-mapped address on an IPv6 socket is the IPv4 address. This is the
 * flow's original destination. */
static __always_inline void rw_ctx_dst(struct bpf_sock_addr *ctx, __u8 family, struct rw_addr *orig)
{
	rw_ctx_addr(ctx, family, orig);
	if (rw_v4mapped(orig))
		rw_unmap(orig);
}

/* An IPv6 link-local destination's scope id (the sockaddr's sin6_scope_id,
 * which the sock_addr context does not show): taken from what the scope
 * program left for this socket in this call, and consumed. A global
 * function: verified once. */
__attribute__((noinline)) int rw_scope_of(struct bpf_sock_addr *ctx, struct rw_addr *a)
{
	__u32 zero = 0;
	struct rw_scope_stash *s;

	if (!ctx || !a || a->family != AF_INET6 || a->addr[0] != 0xfe || (a->addr[1] & 0xc0) != 0x80)
		return 0;
	s = bpf_map_lookup_elem(&rw_scope, &zero);
	if (!s || !s->cookie)
		return 0;
	if (s->cookie == bpf_get_socket_cookie(ctx))
		a->scope_id = s->scope_id;
	s->cookie = 0;
	return 0;
}

/* What the rules see of a destination: the unspecified address reaches this
 * host, so it is matched as loopback. */
static __always_inline void rw_match_addr(const struct rw_addr *orig, struct rw_addr *m)
{
	*m = *orig;
	if (rw_addr_is_any(m)) {
		if (m->family == AF_INET)
			*(__u32 *)m->addr = bpf_htonl(0x7f000001);
		else
			m->addr[15] = 1;
	}
}

/* Points the connect/send at `t`: as an IPv4-mapped address on an IPv6
 * socket when `t` is IPv4. */
static __always_inline void rw_ctx_target(struct bpf_sock_addr *ctx, __u8 family, const struct rw_addr *t)
{
	struct rw_addr m = *t;

	if (family == AF_INET6)
		rw_map(&m);
	rw_ctx_set(ctx, family, m.addr, m.port_be);
}

/* Builds an rw_addr from a socket's fields. Every field is read up front
 * with a volatile load: the verifier forbids pointer arithmetic on a socket,
 * which clang emits when it sinks a plain load into a branch and merges the
 * IPv4 and IPv6 offsets. */
#define RW_READ(x) (*(volatile typeof(x) *)&(x))
static __always_inline void rw_addr_from(struct rw_addr *out, __u8 family, __u16 port_be, __u32 ip4, __u32 a0,
					 __u32 a1, __u32 a2, __u32 a3)
{
	__u32 *d = (__u32 *)out->addr;

	__builtin_memset(out, 0, sizeof(*out));
	out->family = family;
	out->port_be = port_be;
	if (family == AF_INET) {
		d[0] = ip4;
	} else {
		d[0] = a0;
		d[1] = a1;
		d[2] = a2;
		d[3] = a3;
	}
}

/* The socket's own address (a service listener's, for a proxy). */
static __always_inline void rw_sock_local(struct bpf_sock *sk, __u8 family, struct rw_addr *out)
{
	__u32 port = RW_READ(sk->src_port), ip4 = RW_READ(sk->src_ip4);
	__u32 a0 = RW_READ(sk->src_ip6[0]), a1 = RW_READ(sk->src_ip6[1]);
	__u32 a2 = RW_READ(sk->src_ip6[2]), a3 = RW_READ(sk->src_ip6[3]);

	rw_addr_from(out, family, bpf_htons((__u16)port), ip4, a0, a1, a2, a3);
}

/* The socket's peer (a connected socket). */
static __always_inline void rw_sock_peer(struct bpf_sock *sk, __u8 family, struct rw_addr *out)
{
	__u16 port = RW_READ(sk->dst_port);
	__u32 ip4 = RW_READ(sk->dst_ip4);
	__u32 a0 = RW_READ(sk->dst_ip6[0]), a1 = RW_READ(sk->dst_ip6[1]);
	__u32 a2 = RW_READ(sk->dst_ip6[2]), a3 = RW_READ(sk->dst_ip6[3]);

	rw_addr_from(out, family, port, ip4, a0, a1, a2, a3);
}

/* Whether `sk` is connected to `peer`. A proxy's UDP flow socket receives
 * its peer's datagrams and, rarely, a stray: a datagram of another source
 * that the kernel's lookup gave it in the instant between its bind and its
 * connect (a new member of a reuseport group with connected members gets
 * every unmatched datagram meanwhile). A stray is judged as the listener
 * would judge it, never as a forgery of the socket's own flow. */
static __always_inline int rw_sock_peer_is(struct bpf_sock *sk, const struct rw_addr *peer)
{
	struct rw_addr p;

	if (sk->state != BPF_TCP_ESTABLISHED)
		return 0;
	rw_sock_peer(sk, peer->family, &p);
	return rw_addr_eq(&p, peer);
}

/* Sets the source address of an unconnected send (sendmsg4/6 only). */
static __always_inline void rw_ctx_set_src(struct bpf_sock_addr *ctx, __u8 family, const struct rw_addr *a)
{
	const __u32 *d = (const __u32 *)a->addr;

	if (a->family != family)
		return;
	if (family == AF_INET) {
		ctx->msg_src_ip4 = d[0];
	} else {
		ctx->msg_src_ip6[0] = d[0];
		ctx->msg_src_ip6[1] = d[1];
		ctx->msg_src_ip6[2] = d[2];
		ctx->msg_src_ip6[3] = d[3];
	}
}

static __always_inline __u32 rw_sk_tuple(struct bpf_sock_tuple *t, const struct rw_addr *from, const struct rw_addr *to)
{
	__builtin_memset(t, 0, sizeof(*t));
	if (to->family == AF_INET) {
		t->ipv4.saddr = *(const __u32 *)from->addr;
		t->ipv4.sport = from->port_be;
		t->ipv4.daddr = *(const __u32 *)to->addr;
		t->ipv4.dport = to->port_be;
		return sizeof(t->ipv4);
	}
	__builtin_memcpy(t->ipv6.saddr, from->addr, 16);
	t->ipv6.sport = from->port_be;
	__builtin_memcpy(t->ipv6.daddr, to->addr, 16);
	t->ipv6.dport = to->port_be;
	return sizeof(t->ipv6);
}
