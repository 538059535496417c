/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * rewire ABI: the structures shared by the kernel programs (rewire.bpf.c)
 * and user space (crates/rewire/src/abi.rs mirrors them field for field;
 * both sides assert the sizes and offsets below at compile time).
 *
 * Every integer is in host byte order except where the name says `_be`.
 * A `struct rw_records` is the opaque blob that proxies query from their
 * accepted socket and set on their outbound socket; its last field is a
 * SipHash-2-4 tag under a key only the kernel programs know, so a blob that
 * was altered or truncated is refused by the set call.
 */
#ifndef REWIRE_ABI_H
#define REWIRE_ABI_H

/* Private socket option level served by the cgroup sockopt programs. */
#define RW_SOL 0x5257 /* 'R' 'W' */
#define RW_OPT_RECORDS 1 /* get on accepted socket; set on outbound socket */
#define RW_OPT_CONTEXT 2 /* get on accepted socket */
#define RW_OPT_UDP_PEER 3 /* get on a proxy's UDP flow socket: a __u32, 1 when the
			   * flow's sending socket has closed (the flow is over) */
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

/* rw_sock.flags */
#define RW_F_HAS_RECORDS 1u  /* outbound socket: a verified blob was set */
#define RW_F_REDIRECTED 2u   /* connect was redirected: getpeername lies, handoff on SYN */
#define RW_F_ACCEPTED 4u     /* accepted socket that received a flow record */
#define RW_F_LINK_LOST 8u    /* accepted socket queried when no link mark could be made: counted
			      * in its service's link_unrecorded until released */

/* Event kinds (ring buffer to the daemon). */
#define RW_EV_REDIRECT 1 /* connect redirected to a service */
#define RW_EV_DELIVER 2  /* a socket with records reached its original destination */
#define RW_EV_HOP_LIMIT 3 /* refused: the flow would exceed the hop limit (ELOOP) */
#define RW_EV_MISMATCH 4 /* refused: records belong to another destination (EINVAL) */
#define RW_EV_UDP_CONFLICT 5 /* refused: the socket has a live flow to this service for
			      * another destination (EADDRINUSE) or no free slot (ENOBUFS) */
#define RW_EV_NO_LISTENER 6 /* the chosen service has no listener: refused (err
			     * ECONNREFUSED, fail = "closed") or skipped (err 0, "open") */
#define RW_EV_IMPOSTOR 7  /* the service's address is held by a socket that none of the
			   * service's processes opened: refused or skipped, as above */
#define RW_EV_INTERNAL 8  /* refused: the hook could not keep the flow's state
			   * (socket storage allocation failed: ENOBUFS) */
#define RW_EV_HANDOFF_FULL 9 /* the hand-off table is full: the proxy cannot claim this
			      * connection, so it gets no records and refuses it */
#define RW_EV_FOREIGN_NETNS 10 /* refused: a redirect or a records call in a network
				* namespace other than the one rewire was set up in (EPERM) */
#define RW_EV_PROTOCOL 11 /* refused at socket creation: a transport rewire cannot
			   * redirect (UDP-Lite, SCTP, MPTCP, ...): EPROTONOSUPPORT */
#define RW_EV_UDP_FORGED 12 /* dropped: a datagram claiming to belong to a UDP flow
			     * that its flow's own socket did not send */
#define RW_EV_HANDOFF_REFUSED 13 /* refused: a socket not accepted on the service's own
				  * listener in rewire's namespace tried to take a pending
				  * TCP hand-off (same 4-tuple); the entry stays */
#define RW_EV_BORROWED 16 /* refused (EPERM): a process in the subtree connects or sends
			   * with a socket made outside it (taken with pidfd_getfd or
			   * SCM_RIGHTS); reported by the guard (guard.bpf.c) */
#define RW_EV_BROADCAST 17 /* refused (EPERM): a UDP send or connect to a broadcast or
			    * multicast address (one datagram to many receivers, which no
			    * proxy can stand in for) that a rule could apply to */

/* Counters (per-CPU array rw_counters, index): never lose a count. */
#define RW_CNT_REDIRECT 0
#define RW_CNT_DELIVER 1
#define RW_CNT_HOP_LIMIT 2
#define RW_CNT_MISMATCH 3
#define RW_CNT_UDP_CONFLICT 4
#define RW_CNT_NO_LISTENER 5
#define RW_CNT_IMPOSTOR 6
#define RW_CNT_FAIL_OPEN_SKIP 7
#define RW_CNT_NO_STORAGE 8
#define RW_CNT_HANDOFF_FULL 9
#define RW_CNT_EVENTS_LOST 10
#define RW_CNT_FOREIGN_NETNS 12
#define RW_CNT_PROTOCOL 13
#define RW_CNT_UDP_FORGED 14
#define RW_CNT_HANDOFF_REFUSED 15 /* see RW_EV_HANDOFF_REFUSED */
#define RW_CNT_BROADCAST 19 /* broadcast/multicast sends refused (RW_EV_BROADCAST) */
#define RW_CNT_LINK 11 /* a record-less onward connect carried on the flow whose
			* SO_ORIGINAL_DST its process queried (linking) */
#define RW_CNT_BORROWED 18 /* see RW_EV_BORROWED */
#define RW_CNT_SIDE_DOOR 20 /* a service's record-less connect not linked, or walked the
			     * whole chain again, because it had a side door (rw_svc_state) */
