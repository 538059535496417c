// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * The flows iterator: `rewire flows` reads the live flows from the kernel's
 * own per-socket state, not from a copy kept in user space.
 *
 * A flow's state lives in socket storage (maps rw_sk and rw_udp_sk), which
 * user space cannot walk: a socket storage map's key is a descriptor of the
 * caller's own socket, so there is nothing to iterate from outside. A BPF
 * iterator can: these programs visit every TCP socket (iter/tcp) and every
 * UDP socket (iter/udp) of the network namespace the iterator was made in,
 * look up the socket's rw_sk and rw_udp_sk values (the hooks' own maps: the
 * loader reuses their pinned descriptors, so an instance sees only its own
 * flows) and write one struct rw_flow_rec (rewire_abi.h) per flow state
 * found with bpf_seq_write; user space reads them as fixed-size records from
 * the iterator's descriptor (crates/rewire-control/src/flows.rs).
 *
 * (An iterator over the socket storage map itself, iter/bpf_sk_storage_map,
 * would visit only the sockets that have a value, but the kernel rewire is
 * tested on refuses to load one (EPERM) where the socket iterators load.)
 *
 * They only read: bpf_sk_storage_get without F_CREATE, nothing written but
 * the iterator's output. Loaded with libbpf (tracing programs whose targets
 * the kernel's BTF names).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "lib/sock_storage.h" /* the hooks' maps: the loader reuses their pinned descriptors */

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* The kernel structures read, relocated against the running kernel's BTF. */
struct seq_file;
struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));
struct sock_common {
	volatile unsigned char skc_state;
} __attribute__((preserve_access_index));
struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));
struct udp_sock;
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));
struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

static __always_inline void rw_flow_sk(struct rw_flow_rec *out, struct sock *sk, __u16 proto)
{
	out->sk_state = sk->__sk_common.skc_state;
	out->sk_proto = proto;
	out->cookie = bpf_get_socket_cookie(sk);
}

/* The rw_sk value of a socket, if it holds a flow. */
static __always_inline void rw_flow_sock(struct seq_file *seq, struct sock *sk, __u16 proto)
{
	struct rw_flow_rec out = {};
	struct rw_sock *st = bpf_sk_storage_get(&rw_sk, sk, 0, 0);

	if (!st || st->rec.magic != RW_MAGIC || !st->rec.flow_id)
		return;
	out.source = RW_FLOW_SOCK;
	if (st->flags & RW_F_REDIRECTED)
		out.role |= RW_FLOW_ROLE_REDIRECTED;
	if (st->flags & RW_F_ACCEPTED)
		out.role |= RW_FLOW_ROLE_ACCEPTED;
	if (st->flags & RW_F_HAS_RECORDS)
		out.role |= RW_FLOW_ROLE_SET;
	out.service_id = st->service_id;
	out.redirected_ns = st->redirected_ns;
	__builtin_memcpy(&out.rec, &st->rec, sizeof(out.rec));
	rw_flow_sk(&out, sk, proto);
	bpf_seq_write(seq, &out, sizeof(out));
}

SEC("iter/tcp")
int rw_flows_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock *sk = (struct sock *)ctx->sk_common;

	if (!sk)
		return 0;
	rw_flow_sock(ctx->meta->seq, sk, IPPROTO_TCP);
	return 0;
}

SEC("iter/udp")
int rw_flows_udp(struct bpf_iter__udp *ctx)
{
	struct seq_file *seq = ctx->meta->seq;
	struct sock *sk = (struct sock *)ctx->udp_sk;
	struct rw_flow_rec out = {};
	struct rw_udp_sock *u;

	if (!sk)
		return 0;
	/* A proxy's connected flow socket keeps its flow in rw_sk. */
	rw_flow_sock(seq, sk, IPPROTO_UDP);
	u = bpf_sk_storage_get(&rw_udp_sk, sk, 0, 0);
	if (!u)
		return 0;
	out.source = RW_FLOW_UDP_SLOT;
	rw_flow_sk(&out, sk, IPPROTO_UDP);
	for (int i = 0; i < RW_UDP_SLOTS; i++) {
		struct rw_udp_slot *sl = &u->slot[i];

		if (sl->rec.magic != RW_MAGIC || !sl->rec.flow_id)
			continue;
		out.service_id = sl->service_id;
		out.redirected_ns = sl->redirected_ns;
		out.last_ns = sl->last_ns;
		__builtin_memcpy(&out.rec, &sl->rec, sizeof(out.rec));
		bpf_seq_write(seq, &out, sizeof(out));
	}
	return 0;
}
