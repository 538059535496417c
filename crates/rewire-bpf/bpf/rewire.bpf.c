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
 *   cgroup/setsockopt     RW_SOL/RW_OPT_RECORDS: the set call
 *
 * All per-flow state lives in socket-local storage, which the kernel frees
 * with the socket; the only shared tables (the TCP and UDP hand-offs) are
 * LRU hashes whose entries are deleted when claimed, so nothing grows
 * without bound. A UDP socket holds at most RW_UDP_SLOTS live flows; a flow
 * idle for `udp_idle_ns` frees its slot. Blobs handed to user space carry a SipHash
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

#define EAGAIN 11
#define EPERM 1
#define ENOENT 2
#define ENOBUFS 105
#define EINVAL 22
#define EACCES 13
#define ELOOP 40
#define EPROTOTYPE 91
#define EOPNOTSUPP 95
#define EISCONN 106
#define ENOTCONN 107
#define EADDRINUSE 98
#define ECONNREFUSED 111
#define EPROTONOSUPPORT 93
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#define IPPROTO_ICMPV6 58
#define EFAULT 14

#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* = IP6T_SO_ORIGINAL_DST at SOL_IPV6 */

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

/* UDP flows of one socket (application or proxy outbound). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct rw_udp_sock);
} rw_udp_sk SEC(".maps");

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

/* Service listen addresses (port in network order) -> service id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * RW_MAX_SERVICES * RW_MAX_UDP_PORTS);
	__type(key, struct rw_addr);
	__type(value, __u16);
} rw_svc_addr SEC(".maps");

/* Who a service's processes are: cgroup id of <subtree>/services/<name>, or
 * the service's uid -> service id. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * RW_MAX_SERVICES);
	__type(key, struct rw_ident_key);
	__type(value, __u16);
} rw_svc_id SEC(".maps");

/* Sockets a service's own processes bound to its addresses (cgroup/bind4,6).
 * Cloned: a connection accepted on a marked listener carries the listener's
 * mark from its creation (sk_clone_lock), so sockops can tell a socket
 * accepted on the service's own listener from any other (rw_handoff_take). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct rw_owner);
} rw_owner SEC(".maps");

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

/* The host's directed broadcast addresses (IPv4, network order), read with
 * the interface addresses when the rules are loaded: a datagram to one of
 * them is delivered to many receivers, this host's included. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RW_MAX_BROADCAST);
	__type(key, __u32);
	__type(value, __u8);
} rw_bcast SEC(".maps");

/* Per service: its side doors and the depth of its recent flows (see
 * struct rw_svc_state). A state map: survives reloads like the hand-offs. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RW_MAX_SERVICES + 1);
	__type(key, __u32);
	__type(value, struct rw_svc_state);
} rw_svc_state SEC(".maps");

/* TCP sockets a service's process bound (cgroup/bind4,6), any address:
 * cloned into every connection such a listener accepts, so sockops knows a
 * connection that reached the service without a hand-off (a side door). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct rw_svc_sock);
} rw_svc_sock SEC(".maps");

/* The scope id of the link-local address the current connect6/sendmsg6
 * names, left by the scope program (scope.bpf.c) that runs before the hooks
 * in the same call (see rw_scope_of). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_scope_stash);
} rw_scope SEC(".maps");

/* Per-cause counters (RW_CNT_*): exact even when events are dropped. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_CNT_N);
	__type(key, __u32);
	__type(value, __u64);
} rw_counters SEC(".maps");

/* Scratch records (too big for the 512-byte stack next to the rest). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_records);
} rw_scratch SEC(".maps");

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

static __always_inline void rw_count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&rw_counters, &idx);
	if (c)
		*c += 1;
}

static __always_inline void rw_emit(__u32 kind, int err, const struct rw_records *rec,
				    __u16 service_id, __u16 rule_id, __u16 hop_limit)
{
	struct rw_event *e = bpf_ringbuf_reserve(&rw_events, sizeof(*e), 0);
	__u64 ug = bpf_get_current_uid_gid();

	if (!e) {
		rw_count(RW_CNT_EVENTS_LOST);
		return;
	}
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
	e->uid = (__u32)ug;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->orig_dst = rec->orig_dst;
	__builtin_memcpy(e->chain, rec->chain, sizeof(e->chain));
	bpf_ringbuf_submit(e, 0);
}

/* ---- the rule walk ---- */

struct rw_walk {
	struct rw_addr dst; /* the destination as the rules see it */
	__u64 seen; /* bit per service id already in the chain */
	__u64 cgroup_id;
	__u32 uid;
	__u32 n_rules;
	__u8 proto;
	__u8 found;
	__u16 service_id;
	__u16 rule_id;
	__u8 any_dst; /* a broadcast/multicast send: every rule's destination
		       * applies, and only a rule that does not let it pass is found */
	__u8 any_origin; /* the origin is not proven (a service's connect without
			  * records of its own): uid and cgroup conditions match */
};

/* The walk continues the flow of `rec`: its chain's services are seen,
 * its origin is the one rules match on. Returns the chain's length. */
static __always_inline __u8 rw_walk_from(struct rw_walk *w, const struct rw_records *rec)
{
	__u8 n = rec->n_chain;

#pragma unroll
	for (int i = 0; i < RW_MAX_CHAIN; i++)
		if (i < n)
			w->seen |= 1ULL << (rec->chain[i] & 63);
	w->uid = rec->uid;
	w->cgroup_id = rec->cgroup_id;
	return n;
}

