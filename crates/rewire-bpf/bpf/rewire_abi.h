/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * rewire ABI: what the kernel programs (rewire.bpf.c, guard.bpf.c,
 * lsm.bpf.c) and user space both read or write, and nothing else: socket
 * option numbers, redirect states, reasons (events and counters), the
 * blobs a proxy sees, the configuration tables, the keys and values of the
 * maps user space reads. State only the kernel keeps is in lib/ (socket
 * storage, per-service state) and may change freely.
 *
 * This header is the one source: crates/rewire/src/abi.rs is its Rust view,
 * and crates/rewire-bpf/tests/abi_drift.rs fails on any difference between
 * the two (every struct's size and field offsets, read from the BTF of this
 * header compiled; every constant, evaluated by the C compiler; the map key
 * and value types of the compiled object). The _Static_asserts at the end
 * pin the layout on the C side.
 *
 * Every integer is in host byte order except where the name says `_be`.
 * A `struct rw_records` is the opaque blob that proxies query from their
 * accepted socket and set on their outbound socket; its last field is a
 * SipHash-2-4 MAC under a key only the kernel programs know, so a blob that
 * was altered or truncated is refused by the set call.
 */
#ifndef REWIRE_ABI_H
#define REWIRE_ABI_H

#include <linux/types.h>

/* Private socket option level served by the cgroup sockopt programs. */
#define RW_SOL 0x5257 /* 'R' 'W' */
#define RW_OPT_RECORDS 1 /* get on accepted socket; set on outbound socket */
#define RW_OPT_CONTEXT 2 /* get on accepted socket */
#define RW_OPT_UDP_PEER 3 /* get on a proxy's UDP flow socket: a __u32, 1 when the
			   * flow's sending socket has closed (the flow is over) */
#define RW_OPT_ACCEL 4 /* set (an int, 1) by a service on its TCP listener or on its
			* onward socket before connect: the proxy reads the socket only
			* with recvmsg/read, non-blocking, so the leg to the next proxy may
			* be accelerated (sk_msg, lib/accel.h); get: an int, 1 when the
			* socket was put in the instance's sockhash */
/* UDP has no accept: a proxy "accepts" a flow by connecting a socket bound to
 * its service address to the datagram's source; the queries then work on that
 * connected socket exactly as on an accepted TCP socket. */

#define RW_MAGIC 0x5752
#define RW_VERSION 1

#define RW_MAX_CHAIN 16    /* hard cap on redirects of one flow */
#define RW_MAX_SERVICES 63 /* service ids 1..63 fit in a u64 bit mask */
#define RW_MAX_RULES 64
#define RW_DEFAULT_HOP_LIMIT 8
#define RW_UDP_SLOTS 8 /* live UDP flows one socket may have */
#define RW_MAX_UDP_PORTS 8 /* UDP listener ports of one service (base port .. base + n - 1) */
#define RW_DEFAULT_UDP_IDLE_MS 30000
#define RW_DEFAULT_UDP_FLOWS_PER_USER 2000 /* new UDP flows a second one user may start (burst: 2 s worth) */

/* Redirect states, as numbered by WFP (FWP_CONNECTION_REDIRECT_STATE). */
#define RW_STATE_NOT_REDIRECTED 0
#define RW_STATE_REDIRECTED_BY_SELF 1
#define RW_STATE_REDIRECTED_BY_OTHER 2
#define RW_STATE_PREVIOUSLY_REDIRECTED_BY_SELF 3

/* Reasons: what a hook did, or refused and why. One number drives both the
 * counter (index in the per-CPU array rw_counters, never loses a count) and,
 * for a reason that is reported, the event (rw_event.kind, ring buffer to
 * the daemon; a full ring buffer drops events and counts
 * RW_REASON_EVENTS_LOST). */
#define RW_REASON_REDIRECT 1 /* connect or send redirected to a service */
#define RW_REASON_DELIVER 2  /* a socket with records reached its original destination */
#define RW_REASON_HOP_LIMIT 3 /* refused: the flow would exceed the hop limit (ELOOP) */
#define RW_REASON_MISMATCH 4 /* refused: records belong to another destination (EINVAL) */
#define RW_REASON_UDP_CONFLICT 5 /* refused: the socket has a live flow to this service for
				  * another destination (EADDRINUSE) or no free slot (ENOBUFS) */
