/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Accelerated legs between proxies: the TCP connection from one proxy's
 * onward socket (B1) to the next proxy's accepted socket (A2), on this
 * host, carries its bytes socket to socket with sk_msg
 * (bpf_msg_redirect_hash, BPF_F_INGRESS: B1's sendmsg queues them straight
 * on A2's psock ingress list, and back the same way) instead of through
 * two TCP stacks. Application sockets and the last leg (to the real
 * destination) never enter the map.
 *
 * Who enters the sockhash rw_accel (only sockops inserts):
 *   - an onward socket made (or bound) by a service's process, at
 *     ACTIVE_ESTABLISHED, that its service opted in (RW_OPT_ACCEL, set
 *     before connect) and whose connect, made by a service's process
 *     (RW_F_SVC_CONNECT), was redirected to a service (RW_F_REDIRECTED:
 *     the SYN-ACK came from that service's own listener, lib/tcp.h), i.e.
 *     the leg goes to the next proxy;
 *   - a socket accepted at PASSIVE_ESTABLISHED that claimed its hand-off
 *     (the service's own socket), from an onward socket that opted in, on
 *     a listener that opted in (its rw_accel_sk value is cloned).
 * Keys: network namespace cookie, family, local and remote address and
 * port. The verdict program redirects only to the key of its own socket's
 * peer (the addresses swapped, the same namespace): an established 4-tuple
 * is unique in a namespace, so the target is the flow's own next socket.
 * A socket stays in the map until it closes (not when it disconnects), so
 * the two ends are also paired by socket cookie (the accepted end knows
 * its connecting socket's from the hand-off): a 4-tuple used again while
 * an old socket holds the key is not the pair. An end of a leg never
 * connects again (RW_F_ACCEL_IN, refused in connect4).
 *
 * Byte order. A2's recvmsg (tcp_bpf_recvmsg) reads its psock queue before
 * the TCP receive queue. So a direction may always go from redirect back
 * to TCP (redirected bytes are read first, and were sent first), but from
 * TCP to redirect only when the TCP path is empty: everything B1 wrote on
 * TCP acknowledged (snd_una == write_seq) and read by proxy 2
 * (A2.copied_seq == B1.write_seq). That also covers data in a SYN (TCP
 * Fast Open) and a peer that is not there yet (TCP_DEFER_ACCEPT: not in
 * the map, stays on TCP).
 *
 * Memory. Redirected bytes are charged to A2 only against the global TCP
 * memory: no per-socket bound. Ours: when A2's psock holds msg_tot_len
 * bytes and this message would take it past rw_conf.accel_bound, the
 * message and the direction go on TCP (bounded by the socket buffers as
 * any TCP flow), until the TCP path is empty again. A kernel whose
 * struct sk_psock has no msg_tot_len never accelerates.
 *
 * API: maps rw_accel, rw_accel_sk, rw_accel_peer, rw_accel_cnt; rw_accel_optin (the
 * setsockopt), rw_accel_inserted (the getsockopt), rw_accel_active,
 * rw_accel_passive (sockops), rw_accel_verdict (the sk_msg program's logic).
 */
#pragma once

#include <bpf/bpf_core_read.h>

#include "service.h"
#include "sockopt.h"

/* Smallest message redirected onto a non-empty queue (see rw_accel_verdict). */
#define RW_ACCEL_MIN_MSG 4096

struct rw_accel_key {
	__u64 netns;
	__u32 family;
	__u16 lport; /* host order */
	__u16 rport; /* host order */
	__u32 laddr[4];
	__u32 raddr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16384);
	__type(key, struct rw_accel_key);
	__type(value, __u64);
} rw_accel SEC(".maps");

#define RW_ACCEL_DIR_TCP 0
#define RW_ACCEL_DIR_REDIRECT 1

/* SK_STORAGE value: a service's opt-in (on its listener, cloned to what it
 * accepts; on its onward socket) and, once inserted, the direction of the
 * socket's sends. Apart from rw_sk so that only this small value is cloned. */
struct rw_accel_sock {
	__u8 opted;
	__u8 inserted;
	__u8 dir; /* RW_ACCEL_DIR_*, of this socket's sends */
	__u8 _pad[5];
	__u64 self; /* this socket's cookie, once inserted */
	__u64 peer; /* the accepted end: its connecting socket's cookie (hand-off) */
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct rw_accel_sock);
} rw_accel_sk SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_ACCEL_N);
	__type(key, __u32);
	__type(value, __u64);
} rw_accel_cnt SEC(".maps");

/* What the verdict reads of its peer: the peer's kernel address (a
 * number, read only with bpf_probe_read_kernel) and socket cookie. A
 * sockhash lookup from sk_msg returns a referenced socket that sk_msg may
 * not release (no bpf_sk_release for this program type), so the socket
 * that enters rw_accel also leaves its address here, keyed alike. The
 * address is checked against the cookie at every read (a freed socket's
 * memory reused by another reads another cookie); the target of a
 * redirect is never taken from here but from rw_accel itself. LRU: an
 * entry of a closed socket goes when room is needed; a live entry lost
 * that way leaves its peer on TCP. An LRU is preallocated (about 2 MB
 * for these 16,384 entries, made once: a state map kept across restarts),
 * as many as the sockhash holds (8,192 legs). */
struct rw_accel_addr {
	__u64 sk;
	__u64 cookie;
	__u64 peer; /* the accepted end: the cookie of the socket it is paired with */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct rw_accel_key);
	__type(value, struct rw_accel_addr);
} rw_accel_peer SEC(".maps");

