/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * The decision shared by TCP and UDP: which service a connect or send goes
 * to, refusals counted and reported here.
 *
 * API: rw_bind_check (records may only go to their own destination),
 * rw_choose (walk, identity of the target, fail policy, hop limit).
 */
#pragma once

#include "link.h"

/* Records set on a socket may only take it to their own destination. */
static __always_inline int rw_bind_check(const struct rw_sock *st, int has_rec, const struct rw_addr *orig,
					 __u8 proto)
{
	if (has_rec && st && !rw_addr_eq(&st->rec.orig_dst, orig)) {
		rw_report(RW_REASON_MISMATCH, -EINVAL, st, has_rec, orig, proto, 0, 0);
		return -EINVAL;
	}
	return 0;
}

/* A global function, verified once on its own: inlined into the UDP path,
 * its walks and lookups multiplied the verifier's states past its limit. */
__attribute__((noinline)) int rw_choose(struct bpf_sock_addr *ctx, const struct rw_sock *st,
					const struct rw_addr *orig, struct rw_choice *c)
{
	struct rw_conf *conf = rw_get_conf();
	struct rw_service *svc;
	struct rw_walk w = {};
	int has_rec, verified = 0, r;
	__u8 proto;

	if (!ctx || !orig || !c || !conf)
		return -ENOENT;
	has_rec = c->has_rec && st;
	proto = c->proto;
	rw_match_addr(orig, &w.dst);
	w.proto = proto;
	w.n_rules = conf->n_rules;
	if (has_rec) {
		c->n = rw_walk_from(&w, &st->rec);
		c->depth = st->rec.depth;
	} else {
		/* No rule names this destination: nothing to look up. */
		if (!rw_walk_dst(&w)) {
			r = RW_PASS;
			goto out;
		}
		w.uid = (__u32)bpf_get_current_uid_gid();
		w.cgroup_id = bpf_get_current_cgroup_id();
		w.origin = conf->n_sel ? rw_origin_bits() : 0;
		/* A service's connect without records may serve any of its
		 * clients: its own uid and cgroup say nothing of whose flow it
		 * is, nor does a link (only the service's own records would), so
		 * no rule's uid or cgroup condition may narrow its walk. */
		c->caller = rw_service_of(w.cgroup_id, w.uid);
		w.any_origin = !!c->caller;
	}
	rw_walk(&w);
	if (!w.found) {
		r = has_rec ? RW_DELIVER : RW_PASS;
		goto out;
	}
	/* Only in the network namespace rewire serves: elsewhere (a user's
	 * own `unshare -rn`) nothing is redirected and no records are made. */
	if (conf->netns_cookie && bpf_get_netns_cookie(ctx) != conf->netns_cookie) {
		rw_report(RW_REASON_FOREIGN_NETNS, -EPERM, st, has_rec, orig, proto, w.service_id,
			  w.rule_id);
		r = -EPERM;
		goto out;
	}

	if (!has_rec) {
		/* A service's own connect without records (it does not carry
		 * them): it continues the flow it asked SO_ORIGINAL_DST of
		 * (linked); else, if every client it has came through the chain
		 * (no side door, see rw_svc_quiet), after that service; else
		 * through the whole chain again without it. Never back into it.
		 * UDP side doors are not tracked: UDP continues after it.
		 * (c->caller was found before the first walk.) */
		if (c->caller) {
			__u32 sid = c->caller;
			if (proto != IPPROTO_TCP || !rw_link_peek(orig, c, &w)) {
				svc = bpf_map_lookup_elem(&rw_services, &sid);
				if (svc && (proto != IPPROTO_TCP || svc->continue_unlinked ||
					    rw_svc_quiet(sid, bpf_ktime_get_boot_ns()))) {
					w.seen |= svc->upto_mask;
				} else {
					w.seen |= 1ULL << (sid & 63);
					rw_count_svc(sid, RW_REASON_SIDE_DOOR);
				}
				c->n = 1;
				c->depth = rw_svc_depth(sid);
			}
			if (w.seen & (1ULL << (w.service_id & 63))) {
				rw_walk(&w);
				if (!w.found) {
					r = c->linked ? RW_DELIVER : RW_PASS;
					goto out;
				}
			}
		}
	}

	/* The hop limit holds whichever service would come next. */
	if ((__u32)c->n + c->depth >= conf->hop_limit || c->n >= RW_MAX_CHAIN) {
		rw_report(RW_REASON_HOP_LIMIT, -ELOOP, st, has_rec, orig, proto, w.service_id, w.rule_id);
		r = -ELOOP;
		goto out;
	}

	for (int i = 0; i <= RW_MAX_SKIPS; i++) {
		int owner;
		__u32 reason;

		if (verified || !w.found)
			break;
		svc = rw_service_addr(w.service_id, w.dst.family, &c->target, &c->nports);
		if (!svc) {
			r = -ENOENT;
			goto out;
		}
		if (w.dst.family == AF_INET ? svc->has_v4 : svc->has_v6)
			owner = rw_owner_of(ctx, proto, &c->target, w.service_id);
		else
			owner = RW_OWNER_NONE; /* no listener of this family */
		if (owner == RW_OWNER_SERVICE) {
			verified = 1;
			break;
		}
		reason = owner == RW_OWNER_NONE ? RW_REASON_NO_LISTENER : RW_REASON_IMPOSTOR;
		if (!svc->fail_open || i == RW_MAX_SKIPS) {
			rw_report(reason, -ECONNREFUSED, st, has_rec, orig, proto, w.service_id, w.rule_id);
			r = -ECONNREFUSED;
			goto out;
		}
		/* fail = "open": the flow goes on down the chain without it. */
		rw_report(reason, 0, st, has_rec, orig, proto, w.service_id, w.rule_id);
		rw_count_svc(w.service_id, RW_REASON_FAIL_OPEN_SKIP);
		w.seen |= 1ULL << (w.service_id & 63);
		rw_walk(&w);
	}
	r = verified ? RW_REDIRECT : (has_rec || c->linked) ? RW_DELIVER : RW_PASS;
out:
	c->w = w;
	return r;
}
