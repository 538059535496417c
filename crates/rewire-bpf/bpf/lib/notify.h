/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Events and counters: what user space learns of each decision. One reason
 * (RW_REASON_*, rewire_abi.h) names what happened; it is both the counter's
 * index and the event's kind.
 *
 * API: map rw_counters (per-CPU, indexed by reason), map rw_svc_counters
 * (per-CPU, the same reasons per service: index service id * RW_REASON_N +
 * reason), map rw_events (ring buffer of struct rw_event);
 * rw_count(reason) (a counter-only reason, globally), rw_count_svc(service,
 * reason) (globally and for the service), rw_notify(reason, err, rec,
 * service, ...) (count it and report it with a flow's records),
 * rw_deliver(rec, ...) (a flow delivered, counted under its chain's last
 * service), rw_report(reason, err, socket state, ...) (count and report a
 * refusal or a skip of a connect/send; a global function behind it,
 * rw_report_).
 */
#pragma once

#include "records.h"

/* Per-reason counters (index RW_REASON_*): exact even when events are dropped. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RW_REASON_N);
	__type(key, __u32);
	__type(value, __u64);
} rw_counters SEC(".maps");

/* The same reasons per service (what `rewire status` and /metrics show per
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

static __always_inline void rw_count(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&rw_counters, &reason);
	if (c)
		*c += 1;
}

/* Counts `reason` globally and for service_id (0, or an id out of range:
 * counted for no service). */
static __always_inline void rw_count_svc(__u32 service_id, __u32 reason)
{
	__u32 k;
	__u64 *c;

	rw_count(reason);
	if (service_id > RW_MAX_SERVICES || reason >= RW_REASON_N)
		service_id = 0;
	k = service_id * RW_REASON_N + reason;
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

/* The event of `reason` (use rw_notify or rw_report: they count it too). */
static __always_inline void rw_emit(__u32 reason, int err, const struct rw_records *rec,
				    __u16 service_id, __u16 rule_id, __u16 hop_limit)
{
	struct rw_event *e = bpf_ringbuf_reserve(&rw_events, sizeof(*e), 0);
	__u64 ug = bpf_get_current_uid_gid();

	if (!e) {
		rw_count(RW_REASON_EVENTS_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->kind = reason;
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

/* Counts `reason` (globally and for service_id) and reports it with the
 * flow's records `rec` (no event when `rec` is NULL). */
static __always_inline void rw_notify(__u32 reason, int err, const struct rw_records *rec, __u16 service_id,
				      __u16 rule_id, __u16 hop_limit)
{
	rw_count_svc(service_id, reason);
	if (rec)
		rw_emit(reason, err, rec, service_id, rule_id, hop_limit);
}

/* A flow with records delivered to its original destination: counted under
 * the last service of its chain, reported with no service. */
static __always_inline void rw_deliver(const struct rw_records *rec, __u16 hop_limit)
{
	rw_count_svc(rw_last_service(rec), RW_REASON_DELIVER);
	rw_emit(RW_REASON_DELIVER, 0, rec, 0, 0, hop_limit);
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
 * what = reason | (u32)err << 32,
 * ids = service_id | rule_id << 16 | proto << 32 | has_rec << 40. */
__attribute__((noinline)) int rw_report_(const struct rw_sock *st, const struct rw_addr *dst, __u64 what, __u64 ids)
{
	const struct rw_records *r;
	struct rw_conf *conf = rw_get_conf();

	if (!dst)
		return 0;
	r = rw_event_rec(st, (ids >> 40) & 1, dst, (ids >> 32) & 0xff);
	rw_notify(what & 0xff, (__s32)(what >> 32), conf ? r : 0, ids & 0xffff, (ids >> 16) & 0xffff,
		  conf ? conf->hop_limit : 0);
	return 0;
}

#define rw_report(reason_, err_, st_, has_rec_, dst_, proto_, sid_, rule_)                                   \
	({                                                                                                \
		rw_report_((st_), (dst_), (__u64)(reason_) | ((__u64)(__u32)(err_) << 32),                \
			   (__u64)(sid_) | ((__u64)(rule_) << 16) | ((__u64)(proto_) << 32) |             \
				   ((__u64)!!(has_rec_) << 40));                                          \
	})