/* The kernel's TCP socket and psock, as far as read here (CO-RE). */
struct tcp_sock {
	__u32 snd_una;
	__u32 write_seq;
	__u32 copied_seq;
} __attribute__((preserve_access_index));
struct sk_psock {
	__u32 msg_tot_len;
} __attribute__((preserve_access_index));

static __always_inline void rw_accel_count(__u32 what, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(&rw_accel_cnt, &what);

	if (c)
		*c += n;
}

/* setsockopt(RW_SOL, RW_OPT_ACCEL, int): a service's own TCP socket,
 * listening or not yet connected. The caller checked rw_allowed,
 * rw_home_netns and the conf. */
static __noinline int rw_accel_optin(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct rw_accel_sock *a;
	struct rw_svc_sock *o;
	__u16 sid = rw_caller_service();
	void *p = ctx->optval, *end = ctx->optval_end;
	int v;

	if (!sk)
		return rw_set_fail(EOPNOTSUPP);
	if (sk->protocol != IPPROTO_TCP)
		return rw_set_fail(EPROTOTYPE);
	/* A service's process (its cgroup or its uid), on a socket that is
	 * not marked as another service's. That the socket was made by a
	 * service is checked again where it can be, at its insertion (this
	 * hook has no cast to a kernel socket to read its cgroup). */
	o = bpf_sk_storage_get(&rw_svc_sock, sk, 0, 0);
	if (!sid || (o && o->service_id != sid)) {
		rw_accel_count(RW_ACCEL_REFUSED, 1);
		return rw_set_fail(EPERM);
	}
	if (sk->state != BPF_TCP_CLOSE && sk->state != BPF_TCP_LISTEN) {
		rw_accel_count(RW_ACCEL_REFUSED, 1);
		return rw_set_fail(EISCONN);
	}
	if (ctx->optlen != (int)sizeof(int) || p + sizeof(int) > end)
		return rw_set_fail(EINVAL);
	v = *(int *)p;
	if (v != 0 && v != 1)
		return rw_set_fail(EINVAL);
	a = bpf_sk_storage_get(&rw_accel_sk, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!a)
		return rw_set_fail(ENOBUFS);
	a->opted = v;
	ctx->optlen = -1;
	return 1;
}

/* getsockopt(RW_SOL, RW_OPT_ACCEL): 1 when the socket is in the sockhash. */
static __always_inline int rw_accel_inserted(struct bpf_sock *sk)
{
	struct rw_accel_sock *a = bpf_sk_storage_get(&rw_accel_sk, sk, 0, 0);

	return a && a->inserted;
}

static __always_inline void rw_accel_key_ops(struct bpf_sock_ops *skops, struct rw_accel_key *k)
{
	k->netns = bpf_get_netns_cookie(skops);
	k->family = skops->family;
	k->lport = skops->local_port;
	k->rport = bpf_ntohl(skops->remote_port);
	if (skops->family == AF_INET) {
		k->laddr[0] = skops->local_ip4;
		k->raddr[0] = skops->remote_ip4;
	} else {
		k->laddr[0] = skops->local_ip6[0]; k->laddr[1] = skops->local_ip6[1];
		k->laddr[2] = skops->local_ip6[2]; k->laddr[3] = skops->local_ip6[3];
		k->raddr[0] = skops->remote_ip6[0]; k->raddr[1] = skops->remote_ip6[1];
		k->raddr[2] = skops->remote_ip6[2]; k->raddr[3] = skops->remote_ip6[3];
	}
}

