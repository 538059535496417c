/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * The kernel's cgroup and socket-cgroup structures, as far as rewire reads
 * them, relocated against the running kernel's BTF (CO-RE): a cgroup's id,
 * level and parent (the guard and LSM objects, subtree.h) and the cgroup a
 * socket was made in (the hooks, service.h). Declared once so that every
 * object reads the same fields the same way.
 *
 * API: struct kernfs_node, cgroup_subsys_state, cgroup, sock_cgroup_data,
 * sock (sk_cgrp_data; its cookie and sk_user_data for lib/accel.h).
 */
#pragma once

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
struct sock_common {
	struct {
		__s64 counter;
	} skc_cookie; /* atomic64_t */
} __attribute__((preserve_access_index));
struct sock {
	struct sock_common __sk_common;
	struct sock_cgroup_data sk_cgrp_data;
	void *sk_user_data; /* a sockmap member's psock, flags in the low bits (accel.h) */
} __attribute__((preserve_access_index));
