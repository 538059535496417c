/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * The scope id of an IPv6 link-local destination, passed from the scope
 * program (scope.bpf.c, a separate object run first) to the hooks in the
 * same call: kernel only, both objects include this header.
 *
 * API: struct rw_scope_stash (value of the per-CPU map rw_scope).
 */
#pragma once

#include "../rewire_abi.h"

/* The scope id of the IPv6 link-local address a connect6/sendmsg6 names,
 * passed from the scope program (scope.bpf.c, run first) to the hooks in
 * the same call, per CPU (map rw_scope). */
struct rw_scope_stash {
	__u64 cookie; /* the socket's cookie; 0 = nothing */
	__u32 scope_id;
	__u32 _pad;
};