static __noinline int rw_accel_insert(struct bpf_sock_ops *skops, struct rw_accel_sock *a, __u64 peer)
{
	struct rw_accel_key k = {};

	if (!skops || !a)
		return 0;
	struct rw_accel_addr pa = {};
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return 0;
	rw_accel_key_ops(skops, &k);
	a->dir = RW_ACCEL_DIR_TCP;
	if (bpf_sock_hash_update(skops, &rw_accel, &k, BPF_NOEXIST))
		return 0;
	a->inserted = 1;
	/* Privileged programs may keep an address as a number (read back
	 * with bpf_probe_read_kernel only). Written once the socket is in
	 * the map under this key, so an entry never names another socket
	 * than the one the map holds there; until it is written, the peer
	 * sends over TCP. */
	pa.sk = (__u64)sk;
	pa.cookie = bpf_get_socket_cookie(skops);
	pa.peer = peer;
	a->self = pa.cookie;
	a->peer = peer;
	bpf_map_update_elem(&rw_accel_peer, &k, &pa, BPF_ANY);
	rw_accel_count(RW_ACCEL_INSERTED, 1);
	return 1;
}

/* ACTIVE_ESTABLISHED: an onward socket that opted in and was redirected to
 * a service (the leg to the next proxy). One storage lookup for every
 * other connecting socket. */
static __always_inline void rw_accel_active(struct bpf_sock_ops *skops, struct bpf_sock *sk)
{
	struct rw_accel_sock *a = bpf_sk_storage_get(&rw_accel_sk, sk, 0, 0);
	struct rw_sock *st;

	struct rw_svc_sock *o;

	if (!a || !a->opted)
		return;
	st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
	/* Connected by a service's process (RW_F_SVC_CONNECT, lib/tcp.h): a
	 * socket a service made and opted in, then handed to an application
	 * that connects with it, stays out (attack s9, F3). */
	if (!st || !(st->flags & RW_F_REDIRECTED) || !(st->flags & RW_F_SVC_CONNECT) || !st->service_id)
		return;
	/* Made by a service's process: its cgroup's, or marked (by uid). An
	 * application's socket never enters the map, even one a service
	 * opted in after it was handed the descriptor. */
	o = bpf_sk_storage_get(&rw_svc_sock, sk, 0, 0);
	if (!(o && o->service_id) && !rw_sk_made_by_service(sk))
		return;
	if (rw_accel_insert(skops, a, 0))
		st->flags |= RW_F_ACCEL_IN;
}

/* The connecting socket's opt-in, carried in its hand-off entry (flags). */
static __always_inline __u32 rw_accel_flag(struct bpf_sock *sk)
{
	struct rw_accel_sock *a = bpf_sk_storage_get(&rw_accel_sk, sk, 0, 0);

	return a && a->opted ? RW_F_ACCEL : 0;
}

/* PASSIVE_ESTABLISHED, after the hand-off was claimed: `from_accel` when
 * the connecting socket opted in; the accepted socket's own opt-in is its
 * listener's (cloned). */
static __always_inline void rw_accel_passive(struct bpf_sock_ops *skops, struct bpf_sock *sk, __u32 from_accel, __u64 peer)
{
	struct rw_accel_sock *a;
	struct rw_sock *st;

	if (!from_accel)
		return;
	a = bpf_sk_storage_get(&rw_accel_sk, sk, 0, 0);
	if (!a || !a->opted || !peer)
		return;
	if (rw_accel_insert(skops, a, peer)) {
		st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);
		if (st)
			st->flags |= RW_F_ACCEL_IN;
	}
}

/* The peer's TCP state: bytes queued on its psock ingress list (the
 * socket is in the map: its sk_user_data is its psock) and its copied_seq.
 * 0 when read, -1 when not (then nothing is redirected to it). */
static __always_inline int rw_accel_peer_state(const struct rw_accel_addr *pa, __u32 *queued, __u32 *copied)
{
	__u64 sk = pa->sk, cookie = 0, ud = 0;

	if (!bpf_core_field_exists(struct sk_psock, msg_tot_len))
		return -1;
	if (bpf_probe_read_kernel(&cookie, sizeof(cookie), (void *)(sk + bpf_core_field_offset(struct sock, __sk_common.skc_cookie))) ||
	    cookie != pa->cookie)
		return -1;
	if (bpf_probe_read_kernel(&ud, sizeof(ud), (void *)(sk + bpf_core_field_offset(struct sock, sk_user_data))))
		return -1;
	ud &= ~7ULL; /* SK_USER_DATA_{NOCOPY,BPF,PSOCK} */
	if (!ud)
		return -1;
	if (bpf_probe_read_kernel(queued, sizeof(*queued), (void *)(ud + bpf_core_field_offset(struct sk_psock, msg_tot_len))))
		return -1;
	if (bpf_probe_read_kernel(copied, sizeof(*copied), (void *)(sk + bpf_core_field_offset(struct tcp_sock, copied_seq))))
		return -1;
	return 0;
}

