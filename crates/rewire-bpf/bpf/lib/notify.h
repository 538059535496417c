/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Events and counters: what user space learns of each decision.
 *
 * API: map rw_counters (per-CPU, RW_CNT_*), map rw_svc_counters (per-CPU,
 * the same causes per service: index service id * RW_CNT_N + cause; id 0
 * holds what no service is named for), map rw_events (ring buffer of
 * struct rw_event), rw_count(idx), rw_count_svc(service_id, idx) (both
 * counters), rw_emit(kind, ...), rw_report(...)
 * (count and report a refusal or a skip; a global function behind it,
 * rw_report_).
 */
#pragma once

#include "records.h"

/* Per-cause counters (RW_CNT_*): exact even when events are dropped. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_CNT_N);
	__type(key, __u32);
	__type(value, __u64);
} rw_counters SEC(".maps");

/* The same causes per service (what `rewire status` and /metrics show per
 * service): one add more per count, in a per-CPU slot. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_SVC_CNT_N);
	__type(key, __u32);
	__type(value, __u64);
} rw_svc_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} rw_events SEC(".maps");

static __always_inline void rw_count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&rw_counters, &idx);
	if (c)
		*c += 1;
}

/* Counts cause idx globally and for service_id (0, or an id out of range:
 * counted for no service). */
static __always_inline void rw_count_svc(__u32 service_id, __u32 idx)
{
	__u32 k;
	__u64 *c;

	rw_count(idx);
	if (service_id > RW_MAX_SERVICES || idx >= RW_CNT_N)
		service_id = 0;
	k = service_id * RW_CNT_N + idx;
	c = bpf_map_lookup_elem(&rw_svc_counters, &k);
	if (c)
		*c += 1;
}

/* The last service of a chain (the one that sent the flow on), 0 if none. */
static __always_inline __u32 rw_last_service(const struct rw_records *rec)
{
	__u8 n = rec->n_chain;

	if (n == 0 || n > RW_MAX_CHAIN)
		return 0;
	return rec->chain[(n - 1) & (RW_MAX_CHAIN - 1)];
}

static __always_inline void rw_emit(__u32 kind, int err, const struct rw_records *rec,
				    __u16 service_id, __u16 rule_id, __u16 hop_limit)
{
	struct rw_event *e = bpf_ringbuf_reserve(&rw_events, sizeof(*e), 0);
	__u64 ug = bpf_get_current_uid_gid();

	if (!e) {
		rw_count(RW_CNT_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = kind;
	e->err = err;
	e->flow_id = rec->flow_id;
	e->service_id = service_id;
	e->rule_id = rule_id;
	e->n_chain = rec->n_chain;
	e->proto = rec->proto;
	e->hop_limit = hop_limit;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->uid = (__u32)ug;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->orig_dst = rec->orig_dst;
	__builtin_memcpy(e->chain, rec->chain, sizeof(e->chain));
	bpf_ringbuf_submit(e, 0);
}

/* The records an event about a refused connect reports: the socket's, or a
 * fresh one in per-CPU scratch space. */
static __always_inline const struct rw_records *rw_event_rec(const struct rw_sock *st, int has_rec,
							     const struct rw_addr *dst, __u8 proto)
{
	__u32 zero = 0;
	struct rw_records *r;

	if (has_rec && st)
		return &st->rec;
	r = bpf_map_lookup_elem(&rw_scratch, &zero);
	if (r)
		rw_new_record(r, dst, proto, bpf_get_current_cgroup_id(), 0);
	return r;
}

/* Counts and reports a refusal (or a skip). A global function: the
 * verifier checks it once, not at each of its call sites; its scalars are
 * packed in two words (a global function takes at most five arguments, and
 * a struct on the caller's stack would cost stack in every caller):
 * what = kind | counter << 8 | (u32)err << 32,
 * ids = service_id | rule_id << 16 | proto << 32 | has_rec << 40. */
__attribute__((noinline)) int rw_report_(const struct rw_sock *st, const struct rw_addr *dst, __u64 what, __u64 ids)
{
	const struct rw_records *r;
	struct rw_conf *conf = rw_get_conf();

	if (!dst)
		return 0;
	rw_count_svc(ids & 0xffff, (what >> 8) & 0xff);
	r = rw_event_rec(st, (ids >> 40) & 1, dst, (ids >> 32) & 0xff);
	if (r && conf)
		rw_emit(what & 0xff, (__s32)(what >> 32), r, ids & 0xffff, (ids >> 16) & 0xffff, conf->hop_limit);
	return 0;
}

#define rw_report(kind_, counter_, err_, st_, has_rec_, dst_, proto_, sid_, rule_)                            \
	({                                                                                                \
		rw_report_((st_), (dst_),                                                                 \
			   (__u64)(kind_) | ((__u64)(counter_) << 8) | ((__u64)(__u32)(err_) << 32),      \
			   (__u64)(sid_) | ((__u64)(rule_) << 16) | ((__u64)(proto_) << 32) |             \
				   ((__u64)!!(has_rec_) << 40));                                          \
	})
