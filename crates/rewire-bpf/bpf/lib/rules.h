/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * The rule walk and the choice it feeds: rules in configured order, the
 * first matching service not yet in the flow's chain.
 *
 * API: map rw_rules, struct rw_walk, rw_walk_from (continue a flow's
 * records), rw_walk (bpf_loop over the rules), the decision's outcomes
 * RW_PASS/RW_DELIVER/RW_REDIRECT and struct rw_choice.
 */
#pragma once

#include "addr.h"
#include "select.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RW_MAX_RULES);
	__type(key, __u32);
	__type(value, struct rw_rule);
} rw_rules SEC(".maps");

/* ---- the rule walk ---- */

struct rw_walk {
	struct rw_addr dst; /* the destination as the rules see it */
	__u64 seen; /* bit per service id already in the chain */
	__u64 cgroup_id;
	__u32 uid;
	__u32 origin; /* the origin's selectors (rw_sel bits, select.h) */
	__u16 rule_id;
	__u8 service_id; /* 1..RW_MAX_SERVICES (63) */
	__u8 n_rules;    /* at most RW_MAX_RULES (64) */
	/* (56 bytes in all: it is on the stack of rw_choose and, in rw_choice,
	 * of the UDP path, whose combined frames are at the verifier's 512) */
	__u8 proto;
	__u8 found;
	__u8 any_dst; /* a broadcast/multicast send: every rule's destination
		       * applies, and only a rule that does not let it pass is found */
	__u8 any_origin; /* the origin is not proven (a service's connect without
			  * records of its own): uid and cgroup conditions match;
			  * RW_WALK_DST_ONLY: see rw_walk_dst */
};

/* rw_walk.any_origin of rw_walk_dst: only the destination (family, protocol,
 * port, address) is matched; no origin condition, no chain. */
#define RW_WALK_DST_ONLY 2

/* The walk continues the flow of `rec`: its chain's services are seen,
 * its origin is the one rules match on. Returns the chain's length. */
static __always_inline __u8 rw_walk_from(struct rw_walk *w, const struct rw_records *rec)
{
	__u8 n = rec->n_chain;

#pragma unroll
	for (int i = 0; i < RW_MAX_CHAIN; i++)
		if (i < n)
			w->seen |= 1ULL << (rec->chain[i] & 63);
	w->uid = rec->uid;
	w->cgroup_id = rec->cgroup_id;
	w->origin = rec->origin_sel;
	return n;
}

static long rw_walk_rule(__u32 i, void *data)
{
	struct rw_walk *w = data;
	struct rw_rule *r;
	__u32 k = i;
	const __u32 *d = (const __u32 *)w->dst.addr;
	__u16 port;

	if (i >= w->n_rules)
		return 1;
	r = bpf_map_lookup_elem(&rw_rules, &k);
	if (!r || !r->service_id)
		return 0;
	if (r->family && r->family != w->dst.family)
		return 0;
	if (r->proto && r->proto != w->proto)
		return 0;
	port = bpf_ntohs(w->dst.port_be);
	if (port < r->port_lo || port > r->port_hi)
		return 0;
	/* An unproven origin may be anybody's: a rule scoped to a user or
	 * cgroup takes it rather than let that user's flow pass unseen. */
	if (r->has_uid && !w->any_origin && r->uid != w->uid)
		return 0;
	if (r->has_cgroup && !w->any_origin && r->cgroup_id != w->cgroup_id)
		return 0;
	if (r->sel && !w->any_origin && !rw_sel_match(r->sel, w->origin))
		return 0;
	if (w->any_dst) {
		/* One datagram to many receivers reaches whatever any rule's
		 * destination names; a rule that lets it pass is no objection. */
		if (r->flags & RW_RULE_BROADCAST_PASS)
			return 0;
	} else {
		const __u32 *a = (const __u32 *)r->addr, *m = (const __u32 *)r->mask;
		if ((d[0] & m[0]) != a[0] || (d[1] & m[1]) != a[1] || (d[2] & m[2]) != a[2] ||
		    (d[3] & m[3]) != a[3])
			return 0;
	}
	/* Already in the chain: REDIRECTED_BY_SELF or PREVIOUSLY_REDIRECTED_BY_SELF. */
	if (w->any_origin != RW_WALK_DST_ONLY && (w->seen & (1ULL << (r->service_id & 63))))
		return 0;
	/* NOT_REDIRECTED or REDIRECTED_BY_OTHER: take it. (A service with no
	 * listener of this family is not skipped: it has no listener for the
	 * flow, and its fail policy decides.) */
	w->found = 1;
	w->service_id = r->service_id;
	w->rule_id = r->rule_id;
	return 1;
}

static __always_inline void rw_walk(struct rw_walk *w)
{
	w->found = 0;
	bpf_loop(RW_MAX_RULES, rw_walk_rule, w, 0);
}

/* Whether any rule names `w->dst` for `w->proto` at all, whoever connects
 * (w->any_dst must be 0). Every rule rw_walk can find passes this walk's
 * checks (they are a subset of its own), so when it finds nothing neither
 * can rw_walk, with any origin or chain: a connect to a destination no rule
 * names is decided before the origin's identity is looked up (uid, cgroup,
 * selectors, the caller's service), which is the whole cost of the
 * unmatched. Leaves w->any_origin 0 and w->found 0. */
static __always_inline int rw_walk_dst(struct rw_walk *w)
{
	int found;

	w->any_origin = RW_WALK_DST_ONLY;
	rw_walk(w);
	found = w->found;
	w->any_origin = 0;
	w->found = 0;
	return found;
}

/* ---- the decision shared by TCP and UDP ----
 *
 * rw_choose walks the rules for a connect/send of a socket (that may carry
 * records) to `orig`, skipping the services already in the chain and, for a
 * service's own record-less connect, that service and every one before it;
 * it checks that the chosen service's address is held by the service's own
 * socket and applies the service's fail policy when not; it checks the hop
 * limit. Refusals are counted and reported here. */

#define RW_PASS 0     /* not ours: the connect/send goes on untouched */
#define RW_DELIVER 1  /* records set, no service left: to the original destination */
#define RW_REDIRECT 2 /* to c->target, service c->w.service_id */
#define RW_MAX_SKIPS 4 /* services skipped under fail = "open" in one decision */

struct rw_choice {
	struct rw_walk w;
	struct rw_addr target; /* the chosen service's address */
	__u16 nports;          /* its UDP port range */
	__u16 caller;          /* the service making this connect, if any */
	__u8 n;                /* chain length before this hop */
	__u8 proto;            /* in: IPPROTO_TCP or IPPROTO_UDP */
	__u8 has_rec;          /* in: the socket carries records */
	__u8 linked;           /* the caller's connect continues a flow it queried (rw_link) */
	__u8 depth;            /* the flow's depth (rw_records.depth): counts towards the hop limit */
	__u8 _pad;
	__u64 link_flow;       /* that flow's id */
};