/* Goes (or stays) on TCP: counted. */
static __always_inline int rw_accel_tcp(struct rw_accel_sock *a, __u32 size, int bound_hit)
{
	if (a->dir == RW_ACCEL_DIR_REDIRECT) {
		a->dir = RW_ACCEL_DIR_TCP;
		rw_accel_count(RW_ACCEL_FALLBACKS, 1);
	}
	if (bound_hit)
		rw_accel_count(RW_ACCEL_BOUND, 1);
	rw_accel_count(RW_ACCEL_TCP_BYTES, size);
	return SK_PASS;
}

static __noinline int rw_accel_verdict(struct sk_msg_md *msg)
{
	struct rw_accel_key k = {};
	struct rw_accel_addr *pa;
	struct rw_accel_sock *a;
	struct tcp_sock *me;
	struct bpf_sock *sk;
	struct rw_conf *conf;
	__u32 size, bound, queued = 0, copied = 0;

	if (!msg)
		return SK_PASS;
	sk = msg->sk;
	size = msg->size;
	if (!sk)
		return SK_PASS;
	a = bpf_sk_storage_get(&rw_accel_sk, sk, 0, 0);
	if (!a)
		return SK_PASS;
	conf = rw_get_conf();
	bound = conf ? conf->accel_bound : 0;
	/* The peer's key: this socket's, the ends swapped. */
	k.netns = bpf_get_netns_cookie(msg);
	k.family = msg->family;
	k.lport = bpf_ntohl(msg->remote_port);
	k.rport = msg->local_port;
	if (msg->family == AF_INET) {
		k.laddr[0] = msg->remote_ip4;
		k.raddr[0] = msg->local_ip4;
	} else {
		k.laddr[0] = msg->remote_ip6[0]; k.laddr[1] = msg->remote_ip6[1];
		k.laddr[2] = msg->remote_ip6[2]; k.laddr[3] = msg->remote_ip6[3];
		k.raddr[0] = msg->local_ip6[0]; k.raddr[1] = msg->local_ip6[1];
		k.raddr[2] = msg->local_ip6[2]; k.raddr[3] = msg->local_ip6[3];
	}
	pa = bpf_map_lookup_elem(&rw_accel_peer, &k);
	/* The entry must be this socket's own peer, not a closed socket
	 * still in the map under a 4-tuple used again: the accepted end
	 * knows its connecting socket's cookie (hand-off), and its entry
	 * names it. */
	if (pa && (!a->self || (a->peer ? pa->cookie != a->peer : pa->peer != a->self)))
		pa = 0;
	if (!pa || rw_accel_peer_state(pa, &queued, &copied))
		return rw_accel_tcp(a, size, 0);
	if ((__u64)queued + size > bound)
		return rw_accel_tcp(a, size, 1);
	/* Every queued message also holds a struct sk_msg (about 1 KiB of
	 * kernel memory, charged to no socket): a message smaller than
	 * RW_ACCEL_MIN_MSG is redirected only onto an empty queue, so a
	 * queue holds at most one of them per sending thread (the kernel
	 * queues after it let go of the sender's lock; under global TCP
	 * memory pressure a partial hand-over may queue one more piece) and
	 * the memory one stalled direction holds stays near bound * (1 +
	 * 1 KiB / RW_ACCEL_MIN_MSG), whatever the sizes of its writes
	 * (attack s9, F1). */
	if (queued && size < RW_ACCEL_MIN_MSG)
		return rw_accel_tcp(a, size, 1);
	if (a->dir != RW_ACCEL_DIR_REDIRECT) {
		/* From TCP only when the TCP path is empty: all this socket
		 * wrote on TCP acknowledged and read by the peer's proxy. */
		me = bpf_skc_to_tcp_sock(sk);
		if (!me)
			return rw_accel_tcp(a, size, 0);
		if (me->snd_una != me->write_seq || copied != me->write_seq)
			return rw_accel_tcp(a, size, 0);
		a->dir = RW_ACCEL_DIR_REDIRECT;
		rw_accel_count(RW_ACCEL_SWITCHES, 1);
	}
	if (bpf_msg_redirect_hash(msg, &rw_accel, &k, BPF_F_INGRESS) != SK_PASS)
		/* Not in the map (closing, or never inserted): TCP, always in order. */
		return rw_accel_tcp(a, size, 0);
	rw_accel_count(RW_ACCEL_BYTES, size);
	return SK_PASS;
}