static long rw_walk_rule(__u32 i, void *data)
{
	struct rw_walk *w = data;
	struct rw_rule *r;
	__u32 k = i;
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
	/* An unproven origin may be anybody's: a rule scoped to a user or
	 * cgroup takes it rather than let that user's flow pass unseen. */
	if (r->has_uid && !w->any_origin && r->uid != w->uid)
		return 0;
	if (r->has_cgroup && !w->any_origin && r->cgroup_id != w->cgroup_id)
		return 0;
	if (w->any_dst) {
		/* One datagram to many receivers reaches whatever any rule's
		 * destination names; a rule that lets it pass is no objection. */
		if (r->flags & RW_RULE_BROADCAST_PASS)
			return 0;
	} else {
		const __u32 *a = (const __u32 *)r->addr, *m = (const __u32 *)r->mask;
		if ((d[0] & m[0]) != a[0] || (d[1] & m[1]) != a[1] || (d[2] & m[2]) != a[2] ||
		    (d[3] & m[3]) != a[3])
			return 0;
	}
	/* Already in the chain: REDIRECTED_BY_SELF or PREVIOUSLY_REDIRECTED_BY_SELF. */
	if (w->seen & (1ULL << (r->service_id & 63)))
		return 0;
	/* NOT_REDIRECTED or REDIRECTED_BY_OTHER: take it. (A service with no
	 * listener of this family is not skipped: it has no listener for the
	 * flow, and its fail policy decides.) */
	w->found = 1;
	w->service_id = r->service_id;
	w->rule_id = r->rule_id;
	return 1;
}

static __always_inline void rw_walk(struct rw_walk *w)
{
	w->found = 0;
	bpf_loop(RW_MAX_RULES, rw_walk_rule, w, 0);
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

/* The service's address for `family`, as a struct rw_addr, and the size of
 * its UDP port range. */
static __always_inline struct rw_service *rw_service_addr(__u16 service_id, __u8 family, struct rw_addr *out,
							  __u16 *udp_ports)
{
	__u32 sid = service_id;
	struct rw_service *svc = bpf_map_lookup_elem(&rw_services, &sid);

	if (!svc)
		return 0;
	__builtin_memset(out, 0, sizeof(*out));
	out->family = family;
	if (family == AF_INET) {
		out->port_be = svc->port4_be;
		__builtin_memcpy(out->addr, svc->addr4, 4);
	} else {
		out->port_be = svc->port6_be;
		__builtin_memcpy(out->addr, svc->addr6, 16);
	}
	*udp_ports = svc->udp_ports ? svc->udp_ports : 1;
	return svc;
}

/* A fresh record for a flow's first redirect. A connect made by one of
 * service `caller`'s processes without records (a proxy that does not carry
 * them) starts with that service in its chain. */
static __always_inline void rw_new_record(struct rw_records *rec, const struct rw_addr *dst, __u8 proto,
					  __u64 cgroup_id, __u16 caller)
{
	__u64 ug = bpf_get_current_uid_gid();

	__builtin_memset(rec, 0, sizeof(*rec));
	rec->magic = RW_MAGIC;
	rec->version = RW_VERSION;
	rec->proto = proto;
	rec->flow_id = ((__u64)bpf_get_prandom_u32() << 32) | bpf_get_prandom_u32();
	rec->orig_dst = *dst;
	rec->pid = bpf_get_current_pid_tgid() >> 32;
	rec->uid = (__u32)ug;
	rec->gid = ug >> 32;
	rec->cgroup_id = cgroup_id;
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));
	rec->created_ns = bpf_ktime_get_boot_ns();
	if (caller) {
		rec->chain[0] = caller;
		rec->n_chain = 1;
	}
}

/* The records an event about a refused connect reports: the socket's, or a
 * fresh one in per-CPU scratch space. */
static __always_inline const struct rw_records *rw_event_rec(const struct rw_sock *st, int has_rec,
							     const struct rw_addr *dst, __u8 proto)
{
	__u32 zero = 0;
	struct rw_records *r;

	if (has_rec && st)
		return &st->rec;
	r = bpf_map_lookup_elem(&rw_scratch, &zero);
	if (r)
		rw_new_record(r, dst, proto, bpf_get_current_cgroup_id(), 0);
	return r;
}

/* Counts and reports a refusal (or a skip). A global function: the
 * verifier checks it once, not at each of its call sites; its scalars are
 * packed in two words (a global function takes at most five arguments, and
 * a struct on the caller's stack would cost stack in every caller):
 * what = kind | counter << 8 | (u32)err << 32,
 * ids = service_id | rule_id << 16 | proto << 32 | has_rec << 40. */
__attribute__((noinline)) int rw_report_(const struct rw_sock *st, const struct rw_addr *dst, __u64 what, __u64 ids)
{
	const struct rw_records *r;
	struct rw_conf *conf = rw_get_conf();

	if (!dst)
		return 0;
	rw_count((what >> 8) & 0xff);
	r = rw_event_rec(st, (ids >> 40) & 1, dst, (ids >> 32) & 0xff);
	if (r && conf)
		rw_emit(what & 0xff, (__s32)(what >> 32), r, ids & 0xffff, (ids >> 16) & 0xffff, conf->hop_limit);
	return 0;
}

#define rw_report(kind_, counter_, err_, st_, has_rec_, dst_, proto_, sid_, rule_)                            \
	({                                                                                                \
		rw_report_((st_), (dst_),                                                                 \
			   (__u64)(kind_) | ((__u64)(counter_) << 8) | ((__u64)(__u32)(err_) << 32),      \
			   (__u64)(sid_) | ((__u64)(rule_) << 16) | ((__u64)(proto_) << 32) |             \
				   ((__u64)!!(has_rec_) << 40));                                          \
	})

/* Fails the connect/sendmsg with -err (the program returns 0). */
static __always_inline int rw_refuse(int err)
{
	bpf_set_retval(-err);
	return 0;
}

/* Socket storage, created if missing; a test's fault knob makes it fail. */
#define rw_storage_create(map, sk, conf)                                                            \
	(((conf)->faults & RW_FAULT_NO_STORAGE) ? 0 :                                               \
						  bpf_sk_storage_get(map, sk, 0, BPF_SK_STORAGE_GET_F_CREATE))

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
	 * carry that flow's tag, a new flow's would be dropped on arrival. */
	rw_udp_tuple(&key, &client, target);
	if (bpf_map_lookup_elem(&rw_udp_handoff, &key))
		return 1;
	return rw_udp_owned(ctx, &client, target);
}