#define RW_REASON_NO_LISTENER 6 /* the chosen service has no listener: refused (err
				 * ECONNREFUSED, fail = "closed") or skipped (err 0, "open") */
#define RW_REASON_IMPOSTOR 7 /* the service's address is held by a socket that none of the
			      * service's processes opened: refused or skipped, as above;
			      * also counted (no event) for a datagram or TCP answer a
			      * flow's socket sent that would reach somebody else's socket */
#define RW_REASON_NO_STORAGE 8 /* refused: the hook could not keep the flow's state
				* (socket storage allocation failed: ENOBUFS); event "internal" */
#define RW_REASON_HANDOFF_FULL 9 /* the hand-off table is full: the proxy cannot claim this
				  * connection, so it gets no records and refuses it */
#define RW_REASON_FOREIGN_NETNS 10 /* refused: a redirect or a records call in a network
				    * namespace other than the one rewire was set up in (EPERM) */
#define RW_REASON_PROTOCOL 11 /* refused at socket creation: a transport rewire cannot
			       * redirect (UDP-Lite, SCTP, MPTCP, ...): EPROTONOSUPPORT */
#define RW_REASON_UDP_FORGED 12 /* dropped: a datagram claiming to belong to a UDP flow
				 * that its flow's own socket did not send */
#define RW_REASON_HANDOFF_REFUSED 13 /* refused: a socket not accepted on the service's own
				      * listener in rewire's namespace tried to take a pending
				      * TCP hand-off (same 4-tuple); the entry stays */
#define RW_REASON_FAIL_OPEN_SKIP 14 /* counter only: a service skipped under fail = "open" */
#define RW_REASON_EVENTS_LOST 15 /* counter only: an event the full ring buffer dropped */
#define RW_REASON_BORROWED 16 /* refused (EPERM): a process in the subtree connects or sends
			       * with a socket made outside it (taken with pidfd_getfd or
			       * SCM_RIGHTS); reported by the guard (guard.bpf.c, lsm.bpf.c) */
#define RW_REASON_BROADCAST 17 /* refused (EPERM): a UDP send or connect to a broadcast or
				* multicast address (one datagram to many receivers, which no
				* proxy can stand in for) that a rule could apply to */
#define RW_REASON_LINK 18 /* counter only: a record-less onward connect carried on the flow
			   * whose SO_ORIGINAL_DST its process queried (linking) */
#define RW_REASON_SIDE_DOOR 19 /* counter only: a service's record-less connect not linked, or
				* walked the whole chain again, because it had a side door */
#define RW_REASON_UDP_NO_FLOW 20 /* counter only: datagrams to a service's UDP socket that belong
				  * to no flow (no records: e.g. a flood from outside), dropped */
#define RW_REASON_UDP_RATE 21 /* counter only: new UDP flows refused (EAGAIN): their user
			       * started more than udp_flows_per_user a second */
#define RW_REASON_N 24 /* entries of rw_counters (index 0 and the rest unused) */
/* Per-service counters (per-CPU array rw_svc_counters): index
 * service_id * RW_REASON_N + reason, service ids 0..RW_MAX_SERVICES. */
#define RW_SVC_CNT_N ((RW_MAX_SERVICES + 1) * RW_REASON_N)




struct rw_addr {
	__u8 family; /* AF_INET or AF_INET6; 0 = unset */
	__u8 _pad;
	__u16 port_be;
	__u32 scope_id; /* IPv6 link-local: the interface the application named
			 * (sin6_scope_id), where the scope program could read it; else 0.
			 * Not compared: an address is the same whatever its scope id. */
	__u8 addr[16]; /* IPv4 in the first 4 bytes, network order */
};


struct rw_records {
	__u16 magic;   /* RW_MAGIC */
	__u8 version;  /* RW_VERSION */
	__u8 n_chain;  /* services that handled the flow, in order */
	__u8 proto;    /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 depth;    /* hops of the flows this one was started for: a service's
			* record-less onward connect that is not linked starts a new
			* flow at the deepest of its recent flows, so the hop limit
			* also counts hops across such restarts (0: an application's) */
	__u8 _pad[2];
	__u64 flow_id; /* random, assigned at the first redirect */
	struct rw_addr orig_dst;
	/* The origin. pid (thread-group id), uid, gid and cgroup_id are the
	 * kernel's (bpf_get_current_*) at the connect or send: vouched for.
	 * comm is the thread's name, which the process sets itself
	 * (prctl(PR_SET_NAME)): a label, never an identity. */
	__u32 pid;
	__u32 uid;
	__u32 gid;
	__u32 origin_sel; /* bits of the origin selectors (map rw_sel: cgroup path prefix,
			   * executable) the origin matched at the flow's first connect
			   * or send; vouched for like pid and uid (tagged) */
	__u64 cgroup_id;
	char comm[16];
	__u64 created_ns; /* CLOCK_BOOTTIME of the first redirect */
	__u16 chain[RW_MAX_CHAIN];
	__u64 mac; /* SipHash-2-4 of the 120 bytes above, kernel key */
};

