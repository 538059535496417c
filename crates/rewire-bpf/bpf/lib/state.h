/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * The per-socket state only the kernel keeps (the values of the socket
 * storage maps rw_sk and rw_udp_sk), without the maps: shared by the hooks
 * (records.h, udp.h) and the flows iterator (flows.bpf.c), which reads these
 * values and writes them out as struct rw_flow_rec (rewire_abi.h), so user
 * space never depends on this layout.
 *
 * API: RW_F_* (rw_sock.flags), struct rw_udp_slot, struct rw_udp_sock.
 */
#pragma once

#include "../rewire_abi.h"

/* rw_sock.flags (kernel only) */
#define RW_F_HAS_RECORDS 1u  /* outbound socket: a verified blob was set */
#define RW_F_REDIRECTED 2u   /* connect was redirected: getpeername lies, handoff on SYN */
#define RW_F_ACCEPTED 4u     /* accepted socket that received a flow record */
#define RW_F_LINK_LOST 8u    /* accepted socket queried when no link mark could be made: counted
			      * in its service's link_unrecorded until released */
#define RW_F_ACCEL 16u       /* hand-off entry: the connecting socket opted in to an
			      * accelerated leg (RW_OPT_ACCEL, lib/accel.h) */
#define RW_F_SVC_CONNECT 32u /* its redirected connect was made by a service's process
			      * (an accelerated leg starts only from such a connect) */
#define RW_F_ACCEL_IN 64u    /* one end of an accelerated leg (in rw_accel): never connects again */

/* One UDP flow of an application (or proxy outbound) socket. A datagram to
 * `rec.orig_dst` goes to `target`; a datagram from `target` is shown as
 * coming from `rec.orig_dst`. */
struct rw_udp_slot {
	struct rw_addr target; /* the service's address; the original destination if service_id == 0 */
	struct rw_addr src;    /* source address set on this flow's datagrams (unbound sockets); family 0: the socket's own */
	__u64 last_ns;         /* CLOCK_BOOTTIME of the last datagram either way */
	__u64 redirected_ns;
	__u16 service_id;      /* 0: records delivered to the original destination */
	__u16 rule_id;
	__u8 published;        /* a hand-off entry was made for it (by the listener or at close) */
	__u8 _pad[3];
	__u32 mark;            /* random, per flow: the packet mark its datagrams carry both
				* ways, checked on arrival (only the flow's own sockets send it) */
	__u32 _pad2;
	struct rw_records rec; /* magic == 0: free slot */
};

/* BPF_MAP_TYPE_SK_STORAGE value of a UDP socket. */
struct rw_udp_sock {
	struct rw_udp_slot slot[RW_UDP_SLOTS];
};

