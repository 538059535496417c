/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * The two socket storage maps that hold the per-socket state (state.h),
 * declared once: the hooks write them (records.h: rw_sk, udp.h: rw_udp_sk),
 * the flows iterator (flows.bpf.c) reads them through the same pinned maps,
 * so its loader can reuse their descriptors only if the declarations match.
 *
 * API: maps rw_sk (struct rw_sock), rw_udp_sk (struct rw_udp_sock).
 */
#pragma once

#include "state.h"

/* A TCP socket's records and flags (application, proxy outbound, accepted). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct rw_sock);
} rw_sk SEC(".maps");

/* UDP flows of one socket (application or proxy outbound). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct rw_udp_sock);
} rw_udp_sk SEC(".maps");