/* What RW_OPT_CONTEXT returns. */
struct rw_context {
	__u16 magic;
	__u8 version;
	__u8 state;      /* RW_STATE_* of the querying service for this flow */
	__u16 service_id; /* service this hop was redirected to */
	__u16 rule_id;    /* config rule (1-based) that matched */
	__u8 hop;         /* 1 = first redirect */
	__u8 _pad[7];
	__u64 redirected_ns; /* CLOCK_BOOTTIME of this hop's redirect */
	struct rw_records records;
};

/* Per-socket state (BPF_MAP_TYPE_SK_STORAGE value); also the hand-off value. */
struct rw_sock {
	__u32 flags;
	__u16 service_id;
	__u16 rule_id;
	__u64 redirected_ns;
	__u64 cookie; /* hand-off entry: socket cookie of the connecting socket */
	__u8 n_set;   /* outbound socket: chain length of the records as set, the
		       * start of every connect attempt on it */
	__u8 _pad[3];
	__u32 mark;   /* UDP flow socket of a proxy: its flow's packet mark (see
		       * rw_udp_slot in lib/udp.h) */
	struct rw_records rec;
};

/* Hand-off key: client endpoint and server endpoint of a TCP connection. */
struct rw_tuple {
	__u8 family;
	__u8 _pad[3];
	__u16 cport; /* host order */
	__u16 sport; /* host order */
	__u8 caddr[16];
	__u8 saddr[16];
};

struct rw_service {
	__u8 has_v4;
	__u8 has_v6;
	__u16 port4_be;
	__u16 port6_be;
	__u8 udp_ports; /* UDP flows of one socket through this service at once (>= 1) */
	__u8 fail_open; /* no genuine listener: 1 = skip the service, 0 = refuse */
	__u8 addr4[4];
	__u8 addr6[16];
	__u8 continue_unlinked; /* config `continue_unlinked`: its record-less connects that
				 * are not linked continue after it even while it has side
				 * doors (the behaviour before issue 18) */
	__u8 _pad2[3];
	__u64 upto_mask; /* bits of this service and every service before it in
			  * configured order: what its own onward connects skip */
};

struct rw_rule {
	__u16 service_id; /* 1-based; 0 = empty slot */
	__u16 rule_id;    /* config rule number, reported in the context */
	__u8 family;      /* 0 = any */
	__u8 proto;       /* 0 = any */
	__u8 has_uid;
	__u8 has_cgroup;
	__u16 port_lo;    /* host order, inclusive */
	__u16 port_hi;
	__u32 uid;
	__u8 addr[16];    /* network prefix, masked */
	__u8 mask[16];
	__u64 cgroup_id;
	__u32 flags;      /* RW_RULE_* */
	__u32 sel;        /* origin selectors (rw_sel bits) the flow's origin must match:
			   * one of the cgroup ones (bits 0-15) if any, and one of the
			   * executable ones (bits 16-31) if any; 0 = no condition */
};

/* rw_rule.flags */
#define RW_RULE_BROADCAST_PASS 1u /* a broadcast/multicast send this rule applies to may
				   * pass, unredirected (config `broadcast = "pass"`) */
#define RW_MAX_BROADCAST 256 /* directed broadcast addresses of the host (map rw_bcast) */

