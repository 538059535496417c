/*
 * wsa.h's mirrors of the kernel ABI (REWIRE_WFP_ADDR, _RECORDS, _CONTEXT,
 * the states and sizes) against the one source, rewire_abi.h: every field
 * at the same offset with the same size, every constant the same value.
 * Compiled (not run) by crates/rewire-capi/tests/c_surface.rs
 * (`wsa_h_mirrors_the_kernel_abi`): any drift is a compile error naming
 * the field.
 */
#include <linux/types.h>
#include <stddef.h>
#include "../../crates/rewire-bpf/bpf/rewire_abi.h"
#include <rewire/wsa.h>

#define SAME(T1, f1, T2, f2)                                                        \
	_Static_assert(offsetof(T1, f1) == offsetof(T2, f2) &&                      \
			       sizeof(((T1 *)0)->f1) == sizeof(((T2 *)0)->f2),      \
		       #T1 "." #f1 " differs from " #T2 "." #f2)

SAME(REWIRE_WFP_ADDR, family, struct rw_addr, family);
SAME(REWIRE_WFP_ADDR, port_be, struct rw_addr, port_be);
SAME(REWIRE_WFP_ADDR, scope_id, struct rw_addr, scope_id);
SAME(REWIRE_WFP_ADDR, addr, struct rw_addr, addr);
_Static_assert(sizeof(REWIRE_WFP_ADDR) == sizeof(struct rw_addr), "address size");

SAME(REWIRE_WFP_RECORDS, magic, struct rw_records, magic);
SAME(REWIRE_WFP_RECORDS, version, struct rw_records, version);
SAME(REWIRE_WFP_RECORDS, n_chain, struct rw_records, n_chain);
SAME(REWIRE_WFP_RECORDS, proto, struct rw_records, proto);
SAME(REWIRE_WFP_RECORDS, depth, struct rw_records, depth);
SAME(REWIRE_WFP_RECORDS, flow_id, struct rw_records, flow_id);
SAME(REWIRE_WFP_RECORDS, orig_dst, struct rw_records, orig_dst);
SAME(REWIRE_WFP_RECORDS, pid, struct rw_records, pid);
SAME(REWIRE_WFP_RECORDS, uid, struct rw_records, uid);
SAME(REWIRE_WFP_RECORDS, gid, struct rw_records, gid);
SAME(REWIRE_WFP_RECORDS, origin_sel, struct rw_records, origin_sel);
SAME(REWIRE_WFP_RECORDS, cgroup_id, struct rw_records, cgroup_id);
SAME(REWIRE_WFP_RECORDS, comm, struct rw_records, comm);
SAME(REWIRE_WFP_RECORDS, created_ns, struct rw_records, created_ns);
SAME(REWIRE_WFP_RECORDS, chain, struct rw_records, chain);
SAME(REWIRE_WFP_RECORDS, mac, struct rw_records, mac);
_Static_assert(sizeof(REWIRE_WFP_RECORDS) == sizeof(struct rw_records), "records size");
_Static_assert(REWIRE_WFP_MAX_RECORDS_SIZE == sizeof(struct rw_records), "records maximum");

SAME(REWIRE_WFP_CONTEXT, magic, struct rw_context, magic);
SAME(REWIRE_WFP_CONTEXT, version, struct rw_context, version);
SAME(REWIRE_WFP_CONTEXT, state, struct rw_context, state);
SAME(REWIRE_WFP_CONTEXT, service_id, struct rw_context, service_id);
SAME(REWIRE_WFP_CONTEXT, rule_id, struct rw_context, rule_id);
SAME(REWIRE_WFP_CONTEXT, hop, struct rw_context, hop);
SAME(REWIRE_WFP_CONTEXT, redirected_ns, struct rw_context, redirected_ns);
SAME(REWIRE_WFP_CONTEXT, records, struct rw_context, records);
_Static_assert(sizeof(REWIRE_WFP_CONTEXT) == sizeof(struct rw_context), "context size");
_Static_assert(REWIRE_WFP_MAX_CONTEXT_SIZE == sizeof(struct rw_context), "context maximum");

_Static_assert(REWIRE_WFP_NOT_REDIRECTED == RW_STATE_NOT_REDIRECTED, "state");
_Static_assert(REWIRE_WFP_REDIRECTED_BY_SELF == RW_STATE_REDIRECTED_BY_SELF, "state");
_Static_assert(REWIRE_WFP_REDIRECTED_BY_OTHER == RW_STATE_REDIRECTED_BY_OTHER, "state");
_Static_assert(REWIRE_WFP_PREVIOUSLY_REDIRECTED_BY_SELF == RW_STATE_PREVIOUSLY_REDIRECTED_BY_SELF, "state");
