/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Services and their identity: a service's addresses, who its processes are,
 * which sockets are its own (marked at bind), who holds its address now, its
 * side doors and recent depth.
 *
 * API: maps rw_services, rw_svc_addr, rw_svc_id, rw_owner, rw_made_cg, rw_svc_state,
 * rw_svc_sock; rw_service_addr, rw_caller_service, rw_sock_of_service,
 * rw_sk_made_by_service, rw_owner_of (RW_OWNER_*), rw_svc_quiet, rw_svc_depth, rw_bind (the bind
 * hook's logic), rw_svc_sock_mark (a TCP socket a service's process made).
 */
#pragma once

#include "addr.h"
#include "kernel_cgroup.h"

/* A socket opened by one of a service's processes and bound to one of its
 * addresses (rw_owner SK_STORAGE value): only such sockets receive its flows. */
struct rw_owner {
	__u16 service_id;
	__u16 _pad[3];
};

/* Per service (array rw_svc_state, index = service id): its side doors, TCP
 * connections accepted on a socket one of its processes bound that came with
 * no hand-off (a forward-proxy or admin port, a direct connection), and the
 * deepest of the flows handed to it recently. A service is quiet when no
 * side door is open and none opened or closed within RW_SIDE_DOOR_QUIET_NS:
 * only then is its record-less onward connect linked to a flow it queried,
 * or continued after it. */
#define RW_SIDE_DOOR_QUIET_NS (30ULL * 1000000000ULL)
struct rw_svc_state {
	__u32 side_open;  /* side-door connections open now */
	__u32 link_unrecorded; /* queried sockets not released yet that rw_link had no
				* room for: while any is, no connect of the service is
				* linked (one of them may be waiting) */
	__u64 side_ns;    /* CLOCK_BOOTTIME of the last side-door open or close (0: never) */
	__u64 depth_ns;   /* when `depth` was last raised */
	__u8 depth;       /* deepest (depth + chain length) of a flow handed to it within
			   * RW_SIDE_DOOR_QUIET_NS of depth_ns */
	__u8 _pad2[7];
	__u64 link_live;  /* queried sockets of the service not released yet (low 32
			   * bits) | RW_LIVE_AMBIGUOUS (two or more were live at once
			   * since the count was last 0): a connect is linked only
			   * when this is exactly 1 (rw_link_live_one) */
};
#define RW_LIVE_AMBIGUOUS (1ULL << 32)
/* SK_STORAGE value (map rw_svc_sock, cloned to accepted sockets) of a TCP
 * socket a service's process bound: its listeners' connections are its. */
struct rw_svc_sock {
	__u16 service_id;
	__u8 side_door; /* an accepted connection counted in side_open until it closes */
	__u8 _pad[5];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RW_MAX_SERVICES + 1);
	__type(key, __u32);
	__type(value, struct rw_service);
} rw_services SEC(".maps");

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

/* SK_STORAGE value (map rw_made_cg) of an IPv4 UDP socket bound to a
 * service's address by a process that was not (yet) the service's: the
 * cgroup id of the task that bound it. rw_sk_cgroup_id reads it where the
 * kernel's own record of the socket's cgroup cannot be read (no cast to an
 * IPv4 UDP socket in these hooks), so a unit restarted under a cover whose
 * proxy bound before the daemon wrote the unit's new id is still known by
 * its cgroup once the id is there. Nothing else writes it. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} rw_made_cg SEC(".maps");

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

/* ---- service identity ---- */

/* Whether cgroup id `cg` (kind 0) or uid `id` (kind 1) may be in
 * rw_svc_id, by the filters in rw_conf: a clear bit says that no service
 * has it (user space sets the bit before it writes the id), so the lookup,
 * a hash table's cold lines at every connect and TCP socket of the
 * subtree, is left out. Unfilled filters (0) let everything be looked up. */
static __always_inline int rw_svc_may(__u32 kind, __u64 id)
{
	struct rw_conf *conf = rw_get_conf();
	__u32 f;

	if (!conf)
		return 1;
	f = conf->svc_ids;
	if (!(f & RW_SVC_IDS_FILLED))
		return 1;
	return !!(f & (kind == 0 ? RW_SVC_CG_BIT(id) : RW_SVC_UID_BIT((__u32)id)));
}

/* The service of a process in cgroup `cgroup_id` with uid `uid` (its
 * cgroup <subtree>/services/<name>, or its configured uid), or 0. A global
 * function: its branches are verified once, not in every caller's paths. */