#define RW_CNT_UDP_NO_FLOW 21 /* datagrams to a service's UDP socket that belong to no flow
				* (no records: e.g. a flood from outside), dropped on arrival */
#define RW_CNT_UDP_RATE 22 /* new UDP flows refused (EAGAIN): their user started more
			     * than udp_flows_per_user a second */
#define RW_CNT_N 24
/* Per-service counters (per-CPU array rw_svc_counters): index
 * service_id * RW_CNT_N + RW_CNT_*, service ids 0..RW_MAX_SERVICES. */
#define RW_SVC_CNT_N ((RW_MAX_SERVICES + 1) * RW_CNT_N)

/* rw_conf.faults: fault injection for tests (never set from a config file). */
#define RW_FAULT_NO_STORAGE 1u /* every socket storage allocation fails */

struct rw_addr {
	__u8 family; /* AF_INET or AF_INET6; 0 = unset */
	__u8 _pad;
	__u16 port_be;
	__u32 scope_id; /* IPv6 link-local: the interface the application named
			 * (sin6_scope_id), where the scope program could read it; else 0.
			 * Not compared: an address is the same whatever its scope id. */
	__u8 addr[16]; /* IPv4 in the first 4 bytes, network order */
};

/* The scope id of the IPv6 link-local address a connect6/sendmsg6 names,
 * passed from the scope program (scope.bpf.c, run first) to the hooks in
 * the same call, per CPU (map rw_scope). */
struct rw_scope_stash {
	__u64 cookie; /* the socket's cookie; 0 = nothing */
	__u32 scope_id;
	__u32 _pad;
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
	__u64 tag; /* SipHash-2-4 of the 120 bytes above, kernel key */
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
	__u32 tag;    /* UDP flow socket of a proxy: its flow's tag (see rw_udp_slot) */
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
	__u32 faults;      /* RW_FAULT_*: tests only */
	__u32 udp_flows_per_user; /* new UDP flows a second per uid (0: no limit) */
	__u64 netns_cookie; /* the network namespace rewire serves (0: any) */
	__u32 n_sel;        /* entries of rw_sel in use (0: no rule selects by origin) */
	__u32 _pad;
};

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
	__u32 tag;             /* random, per flow: the packet mark its datagrams carry both
				* ways, checked on arrival (only the flow's own sockets send it) */
	__u32 _pad2;
	struct rw_records rec; /* magic == 0: free slot */
};

/* BPF_MAP_TYPE_SK_STORAGE value of a UDP socket. */
struct rw_udp_sock {
	struct rw_udp_slot slot[RW_UDP_SLOTS];
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

/* A socket opened by one of a service's processes and bound to one of its
 * addresses (rw_owner SK_STORAGE value): only such sockets receive its flows. */
struct rw_owner {
	__u16 service_id;
	__u16 _pad[3];
};

/* Linking an unmodified transparent proxy's onward connect to the flow it
 * accepted: its SO_ORIGINAL_DST query on an accepted socket counts that
 * socket as pending in an entry (map rw_link) keyed by the querying process
 * and the flow's original destination, until the socket is released
 * (cgroup/sock_release); that process's record-less connect to the same
 * destination carries the flow's records on only while exactly one socket
 * was ever pending in the entry. No age: a flow that waits is never
 * forgotten while its socket lives. */
#define RW_LINK_ENTRIES 65536

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

/* Per service (array rw_svc_state, index = service id): its side doors, TCP
 * connections accepted on a socket one of its processes bound that came with
 * no hand-off (a forward-proxy or admin port, a direct connection), and the
 * deepest of the flows handed to it recently. A service is quiet when no
 * side door is open and none opened or closed within RW_SIDE_DOOR_QUIET_NS:
 * only then is its record-less onward connect linked to a flow it queried,
 * or continued after it. */
#define RW_SIDE_DOOR_QUIET_NS (30ULL * 1000000000ULL)
struct rw_svc_state {
	__u32 side_open;  /* side-door connections open now */
	__u32 link_unrecorded; /* queried sockets not released yet that rw_link had no
				* room for: while any is, no connect of the service is
				* linked (one of them may be waiting) */
	__u64 side_ns;    /* CLOCK_BOOTTIME of the last side-door open or close (0: never) */
	__u64 depth_ns;   /* when `depth` was last raised */
	__u8 depth;       /* deepest (depth + chain length) of a flow handed to it within
			   * RW_SIDE_DOOR_QUIET_NS of depth_ns */
	__u8 _pad2[7];
	__u64 link_live;  /* queried sockets of the service not released yet (low 32
			   * bits) | RW_LIVE_AMBIGUOUS (two or more were live at once
			   * since the count was last 0): a connect is linked only
			   * when this is exactly 1 (rw_link_live_one) */
};
#define RW_LIVE_AMBIGUOUS (1ULL << 32)
/* SK_STORAGE value (map rw_svc_sock, cloned to accepted sockets) of a TCP
 * socket a service's process bound: its listeners' connections are its. */
struct rw_svc_sock {
	__u16 service_id;
	__u8 side_door; /* an accepted connection counted in side_open until it closes */
	__u8 _pad[5];
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

#define RW_TAGGED_LEN 120 /* offsetof(struct rw_records, tag) */

#endif
