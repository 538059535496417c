/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * What the borrowed-socket boundary's two objects (guard.bpf.c, the cgroup
 * guard at an ancestor; lsm.bpf.c, the BPF LSM) share: their configuration
 * (where the managed subtree is), the hooks' counters and events they
 * report into, the kernel structures they read (relocated against the
 * running kernel's BTF), "is this cgroup inside the subtree", "is the
 * caller a subtree process that is not a service's", and the `borrowed`
 * refusal report. Both are loaded with libbpf, not aya (kfuncs, LSM).
 */
#ifndef RW_SUBTREE_H
#define RW_SUBTREE_H

#include "rewire_abi.h"

#define EPERM 1

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_guard_conf);
} rw_guard_conf SEC(".maps");

/* The hooks' maps, same definitions (the loader reuses their descriptors). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_REASON_N);
	__type(key, __u32);
	__type(value, __u64);
} rw_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} rw_events SEC(".maps");

/* The kernel structures read, relocated against the running kernel's BTF. */
#include "lib/kernel_cgroup.h"

/* cgroup depth is bounded by cgroup.max.depth; 64 levels below the subtree
 * is far more than any layout uses. A cgroup deeper than that is taken as
 * outside (refused), never as inside. */
#define RW_GUARD_MAX_DEPTH 64

/* 1 when `cg` is the cgroup `id` at depth `level` or below it. */
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

/* The conf when the calling task is inside the subtree and not a service's
 * (services are trusted, as in the hooks); 0 otherwise. The common case, a
 * caller outside, costs one map lookup and one helper call. */
static __always_inline struct rw_guard_conf *rw_caller_inside(void)
{
	__u32 k = 0;
	struct rw_guard_conf *conf = bpf_map_lookup_elem(&rw_guard_conf, &k);

	if (!conf || !conf->subtree_id)
		return 0;
	if (bpf_get_current_ancestor_cgroup_id(conf->level) != conf->subtree_id)
		return 0;
	if (conf->services_id && bpf_get_current_ancestor_cgroup_id(conf->level + 1) == conf->services_id)
		return 0;
	return conf;
}

/* Counts a `borrowed` refusal and reserves its event, filled with the
 * caller's identity; the caller adds what it knows and submits. 0 when the
 * ring buffer is full (counted as lost). */
static __always_inline struct rw_event *rw_borrowed_event(void)
{
	__u32 idx = RW_REASON_BORROWED;
	__u64 *c = bpf_map_lookup_elem(&rw_counters, &idx);
	struct rw_event *e;

	if (c)
		*c += 1;
	e = bpf_ringbuf_reserve(&rw_events, sizeof(*e), 0);
	if (!e) {
		idx = RW_REASON_EVENTS_LOST;
		c = bpf_map_lookup_elem(&rw_counters, &idx);
		if (c)
			*c += 1;
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = RW_REASON_BORROWED;
	e->err = -EPERM;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->ts_ns = bpf_ktime_get_boot_ns();
	return e;
}

#endif
