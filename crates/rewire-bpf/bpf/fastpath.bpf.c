// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * rewire's kernel fast path for the reference proxy (`--relay kernel`):
 * after the proxy has seen the first bytes of a direction in user space, the
 * rest of that direction is forwarded socket to socket inside the kernel,
 * and the proxy never reads it.
 *
 *   sk_skb/stream_verdict  runs for every skb that reaches the receive queue
 *                          of a socket in fp_ingress; sends it out of the
 *                          flow's other socket (bpf_sk_redirect_hash, egress)
 *
 * Nothing here is attached to a cgroup: the program is attached to the map
 * fp_ingress and only sees the sockets the proxy puts there. Everything is
 * released when the proxy's descriptors close.
 *
 * Why three maps, keyed by socket cookie (SO_COOKIE, unique per socket for
 * the life of the system):
 *
 *   fp_peer     SOCKHASH, key = cookie of the *source* socket, value = the
 *               socket its data goes to. No program is attached to it, so
 *               putting a socket here does not change how that socket
 *               receives; it only makes it a valid redirect target (the
 *               kernel drops a redirect to a socket that is in no sockmap).
 *   fp_bytes    HASH, key = cookie of the source: bytes redirected so far.
 *               User space cannot see redirected bytes, so the program
 *               counts them; the proxy reports them and uses them to know
 *               when the destination has taken everything (see fastpath.rs).
 *   fp_ingress  SOCKHASH, key = cookie: membership means "this socket's
 *               incoming data is forwarded by the kernel". The verdict
 *               program is attached here.
 *
 * The proxy fills fp_peer and fp_bytes for a source *before* it puts the
 * source into fp_ingress, so the first skb the program sees already has a
 * target. With a single map the second socket would be missing for a
 * moment and its data would be dropped (bpf_sk_redirect_hash answers
 * SK_DROP for an unknown key), or it would have to be passed up to user
 * space, which would then race the kernel on the byte order.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/*
 * Entries per map: one per offloaded direction (two per flow), so 32768
 * flows at once; past that, inserting fails and the proxy splices instead.
 */
#define FP_MAX_SOCKETS 65536

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, FP_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} fp_ingress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, FP_MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} fp_peer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FP_MAX_SOCKETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u64);
} fp_bytes SEC(".maps");

SEC("sk_skb/stream_verdict")
int fp_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u64 *bytes;
	long verdict;

	/*
	 * A bare FIN arrives as an empty skb. TCP has already recorded the
	 * end-of-file on the socket (the proxy sees it and shuts the other
	 * side down), and redirecting an empty skb to egress would make the
	 * kernel's send worker report EPIPE on the target: drop it.
	 */
	if (skb->len == 0)
		return SK_DROP;
	bytes = bpf_map_lookup_elem(&fp_bytes, &cookie);
	/*
	 * Not set up by the proxy (cannot happen in the order it inserts):
	 * hand the data to user space rather than lose it; the proxy treats
	 * data it can read from an offloaded socket as an error.
	 */
	if (!bytes)
		return SK_PASS;
	/* flags 0: out of the target's egress, i.e. sent to its peer. Counted
	 * only when the target is there (it leaves the map when it closes). */
	verdict = bpf_sk_redirect_hash(skb, &fp_peer, &cookie, 0);
	if (verdict == SK_PASS)
		__sync_fetch_and_add(bytes, skb->len);
	return verdict;
}