struct rw_conf {
	__u32 n_rules;
	__u32 hop_limit;
	__u64 key[2]; /* SipHash key, random per load */
	__u64 udp_idle_ns; /* a UDP flow idle this long is over */
	__u32 svc_ids; /* filters of rw_svc_id: RW_SVC_IDS_FILLED | RW_SVC_CG_BIT(id) of every
			* cgroup id (kind 0, set before the id is written) | RW_SVC_UID_BIT(uid)
			* of every uid (kind 1); 0: not filled in (everything is looked up).
			* A clear bit: no service has that cgroup id or uid. */
	__u32 udp_flows_per_user; /* new UDP flows a second per uid (0: no limit) */
	__u64 netns_cookie; /* the network namespace rewire serves (0: any) */
	__u32 n_sel;        /* entries of rw_sel in use (0: no rule selects by origin) */
	__u32 accel_bound;  /* bytes an accelerated leg may hold queued at its receiving
			     * socket (psock ingress) before its sender goes back to TCP */
};
#define RW_SVC_IDS_FILLED (1u << 31)
#define RW_SVC_CG_BIT(id) (1u << ((id) % 24))        /* bits 0..23 */
#define RW_SVC_UID_BIT(uid) (1u << (24 + (uid) % 7)) /* bits 24..30 */

/* Counters of the accelerated legs between proxies (per-CPU array
 * rw_accel_cnt, lib/accel.h). */
#define RW_ACCEL_BYTES 0     /* bytes redirected socket to socket (sk_msg) */
#define RW_ACCEL_TCP_BYTES 1 /* bytes an accelerated socket sent over TCP (peer not in the
			      * map, TCP path not empty, bound reached) */
#define RW_ACCEL_FALLBACKS 2 /* a direction went from redirect back to TCP */
#define RW_ACCEL_BOUND 3     /* ... because the receiver held accel_bound bytes */
#define RW_ACCEL_INSERTED 4  /* sockets put into the sockhash */
#define RW_ACCEL_REFUSED 5   /* RW_OPT_ACCEL refused (not a service's socket, connected) */
#define RW_ACCEL_SWITCHES 6  /* a direction went from TCP to redirect */
#define RW_ACCEL_N 8
#define RW_DEFAULT_ACCEL_BOUND (1u << 20)

/* Origin selectors (array rw_sel): what a rule's `cgroup = "/path"` (the
 * cgroup and everything below it) and `exe` conditions test. Evaluated once
 * per new flow against the calling task; the flow's records carry the
 * result (rw_records.origin_sel), so proxies further down the chain are
 * matched on the origin's, not their own. */
#define RW_MAX_SEL 32
#define RW_SEL_EXE_BASE 16 /* exe selectors use bits 16..31, cgroup ones 0..15 */
#define RW_SEL_CGROUP 1 /* id: cgroup id at depth `level` (an ancestor or the cgroup itself) */
#define RW_SEL_EXE 2    /* id: inode number of the running binary (mm->exe_file),
			 * dev: its super block's s_dev (kernel encoding MAJOR << 20 | MINOR) */
struct rw_sel {
	__u32 kind; /* 0 = unused */
	__u32 level;
	__u64 id;
	__u64 dev;
};


/* UDP hand-off (key: struct rw_tuple, client = the datagram's source, server =
 * the service address it was sent to): published when the proxy's listener
 * receives the flow's datagram, or when the sending socket closes first;
 * claimed by the proxy's connected socket. */
struct rw_udp_handoff {
	struct rw_sock s;
	__u64 published_ns;
};

/* Identity of a service's processes: key of rw_svc_id. */
struct rw_ident_key {
	__u32 kind; /* 0 = cgroup id (<subtree>/services/<name>), 1 = uid */
	__u32 _pad;
	__u64 id;
};


/* Linking an unmodified transparent proxy's onward connect to the flow it
 * accepted: its SO_ORIGINAL_DST query on an accepted socket counts that
 * socket as pending in an entry (map rw_link) keyed by the querying process
 * and the flow's original destination, until the socket is released
 * (cgroup/sock_release); that process's record-less connect to the same
 * destination carries the flow's records on only while exactly one socket
 * was ever pending in the entry. No age: a flow that waits is never
 * forgotten while its socket lives. */

struct rw_link_key {
	__u32 tgid; /* the querying process */
	__u32 _pad;
	struct rw_addr dst; /* the flow's original destination */
};

struct rw_link {
	__u64 ts_ns;      /* CLOCK_BOOTTIME of the query that made the entry */
	__u64 pending;    /* queried accepted sockets not released yet (atomic; an
			   * entry at 0 is being deleted and is never counted up again) */
	__u16 service_id; /* the querying service (its accepted socket's) */
	__u8 ambiguous;   /* more than one was pending at some time: no link until
			   * every one is released and the entry is gone */
	__u8 _pad[5];
	struct rw_records rec; /* the flow of the query that made the entry */
};

