/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * The private socket options' gatekeeping: who may ask, in which namespace,
 * on which socket.
 *
 * API: map rw_access; rw_allowed, rw_home_netns, rw_check_socket,
 * rw_set_fail (fail a setsockopt with -err).
 */
#pragma once

#include "notify.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct rw_access_key);
	__type(value, __u8);
} rw_access SEC(".maps");

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
	rw_count(RW_REASON_FOREIGN_NETNS);
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

static __always_inline int rw_set_fail(int err)
{
	bpf_set_retval(-err);
	return 0;
}
