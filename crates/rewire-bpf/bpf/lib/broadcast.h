/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Broadcast and multicast: one datagram to many receivers, which no proxy
 * can stand in for, is refused where a rule could apply.
 *
 * API: map rw_bcast; rw_is_fanout, rw_fanout.
 */
#pragma once

#include "notify.h"
#include "rules.h"

/* The host's directed broadcast addresses (IPv4, network order), read with
 * the interface addresses when the rules are loaded: a datagram to one of
 * them is delivered to many receivers, this host's included. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, RW_MAX_BROADCAST);
	__type(key, __u32);
	__type(value, __u8);
} rw_bcast SEC(".maps");

/* ---- broadcast and multicast ----
 *
 * A datagram to a broadcast or multicast address goes to many receivers at
 * once: hosts on the link and, through the kernel's loopback copy, this
 * host's own sockets (every address a rule can name, "local" included). No
 * proxy can stand in for all of them (it would receive it once, answer for
 * everyone, and its onward copy would go out as its own), so such a send
 * is never redirected: it is refused when any rule could apply to it (the
 * rule's protocol, port, family, uid and cgroup match; its destination
 * cannot be told apart), unless every such rule lets it pass
 * (`broadcast = "pass"`), and then it goes out as sent. */

/* Limited (255.255.255.255) and directed (rw_bcast) broadcast, IPv4
 * multicast (224.0.0.0/4), IPv6 multicast (ff00::/8, every scope). */
static __always_inline int rw_is_fanout(const struct rw_addr *a)
{
	__u32 ip4 = *(const __u32 *)a->addr;

	if (a->family == AF_INET6)
		return a->addr[0] == 0xff;
	if (ip4 == 0xffffffff || (a->addr[0] & 0xf0) == 0xe0)
		return 1;
	return bpf_map_lookup_elem(&rw_bcast, &ip4) != 0;
}

/* A UDP send or connect to `orig`: 0 when it is not a broadcast/multicast
 * destination (the usual decision follows), 1 when it is one that may pass
 * untouched (no rule applies, or every rule that does lets it pass),
 * -EPERM (counted, reported) when it is refused. A global function: the
 * verifier checks it once. */
__attribute__((noinline)) int rw_fanout(const struct rw_sock *st, const struct rw_addr *orig, __u32 has_rec)
{
	struct rw_conf *conf = rw_get_conf();
	struct rw_walk w = {};

	if (!orig || !conf || !rw_is_fanout(orig))
		return 0;
	w.dst = *orig;
	w.any_dst = 1;
	if (has_rec && st) {
		rw_walk_from(&w, &st->rec);
	} else {
		w.uid = (__u32)bpf_get_current_uid_gid();
		w.cgroup_id = bpf_get_current_cgroup_id();
		w.origin = rw_origin_bits();
	}
	w.proto = IPPROTO_UDP;
	w.n_rules = conf->n_rules;
	rw_walk(&w);
	if (!w.found)
		return 1;
	rw_report(RW_REASON_BROADCAST, -EPERM, st, has_rec, orig, IPPROTO_UDP, w.service_id, w.rule_id);
	return -EPERM;
}