__attribute__((noinline)) int rw_service_of(__u64 cgroup_id, __u32 uid)
{
	struct rw_ident_key k = { .kind = 0, .id = cgroup_id };
	__u16 *sid;

	if (rw_svc_may(0, cgroup_id)) {
		sid = bpf_map_lookup_elem(&rw_svc_id, &k);
		if (sid)
			return *sid;
	}
	if (!rw_svc_may(1, uid))
		return 0;
	k.kind = 1;
	k.id = uid;
	sid = bpf_map_lookup_elem(&rw_svc_id, &k);
	return sid ? *sid : 0;
}

/* The service whose process is running, or 0. */
static __always_inline __u16 rw_caller_service(void)
{
	return rw_service_of(bpf_get_current_cgroup_id(), (__u32)bpf_get_current_uid_gid());
}

/* The service whose process is running when only its uid says so (its
 * cgroup is no service's), or 0: what a TCP socket it makes or binds must
 * be marked with (rw_svc_sock). A socket made in a service's cgroup needs
 * no mark: the kernel records that cgroup in it (sk_cgrp_data, copied to
 * every connection its listener accepts) and rw_side_door asks it of an
 * accepted connection that has no mark (rw_sk_made_by_service), as the
 * table has it then. The uid is the one thing the socket does not keep. */
static __always_inline __u16 rw_caller_service_by_uid(void)
{
	struct rw_ident_key k = { .kind = 0, .id = bpf_get_current_cgroup_id() };
	__u16 *sid;

	if (rw_svc_may(0, k.id) && bpf_map_lookup_elem(&rw_svc_id, &k))
		return 0;
	k.kind = 1;
	k.id = (__u32)bpf_get_current_uid_gid();
	if (!rw_svc_may(1, k.id))
		return 0;
	sid = bpf_map_lookup_elem(&rw_svc_id, &k);
	return sid ? *sid : 0;
}

/* The kernel's view of a socket's cgroup (kernel_cgroup.h, read through
 * BTF). A socket made in the root cgroup, or by the kernel, reads that
 * cgroup's id, never a service's. */

/* The id of the cgroup `sk` was made in (sk_cgrp_data), or 0 where it
 * cannot be read: a TCP socket (any family) or an IPv6 UDP one. The
 * connect and sendmsg hooks have no bpf_sk_cgroup_id, and the only casts
 * to a kernel socket they have (bpf_skc_to_*) exist for those two; an
 * IPv4 UDP socket reads 0 here (rw_sk_made_by_service asks rw_made_cg). */
static __always_inline __u64 rw_sk_cgroup_id(struct bpf_sock *sk)
{
	struct sock *k = (struct sock *)bpf_skc_to_tcp_sock(sk);
	struct cgroup *cg;

	if (!k)
		k = (struct sock *)bpf_skc_to_udp6_sock(sk);
	if (!k)
		return 0;
	cg = k->sk_cgrp_data.cgroup;
	if (!cg)
		return 0;
	return cg->kn->id;
}

/* The service whose cgroup (`rw_svc_id`, kind 0, as it is now) the socket
 * `sk` was made in, or 0. The kernel records the making task's cgroup in
 * every socket at its creation (sk_cgrp_data; an accepted connection gets
 * its listener's) and nothing changes it after, so this asks the current
 * table, not a mark cached at bind: a service unit restarted (cgroup made
 * again, new id) whose process made its socket before the daemon wrote
 * the new id is known as the service's from the moment the id is there.
 * Only processes in the service's cgroup make sockets there (moving one in
 * takes root or the cgroup's delegate, who is trusted like the service). */
static __always_inline __u16 rw_sk_made_by_service(struct bpf_sock *sk)
{
	struct rw_ident_key k = { .kind = 0 };
	__u64 *made;
	__u16 *sid;

	k.id = rw_sk_cgroup_id(sk);
	if (!k.id) {
		/* IPv4 UDP: the binding task's cgroup, kept at bind (rw_made_cg).
		 * Read here, apart from the kernel's record above, so that the
		 * compiler cannot merge a load through a map value with one
		 * through a kernel pointer (the verifier refuses that). */
		made = bpf_sk_storage_get(&rw_made_cg, sk, 0, 0);
		if (!made)
			return 0;
		k.id = *(volatile __u64 *)made;
		if (!k.id)
			return 0;
	}
	sid = bpf_map_lookup_elem(&rw_svc_id, &k);
	return sid ? *sid : 0;
}

/* Whether `sk` is one of service `sid`'s own sockets by its mark alone
 * (marked at bind). For the getsockopt hook, which has no cast to a kernel
 * socket: the flow sockets it asks about are bound after the flow was
 * handed over, so with the service's current cgroup id in the table. */