/* ---- service identity ---- */

/* The service whose process is running (its cgroup
 * <subtree>/services/<name>, or its configured uid), or 0. */
static __always_inline __u16 rw_caller_service(void)
{
	struct rw_ident_key k = { .kind = 0, .id = bpf_get_current_cgroup_id() };
	__u16 *sid = bpf_map_lookup_elem(&rw_svc_id, &k);

	if (sid)
		return *sid;
	k.kind = 1;
	k.id = (__u32)bpf_get_current_uid_gid();
	sid = bpf_map_lookup_elem(&rw_svc_id, &k);
	return sid ? *sid : 0;
}

/* Whether `sk` is one of service `sid`'s own sockets (marked at bind). */
static __always_inline int rw_sock_of_service(struct bpf_sock *sk, __u32 sid)
{
	struct rw_owner *o = bpf_sk_storage_get(&rw_owner, sk, 0, 0);

	return o && o->service_id == sid;
}

#define RW_OWNER_NONE 0     /* nothing listens there */
#define RW_OWNER_SERVICE 1  /* a socket the service's own processes bound */
#define RW_OWNER_IMPOSTOR 2 /* somebody else's socket */

/* Who holds the service address `t` for `proto`: the socket a connection or
 * datagram to it would reach right now. */
__attribute__((noinline)) int rw_owner_of(struct bpf_sock_addr *ctx, __u32 proto, const struct rw_addr *t, __u32 sid)
{
	struct bpf_sock_tuple tup;
	struct rw_addr from;
	struct bpf_sock *s;
	__u32 len;
	int r;

	if (!ctx || !t)
		return RW_OWNER_NONE;
	from = *t;
	from.port_be = 0; /* matches no connected socket: finds the listener */
	len = rw_sk_tuple(&tup, &from, t);
	if (proto == IPPROTO_TCP)
		s = bpf_sk_lookup_tcp(ctx, &tup, len, BPF_F_CURRENT_NETNS, 0);
	else
		s = bpf_sk_lookup_udp(ctx, &tup, len, BPF_F_CURRENT_NETNS, 0);
	if (!s)
		return RW_OWNER_NONE;
	r = rw_sock_of_service(s, sid) ? RW_OWNER_SERVICE : RW_OWNER_IMPOSTOR;
	bpf_sk_release(s);
	return r;
}

/* ---- the decision shared by TCP and UDP ----
 *
 * rw_choose walks the rules for a connect/send of a socket (that may carry
 * records) to `orig`, skipping the services already in the chain and, for a
 * service's own record-less connect, that service and every one before it;
 * it checks that the chosen service's address is held by the service's own
 * socket and applies the service's fail policy when not; it checks the hop
 * limit. Refusals are counted and reported here. */

#define RW_PASS 0     /* not ours: the connect/send goes on untouched */
#define RW_DELIVER 1  /* records set, no service left: to the original destination */
#define RW_REDIRECT 2 /* to c->target, service c->w.service_id */
#define RW_MAX_SKIPS 4 /* services skipped under fail = "open" in one decision */

struct rw_choice {
	struct rw_walk w;
	struct rw_addr target; /* the chosen service's address */
	__u16 nports;          /* its UDP port range */
	__u16 caller;          /* the service making this connect, if any */
	__u8 n;                /* chain length before this hop */
	__u8 proto;            /* in: IPPROTO_TCP or IPPROTO_UDP */
	__u8 has_rec;          /* in: the socket carries records */
	__u8 linked;           /* the caller's connect continues a flow it queried (rw_link) */
	__u8 depth;            /* the flow's depth (rw_records.depth): counts towards the hop limit */
	__u8 _pad;
	__u64 link_flow;       /* that flow's id */
};

/* ---- side doors: connections that reached a service another way ----
 *
 * A service's record-less onward connect may serve any client of the
 * service. Only while every connection it has is a flow rewire handed to
 * it (no side door open, none opened or closed within
 * RW_SIDE_DOOR_QUIET_NS) can the kernel tell that the connect serves one
 * of those flows: only then is it linked to a queried flow, or continued
 * after the service. Otherwise it is the service's own new flow and walks
 * the whole chain again, only that service excluded. */

/* Whether service `sid` had no side door open and none opened or closed
 * from `since_ns - RW_SIDE_DOOR_QUIET_NS` until now. */
__attribute__((noinline)) int rw_svc_quiet(__u32 sid, __u64 since_ns)
{
	struct rw_svc_state *s;
	__u32 k = sid;

	s = bpf_map_lookup_elem(&rw_svc_state, &k);
	if (!s || s->side_open)
		return 0;
	return !s->side_ns || s->side_ns + RW_SIDE_DOOR_QUIET_NS <= since_ns;
}

/* The depth a new flow of service `sid` starts at: the deepest flow handed
 * to it recently (it may be serving that one), so that restarts through
 * record-less services still reach the hop limit. */
__attribute__((noinline)) int rw_svc_depth(__u32 sid)
{
	struct rw_svc_state *s;
	__u32 k = sid;

	s = bpf_map_lookup_elem(&rw_svc_state, &k);
	if (!s || bpf_ktime_get_boot_ns() - s->depth_ns > RW_SIDE_DOOR_QUIET_NS)
		return 0;
	return s->depth;
}

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
		rw_count(RW_CNT_SIDE_DOOR);
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
	rw_count(RW_CNT_LINK);
	return 1;
}

/* Records set on a socket may only take it to their own destination. */
static __always_inline int rw_bind_check(const struct rw_sock *st, int has_rec, const struct rw_addr *orig,
					 __u8 proto)
{
	if (has_rec && st && !rw_addr_eq(&st->rec.orig_dst, orig)) {
		rw_report(RW_EV_MISMATCH, RW_CNT_MISMATCH, -EINVAL, st, has_rec, orig, proto, 0, 0);
		return -EINVAL;
	}
	return 0;
}

