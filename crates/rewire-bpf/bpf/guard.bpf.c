// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * The borrowed-socket guard: a process inside the managed subtree must not
 * connect or send with a socket made outside it.
 *
 * A socket belongs to the cgroup it was created in, and the kernel runs the
 * cgroup programs of the *socket's* cgroup. A socket taken from a process
 * outside the subtree (pidfd_getfd, SCM_RIGHTS, ptrace, inherited) runs none
 * of rewire's hooks, whoever uses it. These programs are attached at an
 * ancestor of the subtree (the config's `guard`), so they run for sockets
 * of every cgroup below it, and judge by the *calling* process:
 *
 *   caller inside the subtree, socket made outside it -> EPERM, event
 *   reason RW_REASON_BORROWED (event and counter)
 *   anything else -> allowed, untouched
 *
 * A caller outside the subtree costs one map lookup and one helper call;
 * only a caller inside looks at the socket's cgroup. A service's processes
 * (<subtree>/services/<name>) are trusted as in the hooks and keep sockets
 * they were given (systemd socket activation).
 *
 * What it cannot see: a borrowed socket that its owner had already
 * connected sends with no sock_addr hook at all (send/write on a connected
 * socket), so it still carries data; see SECURITY.md.
 *
 * The socket's cgroup is read through the kernel's own context
 * (bpf_cast_to_kern_ctx, then BTF pointer loads): sock_addr programs have
 * no helper for a socket's cgroup. A separate object from rewire.bpf.c
 * because it is attached elsewhere and loaded with libbpf (kfunc calls,
 * which aya does not resolve). It shares rw_counters and rw_events with
 * the hooks (the loader hands it their descriptors).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "subtree.h"

#define AF_INET 2
#define AF_INET6 10

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct bpf_sock_addr_kern {
	struct sock *sk;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

static __always_inline void rw_guard_report(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_event *e = rw_borrowed_event();

	if (!e)
		return;
	e->proto = ctx->protocol;
	e->orig_dst.family = family;
	e->orig_dst.port_be = (__u16)ctx->user_port;
	if (family == AF_INET) {
		__u32 ip = ctx->user_ip4;
		__builtin_memcpy(e->orig_dst.addr, &ip, 4);
	} else {
		__u32 a[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
		__builtin_memcpy(e->orig_dst.addr, a, 16);
	}
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int rw_guard(struct bpf_sock_addr *ctx, __u8 family)
{
	struct rw_guard_conf *conf = rw_caller_inside();
	struct bpf_sock_addr_kern *kctx;
	struct sock *sk;

	if (!conf)
		return 1; /* a caller outside the subtree, or a service's: none of our business */
	kctx = bpf_cast_to_kern_ctx(ctx);
	sk = kctx->sk;
	if (!sk)
		return 1;
	if (rw_cgroup_in(sk->sk_cgrp_data.cgroup, conf->level, conf->subtree_id))
		return 1; /* made inside: rewire's own hooks judge it */
	rw_guard_report(ctx, family);
	bpf_set_retval(-EPERM);
	return 0;
}

SEC("cgroup/connect4")
int rw_guard_connect4(struct bpf_sock_addr *ctx)
{
	return rw_guard(ctx, AF_INET);
}

SEC("cgroup/connect6")
int rw_guard_connect6(struct bpf_sock_addr *ctx)
{
	return rw_guard(ctx, AF_INET6);
}

SEC("cgroup/sendmsg4")
int rw_guard_sendmsg4(struct bpf_sock_addr *ctx)
{
	return rw_guard(ctx, AF_INET);
}

SEC("cgroup/sendmsg6")
int rw_guard_sendmsg6(struct bpf_sock_addr *ctx)
{
	return rw_guard(ctx, AF_INET6);
}