static __always_inline int rw_sock_marked_of_service(struct bpf_sock *sk, __u32 sid)
{
	struct rw_owner *o = bpf_sk_storage_get(&rw_owner, sk, 0, 0);

	return o && o->service_id == sid;
}

/* Whether `sk`, found on one of service `sid`'s addresses (or holding one
 * of its flows), is one of its own sockets: marked at bind (rw_mark_owner)
 * or, unmarked, made in the service's cgroup as the table has it now
 * (rw_sk_made_by_service). A socket marked for another service is not. */
static __always_inline int rw_sock_of_service(struct bpf_sock *sk, __u32 sid)
{
	struct rw_owner *o = bpf_sk_storage_get(&rw_owner, sk, 0, 0);

	if (o)
		return o->service_id == sid;
	return sid && rw_sk_made_by_service(sk) == sid;
}

#define RW_OWNER_NONE 0     /* nothing listens there */
#define RW_OWNER_SERVICE 1  /* a socket the service's own processes bound */
#define RW_OWNER_IMPOSTOR 2 /* somebody else's socket */

/* Who holds the service address `t` for `proto`: the socket a connection or
 * datagram to it would reach right now. */
__attribute__((noinline)) int rw_owner_of(struct bpf_sock_addr *ctx, __u32 proto, const struct rw_addr *t, __u32 sid)
{
	struct bpf_sock_tuple tup;
	struct rw_owner *o;
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
	o = bpf_sk_storage_get(&rw_owner, s, 0, 0);
	if (o) {
		r = o->service_id == sid ? RW_OWNER_SERVICE : RW_OWNER_IMPOSTOR;
	} else if (sid && rw_sk_made_by_service(s) == sid) {
		/* Made in the service's cgroup before the daemon wrote its
		 * unit's new id (so the bind hook did not mark it): marked now,
		 * before this flow's first segment or datagram reaches it, so
		 * its accepted connections carry the mark (cloned) and the UDP
		 * ingress check treats it as the service's listener. */
		o = bpf_sk_storage_get(&rw_owner, s, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (o)
			o->service_id = sid;
		r = RW_OWNER_SERVICE;
	} else {
		r = RW_OWNER_IMPOSTOR;
	}
	bpf_sk_release(s);
	return r;
}

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
	__u64 *made;

	if (!conf || !conf->n_rules)
		return 1;
	sid = bpf_map_lookup_elem(&rw_svc_addr, a);
	if (!sid)
		return 1;
	if (*sid != rw_caller_service()) {
		/* Not the service's (or not yet: its unit re-made, the daemon not
		 * caught up). An IPv4 UDP socket keeps who bound it: see rw_made_cg. */
		if (sk->family == AF_INET && sk->protocol == IPPROTO_UDP) {
			made = bpf_sk_storage_get(&rw_made_cg, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (made)
				*made = bpf_get_current_cgroup_id();
		}
		return 1;
	}
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
	 * of a service known by its uid would go unseen: no storage, no bind.
	 * (One known by its cgroup: the socket's cgroup says it, see
	 * rw_caller_service_by_uid.) */
	if (ctx->sk->protocol == IPPROTO_TCP) {
		/* A service known by its uid, or a socket that was not made in
		 * the binding service's cgroup (made before its process joined
		 * it, or passed in): its cgroup would not say the service. */
		sid = rw_caller_service();
		if (sid && rw_sk_made_by_service(ctx->sk) != sid) {
			o = bpf_sk_storage_get(&rw_svc_sock, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (!o)
				return 0;
			o->service_id = sid;
		}
	}
	rw_ctx_addr(ctx, family, &a);
	return rw_mark_owner(ctx->sk, &a);
}

/* Every TCP socket a service's process creates is the service's (side
 * doors, rw_side_door): whatever it listens on, bound or not (listen()
 * without bind() picks a port where no bind hook runs), its accepted
 * connections are known as the service's. By the socket's own cgroup when
 * the service is known by its cgroup (nothing to do here: no storage made
 * for each of a proxy's onward sockets, none cloned into each connection
 * its listener accepts); by this mark, carried into the accepted
 * connections, when it is known by its uid. Separate from rw_owner, which
 * only the service's own sockets on its configured addresses get (at
 * bind). No storage, no socket: an unmarked listener would hide its side
 * doors. */
static __always_inline int rw_svc_sock_mark(struct bpf_sock *sk)
{
	struct rw_svc_sock *o;
	__u16 sid = rw_caller_service_by_uid();

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
