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
 *   RW_EV_BORROWED, counter RW_CNT_BORROWED
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

#include "rewire_abi.h"

#define EPERM 1
#define AF_INET 2
#define AF_INET6 10

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Mirrored by rewire_control::guard::GuardConf. */
struct rw_guard_conf {
	__u64 subtree_id;  /* cgroup id of the managed subtree; 0 = off */
	__u64 services_id; /* cgroup id of <subtree>/services (0: none) */
	__u32 level;       /* the subtree's depth (root = 0) */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_guard_conf);
} rw_guard_conf SEC(".maps");

/* The hooks' maps, same definitions (the loader reuses their descriptors). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_CNT_N);
	__type(key, __u32);
	__type(value, __u64);
} rw_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} rw_events SEC(".maps");

/* The kernel structures read, relocated against the running kernel's BTF. */
struct kernfs_node {
	__u64 id;
} __attribute__((preserve_access_index));
struct cgroup;
struct cgroup_subsys_state {
	struct cgroup *cgroup;
	struct cgroup_subsys_state *parent;
} __attribute__((preserve_access_index));
struct cgroup {
	struct cgroup_subsys_state self;
	int level;
	struct kernfs_node *kn;
} __attribute__((preserve_access_index));
struct sock_cgroup_data {
	struct cgroup *cgroup;
} __attribute__((preserve_access_index));
struct sock {
	struct sock_cgroup_data sk_cgrp_data;
} __attribute__((preserve_access_index));
struct bpf_sock_addr_kern {
	struct sock *sk;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

/* cgroup depth is bounded by cgroup.max.depth; 64 levels below the subtree
 * is far more than any layout uses. A socket deeper than that is taken as
 * outside (refused), never as inside. */
#define RW_GUARD_MAX_DEPTH 64

static __always_inline int rw_cgroup_in(struct cgroup *cg, __u32 level, __u64 id)
{
	for (int i = 0; i < RW_GUARD_MAX_DEPTH; i++) {
		struct cgroup_subsys_state *parent;
		int l;

		if (!cg)
			return 0;
		l = cg->level;
		if (l < (int)level)
			return 0;
		if (l == (int)level) {
			struct kernfs_node *kn = cg->kn;
			return kn && kn->id == id;
		}
		parent = cg->self.parent;
		if (!parent)
			return 0;
		cg = parent->cgroup;
	}
	return 0;
}

static __always_inline void rw_guard_report(struct bpf_sock_addr *ctx, __u8 family)
{
	__u32 idx = RW_CNT_BORROWED;
	__u64 *c = bpf_map_lookup_elem(&rw_counters, &idx);
	struct rw_event *e;
	__u64 ug = bpf_get_current_uid_gid();

	if (c)
		*c += 1;
	e = bpf_ringbuf_reserve(&rw_events, sizeof(*e), 0);
	if (!e) {
		idx = RW_CNT_EVENTS_LOST;
		c = bpf_map_lookup_elem(&rw_counters, &idx);
		if (c)
			*c += 1;
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = RW_EV_BORROWED;
	e->err = -EPERM;
	e->proto = ctx->protocol;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->uid = (__u32)ug;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->ts_ns = bpf_ktime_get_boot_ns();
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
	__u32 k = 0;
	struct rw_guard_conf *conf = bpf_map_lookup_elem(&rw_guard_conf, &k);
	struct bpf_sock_addr_kern *kctx;
	struct sock *sk;

	if (!conf || !conf->subtree_id)
		return 1;
	/* The common case: a caller outside the subtree is none of our business. */
	if (bpf_get_current_ancestor_cgroup_id(conf->level) != conf->subtree_id)
		return 1;
	kctx = bpf_cast_to_kern_ctx(ctx);
	sk = kctx->sk;
	if (!sk)
		return 1;
	if (rw_cgroup_in(sk->sk_cgrp_data.cgroup, conf->level, conf->subtree_id))
		return 1; /* made inside: rewire's own hooks judge it */
	if (conf->services_id && bpf_get_current_ancestor_cgroup_id(conf->level + 1) == conf->services_id)
		return 1; /* a service's process (trusted, as in the hooks) */
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