struct rw_access_key {
	__u32 kind; /* 0 = uid, 1 = gid */
	__u32 id;
};

struct rw_event {
	__u32 kind;
	__s32 err;
	__u64 flow_id;
	__u16 service_id;
	__u16 rule_id;
	__u8 n_chain;
	__u8 proto;
	__u16 hop_limit;
	__u32 pid; /* process that made this connect */
	char comm[16];
	__u32 uid; /* its uid */
	__u64 ts_ns;
	struct rw_addr orig_dst;
	__u16 chain[RW_MAX_CHAIN];
};

/* `rewire flows`: what the flows iterator (flows.bpf.c: iter/tcp and iter/udp,
 * reading the hooks' rw_sk and rw_udp_sk) writes with bpf_seq_write for each
 * flow state a socket holds: one record per rw_sk value with records, one
 * per slot in use of a rw_udp_sk value. Several sockets hold one flow (the
 * application's, each proxy's accepted and onward ones); user space groups
 * them by flow id. The socket storage layouts themselves stay the kernel's
 * (lib/state.h). */
#define RW_FLOW_SOCK 1     /* a rw_sk value: a TCP socket, or a proxy's UDP flow socket */
#define RW_FLOW_UDP_SLOT 2 /* a slot of a rw_udp_sk value: a UDP socket's flow */
#define RW_FLOW_ROLE_REDIRECTED 1 /* its connect was redirected to the record's last service */
#define RW_FLOW_ROLE_ACCEPTED 2   /* a service's socket that received the flow (accepted) */
#define RW_FLOW_ROLE_SET 4        /* a service set the flow's records on it (its onward socket) */
struct rw_flow_rec {
	__u8 source;      /* RW_FLOW_SOCK or RW_FLOW_UDP_SLOT */
	__u8 role;        /* RW_FLOW_ROLE_* bits (0 for a UDP slot) */
	__u8 sk_state;    /* the socket's state as the kernel has it (TCP_ESTABLISHED = 1, TCP_CLOSE = 7) */
	__u8 _pad;
	__u16 sk_proto;   /* the socket's protocol (IPPROTO_TCP, IPPROTO_UDP) */
	__u16 service_id; /* the service this socket's hop went to (0: the original destination) */
	__u64 redirected_ns; /* CLOCK_BOOTTIME of that hop's redirect */
	__u64 last_ns;    /* UDP slot: CLOCK_BOOTTIME of its last datagram; else 0 */
	__u64 cookie;     /* the socket's cookie */
	struct rw_records rec;
};

/* The guard's configuration (guard.bpf.c, lsm.bpf.c: map rw_guard_conf). */
struct rw_guard_conf {
	__u64 subtree_id;  /* cgroup id of the managed subtree; 0 = off */
	__u64 services_id; /* cgroup id of <subtree>/services (0: none) */
	__u32 level;       /* the subtree's depth (root = 0) */
	__u32 _pad;
};

#define RW_MAC_COVERS 120 /* bytes of a record the MAC covers: offsetof(struct rw_records, mac) */

/* Layout, checked by the compiler (generated from this header's BTF;
 * crates/rewire-bpf/tests/abi_drift.rs checks the Rust view against it). */
