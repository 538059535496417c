/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Records and their MAC: the per-socket state that carries a flow's records,
 * the SipHash-2-4 MAC that makes a blob unforgeable, a new flow's records.
 *
 * API: map rw_sk (struct rw_sock per socket), map rw_scratch (per-CPU
 * records), rw_mac(rec, conf) (the MAC over the first RW_MAC_COVERS bytes),
 * rw_new_record, rw_append (a service joins the chain).
 */
#pragma once

#include "common.h"
#include "sock_storage.h"

/* Scratch records (too big for the 512-byte stack next to the rest). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_records);
} rw_scratch SEC(".maps");

/* ---- SipHash-2-4 over the first RW_MAC_COVERS bytes of a record ---- */

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                               \
	do {                                                                   \
		v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);      \
		v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                         \
		v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                         \
		v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);      \
	} while (0)

static __always_inline __u64 rw_mac(const struct rw_records *r, const struct rw_conf *conf)
{
	const __u64 *m = (const __u64 *)r;
	__u64 k0 = conf->key[0], k1 = conf->key[1];
	__u64 v0 = 0x736f6d6570736575ULL ^ k0;
	__u64 v1 = 0x646f72616e646f6dULL ^ k1;
	__u64 v2 = 0x6c7967656e657261ULL ^ k0;
	__u64 v3 = 0x7465646279746573ULL ^ k1;
	__u64 b = ((__u64)RW_MAC_COVERS) << 56;

#pragma unroll
	for (int i = 0; i < RW_MAC_COVERS / 8; i++) {
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

/* Appends this hop's service to a record. */
static __always_inline void rw_append(struct rw_records *rec, __u8 n, __u16 service_id)
{
	rec->chain[n & (RW_MAX_CHAIN - 1)] = service_id;
	rec->n_chain = n + 1;
}