/* A global function, verified once on its own: inlined into the UDP path,
 * its walks and lookups multiplied the verifier's states past its limit. */
__attribute__((noinline)) int rw_choose(struct bpf_sock_addr *ctx, const struct rw_sock *st,
					const struct rw_addr *orig, struct rw_choice *c)
{
	struct rw_conf *conf = rw_get_conf();
	struct rw_service *svc;
	struct rw_walk w = {};
	int has_rec, verified = 0, r;
	__u8 proto;

	if (!ctx || !orig || !c || !conf)
		return -ENOENT;
	has_rec = c->has_rec && st;
	proto = c->proto;
	rw_match_addr(orig, &w.dst);
	if (has_rec) {
		c->n = rw_walk_from(&w, &st->rec);
		c->depth = st->rec.depth;
	} else {
		w.uid = (__u32)bpf_get_current_uid_gid();
		w.cgroup_id = bpf_get_current_cgroup_id();
		/* A service's connect without records may serve any of its
		 * clients: its own uid and cgroup say nothing of whose flow it
		 * is, nor does a link (only the service's own records would), so
		 * no rule's uid or cgroup condition may narrow its walk. */
		c->caller = rw_caller_service();
		w.any_origin = !!c->caller;
	}
	w.proto = proto;
	w.n_rules = conf->n_rules;
	rw_walk(&w);
	if (!w.found) {
		r = has_rec ? RW_DELIVER : RW_PASS;
		goto out;
	}
	/* Only in the network namespace rewire serves: elsewhere (a user's
	 * own `unshare -rn`) nothing is redirected and no records are made. */
	if (conf->netns_cookie && bpf_get_netns_cookie(ctx) != conf->netns_cookie) {
		rw_report(RW_EV_FOREIGN_NETNS, RW_CNT_FOREIGN_NETNS, -EPERM, st, has_rec, orig, proto, w.service_id,
			  w.rule_id);
		r = -EPERM;
		goto out;
	}

	if (!has_rec) {
		/* A service's own connect without records (it does not carry
		 * them): it continues the flow it asked SO_ORIGINAL_DST of
		 * (linked); else, if every client it has came through the chain
		 * (no side door, see rw_svc_quiet), after that service; else
		 * through the whole chain again without it. Never back into it.
		 * UDP side doors are not tracked: UDP continues after it.
		 * (c->caller was found before the first walk.) */
		if (c->caller) {
			__u32 sid = c->caller;
			if (proto != IPPROTO_TCP || !rw_link_peek(orig, c, &w)) {
				svc = bpf_map_lookup_elem(&rw_services, &sid);
				if (svc && (proto != IPPROTO_TCP || svc->continue_unlinked ||
					    rw_svc_quiet(sid, bpf_ktime_get_boot_ns()))) {
					w.seen |= svc->upto_mask;
				} else {
					w.seen |= 1ULL << (sid & 63);
					rw_count(RW_CNT_SIDE_DOOR);
				}
				c->n = 1;
				c->depth = rw_svc_depth(sid);
			}
			if (w.seen & (1ULL << (w.service_id & 63))) {
				rw_walk(&w);
				if (!w.found) {
					r = c->linked ? RW_DELIVER : RW_PASS;
					goto out;
				}
			}
		}
	}

	/* The hop limit holds whichever service would come next. */
	if ((__u32)c->n + c->depth >= conf->hop_limit || c->n >= RW_MAX_CHAIN) {
		rw_report(RW_EV_HOP_LIMIT, RW_CNT_HOP_LIMIT, -ELOOP, st, has_rec, orig, proto, w.service_id, w.rule_id);
		r = -ELOOP;
		goto out;
	}

	for (int i = 0; i <= RW_MAX_SKIPS; i++) {
		int owner;
		__u32 kind, counter;

		if (verified || !w.found)
			break;
		svc = rw_service_addr(w.service_id, w.dst.family, &c->target, &c->nports);
		if (!svc) {
			r = -ENOENT;
			goto out;
		}
		if (w.dst.family == AF_INET ? svc->has_v4 : svc->has_v6)
			owner = rw_owner_of(ctx, proto, &c->target, w.service_id);
		else
			owner = RW_OWNER_NONE; /* no listener of this family */
		if (owner == RW_OWNER_SERVICE) {
			verified = 1;
			break;
		}
		kind = owner == RW_OWNER_NONE ? RW_EV_NO_LISTENER : RW_EV_IMPOSTOR;
		counter = owner == RW_OWNER_NONE ? RW_CNT_NO_LISTENER : RW_CNT_IMPOSTOR;
		if (!svc->fail_open || i == RW_MAX_SKIPS) {
			rw_report(kind, counter, -ECONNREFUSED, st, has_rec, orig, proto, w.service_id, w.rule_id);
			r = -ECONNREFUSED;
			goto out;
		}
		/* fail = "open": the flow goes on down the chain without it. */
		rw_report(kind, counter, 0, st, has_rec, orig, proto, w.service_id, w.rule_id);
		rw_count(RW_CNT_FAIL_OPEN_SKIP);
		w.seen |= 1ULL << (w.service_id & 63);
		rw_walk(&w);
	}
	r = verified ? RW_REDIRECT : (has_rec || c->linked) ? RW_DELIVER : RW_PASS;
out:
	c->w = w;
	return r;
}

/* ---- broadcast and multicast ----
 *
 * A datagram to a broadcast or multicast address goes to many receivers at
 * once: hosts on the link and, through the kernel's loopback copy, this
 * host's own sockets (every address a rule can name, "local" included). No
 * proxy can stand in for all of them (it would receive it once, answer for
 * everyone, and its onward copy would go out as its own), so such a send
 * is never redirected: it is refused when any rule could apply to it (the
 * rule's protocol, port, family, uid and cgroup match; its destination
 * cannot be told apart), unless every such rule lets it pass
 * (`broadcast = "pass"`), and then it goes out as sent. */