#define RW_ASSERT_SIZE(t, n) _Static_assert(sizeof(struct t) == n, "size of " #t)
#define RW_ASSERT_AT(t, f, n) _Static_assert(__builtin_offsetof(struct t, f) == n, "offset of " #t "." #f)
RW_ASSERT_SIZE(rw_addr, 24);
RW_ASSERT_AT(rw_addr, family, 0); RW_ASSERT_AT(rw_addr, _pad, 1); RW_ASSERT_AT(rw_addr, port_be, 2);
RW_ASSERT_AT(rw_addr, scope_id, 4); RW_ASSERT_AT(rw_addr, addr, 8);
RW_ASSERT_SIZE(rw_records, 128);
RW_ASSERT_AT(rw_records, magic, 0); RW_ASSERT_AT(rw_records, version, 2);
RW_ASSERT_AT(rw_records, n_chain, 3); RW_ASSERT_AT(rw_records, proto, 4);
RW_ASSERT_AT(rw_records, depth, 5); RW_ASSERT_AT(rw_records, _pad, 6);
RW_ASSERT_AT(rw_records, flow_id, 8); RW_ASSERT_AT(rw_records, orig_dst, 16);
RW_ASSERT_AT(rw_records, pid, 40); RW_ASSERT_AT(rw_records, uid, 44);
RW_ASSERT_AT(rw_records, gid, 48); RW_ASSERT_AT(rw_records, origin_sel, 52);
RW_ASSERT_AT(rw_records, cgroup_id, 56); RW_ASSERT_AT(rw_records, comm, 64);
RW_ASSERT_AT(rw_records, created_ns, 80); RW_ASSERT_AT(rw_records, chain, 88);
RW_ASSERT_AT(rw_records, mac, 120);
RW_ASSERT_SIZE(rw_context, 152);
RW_ASSERT_AT(rw_context, magic, 0); RW_ASSERT_AT(rw_context, version, 2);
RW_ASSERT_AT(rw_context, state, 3); RW_ASSERT_AT(rw_context, service_id, 4);
RW_ASSERT_AT(rw_context, rule_id, 6); RW_ASSERT_AT(rw_context, hop, 8);
RW_ASSERT_AT(rw_context, _pad, 9); RW_ASSERT_AT(rw_context, redirected_ns, 16);
RW_ASSERT_AT(rw_context, records, 24);
RW_ASSERT_SIZE(rw_sock, 160);
RW_ASSERT_AT(rw_sock, flags, 0); RW_ASSERT_AT(rw_sock, service_id, 4);
RW_ASSERT_AT(rw_sock, rule_id, 6); RW_ASSERT_AT(rw_sock, redirected_ns, 8);
RW_ASSERT_AT(rw_sock, cookie, 16); RW_ASSERT_AT(rw_sock, n_set, 24);
RW_ASSERT_AT(rw_sock, _pad, 25); RW_ASSERT_AT(rw_sock, mark, 28); RW_ASSERT_AT(rw_sock, rec, 32);
RW_ASSERT_SIZE(rw_tuple, 40);
RW_ASSERT_AT(rw_tuple, family, 0); RW_ASSERT_AT(rw_tuple, _pad, 1);
RW_ASSERT_AT(rw_tuple, cport, 4); RW_ASSERT_AT(rw_tuple, sport, 6);
RW_ASSERT_AT(rw_tuple, caddr, 8); RW_ASSERT_AT(rw_tuple, saddr, 24);
RW_ASSERT_SIZE(rw_service, 40);
RW_ASSERT_AT(rw_service, has_v4, 0); RW_ASSERT_AT(rw_service, has_v6, 1);
RW_ASSERT_AT(rw_service, port4_be, 2); RW_ASSERT_AT(rw_service, port6_be, 4);
RW_ASSERT_AT(rw_service, udp_ports, 6); RW_ASSERT_AT(rw_service, fail_open, 7);
RW_ASSERT_AT(rw_service, addr4, 8); RW_ASSERT_AT(rw_service, addr6, 12);
RW_ASSERT_AT(rw_service, continue_unlinked, 28); RW_ASSERT_AT(rw_service, _pad2, 29);
RW_ASSERT_AT(rw_service, upto_mask, 32);
RW_ASSERT_SIZE(rw_rule, 64);
RW_ASSERT_AT(rw_rule, service_id, 0); RW_ASSERT_AT(rw_rule, rule_id, 2);
RW_ASSERT_AT(rw_rule, family, 4); RW_ASSERT_AT(rw_rule, proto, 5);
RW_ASSERT_AT(rw_rule, has_uid, 6); RW_ASSERT_AT(rw_rule, has_cgroup, 7);
RW_ASSERT_AT(rw_rule, port_lo, 8); RW_ASSERT_AT(rw_rule, port_hi, 10);
RW_ASSERT_AT(rw_rule, uid, 12); RW_ASSERT_AT(rw_rule, addr, 16); RW_ASSERT_AT(rw_rule, mask, 32);
RW_ASSERT_AT(rw_rule, cgroup_id, 48); RW_ASSERT_AT(rw_rule, flags, 56);
RW_ASSERT_AT(rw_rule, sel, 60);
RW_ASSERT_SIZE(rw_conf, 56);
RW_ASSERT_AT(rw_conf, n_rules, 0); RW_ASSERT_AT(rw_conf, hop_limit, 4);
RW_ASSERT_AT(rw_conf, key, 8); RW_ASSERT_AT(rw_conf, udp_idle_ns, 24);
RW_ASSERT_AT(rw_conf, svc_ids, 32); RW_ASSERT_AT(rw_conf, udp_flows_per_user, 36);
RW_ASSERT_AT(rw_conf, netns_cookie, 40); RW_ASSERT_AT(rw_conf, n_sel, 48);
RW_ASSERT_AT(rw_conf, accel_bound, 52);
RW_ASSERT_SIZE(rw_sel, 24);
RW_ASSERT_AT(rw_sel, kind, 0); RW_ASSERT_AT(rw_sel, level, 4); RW_ASSERT_AT(rw_sel, id, 8);
RW_ASSERT_AT(rw_sel, dev, 16);
RW_ASSERT_SIZE(rw_udp_handoff, 168);
RW_ASSERT_AT(rw_udp_handoff, s, 0); RW_ASSERT_AT(rw_udp_handoff, published_ns, 160);
RW_ASSERT_SIZE(rw_ident_key, 16);
RW_ASSERT_AT(rw_ident_key, kind, 0); RW_ASSERT_AT(rw_ident_key, _pad, 4);
RW_ASSERT_AT(rw_ident_key, id, 8);
RW_ASSERT_SIZE(rw_link_key, 32);
RW_ASSERT_AT(rw_link_key, tgid, 0); RW_ASSERT_AT(rw_link_key, _pad, 4);
RW_ASSERT_AT(rw_link_key, dst, 8);
RW_ASSERT_SIZE(rw_link, 152);
RW_ASSERT_AT(rw_link, ts_ns, 0); RW_ASSERT_AT(rw_link, pending, 8);
RW_ASSERT_AT(rw_link, service_id, 16); RW_ASSERT_AT(rw_link, ambiguous, 18);
RW_ASSERT_AT(rw_link, _pad, 19); RW_ASSERT_AT(rw_link, rec, 24);
RW_ASSERT_SIZE(rw_access_key, 8);
RW_ASSERT_AT(rw_access_key, kind, 0); RW_ASSERT_AT(rw_access_key, id, 4);
RW_ASSERT_SIZE(rw_event, 112);
RW_ASSERT_AT(rw_event, kind, 0); RW_ASSERT_AT(rw_event, err, 4); RW_ASSERT_AT(rw_event, flow_id, 8);
RW_ASSERT_AT(rw_event, service_id, 16); RW_ASSERT_AT(rw_event, rule_id, 18);
RW_ASSERT_AT(rw_event, n_chain, 20); RW_ASSERT_AT(rw_event, proto, 21);
RW_ASSERT_AT(rw_event, hop_limit, 22); RW_ASSERT_AT(rw_event, pid, 24);
RW_ASSERT_AT(rw_event, comm, 28); RW_ASSERT_AT(rw_event, uid, 44);
RW_ASSERT_AT(rw_event, ts_ns, 48); RW_ASSERT_AT(rw_event, orig_dst, 56);
RW_ASSERT_AT(rw_event, chain, 80);
RW_ASSERT_SIZE(rw_guard_conf, 24);
RW_ASSERT_AT(rw_guard_conf, subtree_id, 0); RW_ASSERT_AT(rw_guard_conf, services_id, 8);
RW_ASSERT_AT(rw_guard_conf, level, 16); RW_ASSERT_AT(rw_guard_conf, _pad, 20);
RW_ASSERT_SIZE(rw_flow_rec, 160);
RW_ASSERT_AT(rw_flow_rec, source, 0); RW_ASSERT_AT(rw_flow_rec, role, 1);
RW_ASSERT_AT(rw_flow_rec, sk_state, 2); RW_ASSERT_AT(rw_flow_rec, _pad, 3);
RW_ASSERT_AT(rw_flow_rec, sk_proto, 4); RW_ASSERT_AT(rw_flow_rec, service_id, 6);
RW_ASSERT_AT(rw_flow_rec, redirected_ns, 8); RW_ASSERT_AT(rw_flow_rec, last_ns, 16);
RW_ASSERT_AT(rw_flow_rec, cookie, 24); RW_ASSERT_AT(rw_flow_rec, rec, 32);
_Static_assert(RW_MAC_COVERS == __builtin_offsetof(struct rw_records, mac), "RW_MAC_COVERS");
_Static_assert(RW_MAC_COVERS % 8 == 0, "the MAC reads whole words");

#endif