/* Limited (255.255.255.255) and directed (rw_bcast) broadcast, IPv4
 * multicast (224.0.0.0/4), IPv6 multicast (ff00::/8, every scope). */
static __always_inline int rw_is_fanout(const struct rw_addr *a)
{
	__u32 ip4 = *(const __u32 *)a->addr;

	if (a->family == AF_INET6)
		return a->addr[0] == 0xff;
	if (ip4 == 0xffffffff || (a->addr[0] & 0xf0) == 0xe0)
		return 1;
	return bpf_map_lookup_elem(&rw_bcast, &ip4) != 0;
}

/* A UDP send or connect to `orig`: 0 when it is not a broadcast/multicast
 * destination (the usual decision follows), 1 when it is one that may pass
 * untouched (no rule applies, or every rule that does lets it pass),
 * -EPERM (counted, reported) when it is refused. A global function: the
 * verifier checks it once. */
__attribute__((noinline)) int rw_fanout(const struct rw_sock *st, const struct rw_addr *orig, __u32 has_rec)
{
	struct rw_conf *conf = rw_get_conf();
	struct rw_walk w = {};

	if (!orig || !conf || !rw_is_fanout(orig))
		return 0;
	w.dst = *orig;
	w.any_dst = 1;
	if (has_rec && st) {
		rw_walk_from(&w, &st->rec);
	} else {
		w.uid = (__u32)bpf_get_current_uid_gid();
		w.cgroup_id = bpf_get_current_cgroup_id();
	}
	w.proto = IPPROTO_UDP;
	w.n_rules = conf->n_rules;
	rw_walk(&w);
	if (!w.found)
		return 1;
	rw_report(RW_EV_BROADCAST, RW_CNT_BROADCAST, -EPERM, st, has_rec, orig, IPPROTO_UDP, w.service_id, w.rule_id);
	return -EPERM;
}

/* Appends this hop's service to a record. */
static __always_inline void rw_append(struct rw_records *rec, __u8 n, __u16 service_id)
{
	rec->chain[n & (RW_MAX_CHAIN - 1)] = service_id;
	rec->n_chain = n + 1;
}

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
	has_rec = st && (st->flags & RW_F_HAS_RECORDS);
	if (st) {
		/* Every attempt starts from the records as set: a refused or
		 * failed one changes nothing the next one sees. */
		st->flags &= ~RW_F_REDIRECTED;
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
			rw_count(RW_CNT_DELIVER);
			rw_emit(RW_EV_DELIVER, 0, &st->rec, 0, 0, conf->hop_limit);
		}
		return 1;
	}
	if (!st) {
		st = rw_storage_create(&rw_sk, sk, conf);
		if (!st) {
			if (r == RW_DELIVER)
				return 1; /* a linked flow whose chain is complete: it goes on as it is */
			/* Nothing passes unrecorded: refuse rather than let it through. */
			rw_report(RW_EV_INTERNAL, RW_CNT_NO_STORAGE, -ENOBUFS, 0, 0, &orig, IPPROTO_TCP,
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
			rw_count(RW_CNT_DELIVER);
			rw_emit(RW_EV_DELIVER, 0, &st->rec, 0, 0, conf->hop_limit);
		}
		return 1;
	}
	if (!has_rec && !c.linked) {
		rw_new_record(&st->rec, &orig, IPPROTO_TCP, c.w.cgroup_id, c.caller);
		st->rec.depth = c.depth;
	}
	rw_append(&st->rec, c.n, c.w.service_id);
	st->flags |= RW_F_REDIRECTED;
	st->service_id = c.w.service_id;
	st->rule_id = c.w.rule_id;
	st->redirected_ns = bpf_ktime_get_boot_ns();
	rw_ctx_target(ctx, family, &c.target);
	rw_count(RW_CNT_REDIRECT);
	rw_emit(RW_EV_REDIRECT, 0, &st->rec, c.w.service_id, c.w.rule_id, conf->hop_limit);
	return 1;
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
	int unbound;

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
#pragma unroll
		for (int i = 0; i < RW_UDP_SLOTS; i++) {
			sl = &u->slot[i];
			if (rw_slot_live(sl, now, conf) && rw_addr_eq(&sl->rec.orig_dst, &orig)) {
				sl->last_ns = now;
				if (sl->service_id) {
					rw_ctx_target(ctx, family, &sl->target);
					if (unbound)
						rw_ctx_set_src(ctx, family, &sl->target);
				}
				return 1;
			}
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
		u = rw_storage_create(&rw_udp_sk, sk, conf);
		if (!u) {
			rw_report(RW_EV_INTERNAL, RW_CNT_NO_STORAGE, -ENOBUFS, st, has_rec, &orig, IPPROTO_UDP,
				  c.w.service_id, c.w.rule_id);
			return rw_refuse(ENOBUFS);
		}
	}
#pragma unroll
	for (int i = 0; i < RW_UDP_SLOTS; i++) {
		sl = &u->slot[i];
		/* At connect, earlier flows end (if it succeeds; see below). */
		if (is_connect || !rw_slot_live(sl, now, conf)) {
			if (free < 0)
				free = i;
			continue;
		}
		if (r == RW_REDIRECT && sl->service_id == c.w.service_id) {
			__u16 k = bpf_ntohs(sl->target.port_be) - base;
			if (k < RW_MAX_UDP_PORTS)
				used |= 1u << k;
		}
	}
	/* A new flow an application starts (not one a proxy continues with
	 * its records): within its user's rate. */
	if (r == RW_REDIRECT && !has_rec && !rw_udp_rate_ok((__u32)bpf_get_current_uid_gid(), conf->udp_flows_per_user)) {
		rw_count(RW_CNT_UDP_RATE);
		return rw_refuse(EAGAIN);
	}
	if (r == RW_REDIRECT) {
		/* The source the proxy will see is known now for an unconnected
		 * send, or a bound socket's connect (a wildcard address is then
		 * routed; for a loopback service that is the service's). */
		int known = !is_connect || local.port_be;
		int k = -1;

#pragma unroll
		for (int i = 0; i < RW_MAX_UDP_PORTS; i++) {
			if (k >= 0 || i >= c.nports || (used & (1u << i)))
				continue;
			/* A proxy flow socket still connected to this source on this
			 * port (an earlier flow of a socket that reconnected or closed,
			 * whose proxy has not expired it yet) owns it. */
			c.target.port_be = bpf_htons(base + i);
			if (known && rw_udp_port_taken(ctx, &local, &c.target, unbound))
				continue;
			k = i;
		}
		if (k < 0) {
			/* Every port of the service carries a live flow of this socket. */
			rw_report(RW_EV_UDP_CONFLICT, RW_CNT_UDP_CONFLICT, -EADDRINUSE, st, has_rec, &orig,
				  IPPROTO_UDP, c.w.service_id, c.w.rule_id);
			return rw_refuse(EADDRINUSE);
		}
		c.target.port_be = bpf_htons(base + k);
		/* The first port was checked by rw_choose; the others too. */
		if (k && rw_owner_of(ctx, IPPROTO_UDP, &c.target, c.w.service_id) != RW_OWNER_SERVICE) {
			rw_report(RW_EV_IMPOSTOR, RW_CNT_IMPOSTOR, -ECONNREFUSED, st, has_rec, &orig, IPPROTO_UDP,
				  c.w.service_id, c.w.rule_id);
			return rw_refuse(ECONNREFUSED);
		}
	}
	if (free < 0) {
		rw_report(RW_EV_UDP_CONFLICT, RW_CNT_UDP_CONFLICT, -ENOBUFS, st, has_rec, &orig, IPPROTO_UDP,
			  c.w.service_id, c.w.rule_id);
		return rw_refuse(ENOBUFS);
	}
	/* Forget the flows this one replaces: a connected socket's earlier one;
	 * idle ones with the same destination or service port, so a late reply
	 * can only be matched to this flow. */
	if (is_connect) {
		rw_udp_forget(u, free);
	} else {
#pragma unroll
		for (int i = 0; i < RW_UDP_SLOTS; i++) {
			sl = &u->slot[i];
			if (i != free && sl->rec.magic == RW_MAGIC && !rw_slot_live(sl, now, conf) &&
			    (rw_addr_eq(&sl->target, &c.target) || rw_addr_eq(&sl->rec.orig_dst, &orig)))
				sl->rec.magic = 0;
		}
	}
	sl = &u->slot[free & (RW_UDP_SLOTS - 1)];
	if (has_rec && st)
		sl->rec = st->rec;
	else {
		rw_new_record(&sl->rec, &orig, IPPROTO_UDP, c.w.cgroup_id, c.caller);
		sl->rec.depth = c.depth;
	}
	sl->target = c.target;
	__builtin_memset(&sl->src, 0, sizeof(sl->src));
	sl->published = 0;
	sl->tag = bpf_get_prandom_u32() | 1;
	sl->last_ns = now;
	sl->redirected_ns = now;
	sl->service_id = r == RW_REDIRECT ? c.w.service_id : 0;
	sl->rule_id = c.w.rule_id;
	if (r == RW_DELIVER) {
		rw_count(RW_CNT_DELIVER);
		rw_emit(RW_EV_DELIVER, 0, &sl->rec, 0, 0, conf->hop_limit);
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
	rw_count(RW_CNT_REDIRECT);
	rw_emit(RW_EV_REDIRECT, 0, &sl->rec, c.w.service_id, c.w.rule_id, conf->hop_limit);
	return 1;
}

static __always_inline int rw_connect(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_conf *conf = rw_get_conf();

	if (!conf || !conf->n_rules || !ctx->sk)
		return 1;
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
 * proxy from that source were checked against the entry's tag on arrival;
 * another flow's records must not take its place). With `want` (the tag a
 * datagram's mark proved), only that flow: the slot may be rewritten
 * meanwhile by its socket's own hooks (a new flow), so the tag is read
 * before and after the copy. A global function: its value's stack (168
 * bytes) is not added to its callers' (cgroup_skb/ingress is near the
 * verifier's 512-byte limit). */
__attribute__((noinline)) int rw_udp_handoff_put(const struct rw_tuple *key, struct rw_udp_slot *sl, __u32 want)
{
	struct rw_udp_handoff v = {};

	if (!key || !sl)
		return 0;
	v.s.tag = *(volatile __u32 *)&sl->tag;
	asm volatile("" ::: "memory");
	v.s.flags = RW_F_ACCEPTED;
	v.s.service_id = sl->service_id;
	v.s.rule_id = sl->rule_id;
	v.s.redirected_ns = sl->redirected_ns;
	v.s.rec = sl->rec;
	asm volatile("" ::: "memory");
	if (want && (v.s.tag != want || *(volatile __u32 *)&sl->tag != want))
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
 * service's own processes bound (rw_owner, cloned from the listener). The
 * hand-off is keyed by 4-tuple alone, and a 4-tuple is unique only within a
 * namespace: in a private one (`unshare -rn`) anybody can listen on the
 * service's address and connect from a pending flow's source port. */
static __always_inline int rw_handoff_claimable(struct bpf_sock_ops *skops, struct bpf_sock *sk, __u16 sid)
{
	struct rw_conf *conf = rw_get_conf();
	struct rw_owner *o;

	if (!conf)
		return 0;
	if (conf->netns_cookie && bpf_get_netns_cookie(skops) != conf->netns_cookie)
		return 0;
	o = bpf_sk_storage_get(&rw_owner, sk, 0, 0);
	return o && o->service_id == sid;
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

/* A side door opens (`open`, on a connection accepted without a hand-off
 * on a socket a service's process bound) or closes: counted in the
 * service's rw_svc_state until the connection closes. */
static __always_inline void rw_side_door(struct bpf_sock_ops *skops, struct bpf_sock *sk, int open)
{
	struct rw_svc_state *s;
	struct rw_svc_sock *o;
	__u32 k;

	o = bpf_sk_storage_get(&rw_svc_sock, sk, 0, 0);
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

SEC("sockops")
int rw_sock_ops(struct bpf_sock_ops *skops)
{
	struct rw_tuple t = {};
	struct rw_sock *st, *v;
	struct rw_conf *conf;
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
		st->cookie = bpf_get_socket_cookie(skops);
		if (bpf_map_update_elem(&rw_handoff, &t, st, BPF_NOEXIST)) {
			/* Full (or a stale twin): the proxy will find no records
			 * and refuse the connection; never a misattributed flow. */
			conf = rw_get_conf();
			rw_count(RW_CNT_HANDOFF_FULL);
			if (conf)
				rw_emit(RW_EV_HANDOFF_FULL, -ENOBUFS, &st->rec, st->service_id, st->rule_id,
					conf->hop_limit);
			return 1;
		}
		/* Watch the socket: its entry goes when it closes unaccepted. */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			return 1;
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
			rw_count(RW_CNT_HANDOFF_REFUSED);
			if (conf)
				rw_emit(RW_EV_HANDOFF_REFUSED, -EACCES, &v->rec, v->service_id, v->rule_id,
					conf->hop_limit);
			return 1;
		}
		rw_svc_handed(v->service_id, (__u32)v->rec.depth + v->rec.n_chain);
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

/* ---- a service's own sockets ----
 *
 * A socket bound to one of a service's addresses by one of that service's
 * processes is marked as the service's (cgroup/bind4,6): only such a socket receives the
 * service's flows (rw_owner_of), and only it may learn their records. A
 * socket bound there by anyone else stays unmarked, an impostor. */

static __always_inline int rw_mark_owner(struct bpf_sock *sk, const struct rw_addr *a)
{
	struct rw_conf *conf = rw_get_conf();
	struct rw_owner *o;
	__u16 *sid;

	if (!conf || !conf->n_rules)
		return 1;
	sid = bpf_map_lookup_elem(&rw_svc_addr, a);
	if (!sid || *sid != rw_caller_service())
		return 1;
	o = bpf_sk_storage_get(&rw_owner, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o)
		o->service_id = *sid;
	return 1;
}

/* At bind, before the kernel hashes the socket under its address (the
 * post_bind hook runs after, leaving a window in which a lookup finds the
 * socket unmarked). A bind that then fails leaves a mark that no lookup of
 * a service address can find. */
static __always_inline int rw_bind(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_svc_sock *o;
	struct rw_addr a;
	__u16 sid;

	if (!ctx->sk)
		return 1;
	/* Any TCP socket a service's process binds: what its listeners accept
	 * is the service's (side doors, rw_side_door). Unmarked, a side door
	 * would go unseen: no storage, no bind. */
	if (ctx->sk->protocol == IPPROTO_TCP) {
		sid = rw_caller_service();
		if (sid) {
			o = bpf_sk_storage_get(&rw_svc_sock, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (!o)
				return 0;
			o->service_id = sid;
		}
	}
	rw_ctx_addr(ctx, family, &a);
	return rw_mark_owner(ctx->sk, &a);
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

/* Whether a records call runs in the network namespace rewire serves:
 * records are never made or used elsewhere. */
static __always_inline int rw_home_netns(struct bpf_sockopt *ctx)
{
	struct rw_conf *conf = rw_get_conf();

	if (!conf || !conf->netns_cookie || bpf_get_netns_cookie(ctx) == conf->netns_cookie)
		return 1;
	rw_count(RW_CNT_FOREIGN_NETNS);
	return 0;
}

/* 0 if the socket is one rewire serves; otherwise the errno to report. */
static __always_inline int rw_check_socket(struct bpf_sock *sk)
{
	if (!sk)
		return EOPNOTSUPP;
	if (sk->family != AF_INET && sk->family != AF_INET6)
		return EOPNOTSUPP;
	if (sk->type == SOCK_STREAM && sk->protocol == IPPROTO_TCP)
		return 0;
	if (sk->type == SOCK_DGRAM && sk->protocol == IPPROTO_UDP)
		return 0;
	return EPROTOTYPE;
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
	if (!rw_sock_of_service(sk, v->s.service_id)) {
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
		r.tag = rw_tag(&r, conf);
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
		c.records.tag = rw_tag(&c.records, conf);
		__builtin_memcpy(p, &c, sizeof(c));
		RW_READ(ctx->optlen) = sizeof(c);
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
	if (!rw_allowed() || !rw_home_netns(ctx))
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
	    r.n_chain > RW_MAX_CHAIN || r.proto != sk->protocol)
		return rw_set_fail(EINVAL);
	if (rw_tag(&r, conf) != r.tag)
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

/* Every TCP socket a service's process creates is the service's (side
 * doors, rw_side_door): whatever it listens on, bound or not (listen()
 * without bind() picks a port where no bind hook runs), its accepted
 * connections carry the mark. Separate from rw_owner, which only the
 * service's own sockets on its configured addresses get (at bind). No
 * storage, no socket: an unmarked listener would hide its side doors. */
static __always_inline int rw_svc_sock_mark(struct bpf_sock *sk)
{
	struct rw_svc_sock *o;
	__u16 sid = rw_caller_service();

	if (!sid)
		return 1;
	o = bpf_sk_storage_get(&rw_svc_sock, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o) {
		bpf_set_retval(-ENOBUFS);
		return 0;
	}
	o->service_id = sid;
	return 1;
}

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
	rw_count(RW_CNT_PROTOCOL);
	r = bpf_map_lookup_elem(&rw_scratch, &zero);
	if (r) {
		__builtin_memset(r, 0, sizeof(*r));
		r->proto = proto > 255 ? 255 : proto;
		r->orig_dst.family = family;
		r->orig_dst.port_be = proto; /* reported as the protocol number */
		rw_emit(RW_EV_PROTOCOL, -EPROTONOSUPPORT, r, 0, 0, conf->hop_limit);
	}
	bpf_set_retval(-EPROTONOSUPPORT);
	return 0;
}

/* ---- UDP datagrams: only a flow's own sockets speak for it ----
 *
 * Nothing in a datagram names its flow except its addresses, and any local
 * process can send from any local address (IP_PKTINFO) on a port it bound
 * elsewhere. So every UDP flow gets a random tag; its datagrams carry it as
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
 * `sid`'s own and, if it is a proxy's flow socket, this flow's (`tag`): a
 * flow socket left from an earlier flow of the same source (a closed
 * client whose port this socket got) would drop the datagram, so the send
 * fails instead, visibly. (A global function: its lookup's stack is its own.) */
__attribute__((noinline)) int rw_udp_dst_owned(struct __sk_buff *skb, const struct rw_addr *src,
					      const struct rw_addr *dst, __u64 sid_tag)
{
	struct bpf_sock *r;
	struct rw_sock *st;
	__u32 sid = sid_tag >> 32, tag = (__u32)sid_tag;
	int ok;

	if (!skb || !src || !dst)
		return 0;
	r = rw_udp_receiver(skb, src, dst);
	if (!r)
		return 1; /* nobody: the datagram is dropped by the kernel (ICMP unreachable) */
	ok = rw_sock_of_service(r, sid);
	if (ok) {
		st = bpf_sk_storage_get(&rw_sk, r, 0, 0);
		if (st && (st->flags & RW_F_ACCEPTED) && st->tag && st->tag != tag && rw_sock_peer_is(r, src))
			ok = 0;
	}
	bpf_sk_release(r);
	return ok;
}

/* Whether the socket a reply of a proxy's flow socket (`src` -> `dst`)
 * reaches holds that flow (a slot with its `tag`): the application's
 * socket, or the previous proxy's onward socket. UDP address reuse checks
 * no owner: a socket of any user bound more specifically to the flow's
 * address, beside an application socket that set SO_REUSEADDR on the
 * wildcard, would take the reply, and sockets outside the subtree run no
 * ingress check of ours. Then the reply is dropped (the proxy's send
 * fails) and counted as an impostor. (A global function: its lookup's
 * stack is its own.) */
__attribute__((noinline)) int rw_udp_reply_owned(struct __sk_buff *skb, const struct rw_addr *src,
						const struct rw_addr *dst, __u32 tag)
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
			if (u->slot[i].rec.magic == RW_MAGIC && u->slot[i].tag == tag) {
				ok = 1;
				break;
			}
		}
	}
	bpf_sk_release(r);
	return ok;
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
		if (sl && sl->tag) {
			/* Every datagram, connected socket or not, goes only to the
			 * service's own socket: a proxy that died and an impostor
			 * that took its port get nothing (the send fails). */
			if (!rw_udp_dst_owned(skb, &src, &dst, ((__u64)sl->service_id << 32) | sl->tag)) {
				rw_count(RW_CNT_IMPOSTOR);
				return 0;
			}
			skb->mark = sl->tag;
			return 1;
		}
	}
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	if (st && (st->flags & RW_F_ACCEPTED) && st->tag) {
		/* A proxy's reply goes only to the flow's own socket. */
		if (!rw_udp_reply_owned(skb, &src, &dst, st->tag)) {
			rw_count(RW_CNT_IMPOSTOR);
			return 0;
		}
		skb->mark = st->tag;
	}
	return 1;
}

__attribute__((noinline)) int rw_forged(const struct rw_addr *src)
{
	struct rw_conf *conf = rw_get_conf();
	__u32 zero = 0;
	struct rw_records *r;

	rw_count(RW_CNT_UDP_FORGED);
	r = bpf_map_lookup_elem(&rw_scratch, &zero);
	if (r && src && conf) {
		__builtin_memset(r, 0, sizeof(*r));
		r->proto = IPPROTO_UDP;
		r->orig_dst = *src; /* reported: the address it claimed to come from */
		rw_emit(RW_EV_UDP_FORGED, 0, r, 0, 0, conf->hop_limit);
	}
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
		rw_count(RW_CNT_IMPOSTOR);
		return 0; /* never established with an impostor: the connect times out */
	}
	if (sk->protocol != IPPROTO_UDP || !rw_skb_udp(skb, &src, &dst))
		return 1;
	/* A proxy's flow socket: only its application's socket sends to it
	 * (a stray from another source is judged below, as at the listener). */
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	if (st && (st->flags & RW_F_ACCEPTED) && st->tag && rw_sock_peer_is(sk, &src))
		return skb->mark == st->tag ? 1 : rw_forged(&src);
	/* An application's socket: a datagram from a service address it has a
	 * flow with comes from that flow's proxy socket. */
	u = bpf_sk_storage_get(&rw_udp_sk, sk, 0, 0);
	if (u) {
		sl = rw_slot_of_target(u, &src);
		if (sl && sl->tag)
			return skb->mark == sl->tag ? 1 : rw_forged(&src);
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
	 * flow's application socket, with its tag (published already, or
	 * still in the sender's slot). */
	rw_udp_tuple(&key, &src, &dst);
	h = bpf_map_lookup_elem(&rw_udp_handoff, &key);
	if (h) {
		want = h->s.tag;
	} else {
		/* The socket a datagram back to `src` would reach: the sender. */
		struct bpf_sock *app = rw_udp_receiver(skb, &dst, &src);

		if (app) {
			u = bpf_sk_storage_get(&rw_udp_sk, app, 0, 0);
			if (u) {
				sl = rw_slot_of_target(u, &dst);
				if (sl) {
					want = sl->tag;
					/* Published now, by the datagram that proves
					 * whose flow it is (its mark is the slot's tag):
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
		rw_count(RW_CNT_UDP_NO_FLOW);
		return 0;
	}
	return 1;
}
