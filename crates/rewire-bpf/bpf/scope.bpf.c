// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * The scope program: hands the scope id of an IPv6 link-local destination
 * (fe80::/10, the `%eth0` of `fe80::1%eth0`) to rewire's hooks.
 *
 * The sock_addr context shows a connect's or send's address and port but
 * not the sockaddr's sin6_scope_id, so the hooks alone would record a
 * link-local original destination without its interface, and a proxy's
 * onward connect to it would fail (EINVAL). The kernel's copy of the
 * sockaddr is reached through bpf_cast_to_kern_ctx (a kfunc, so this is a
 * separate object loaded with libbpf, like the guard). These programs are
 * attached to the hooks' cgroup with BPF_F_PREORDER, so they run before the
 * hooks in the same call; they leave (socket cookie, scope id) in the
 * per-CPU map rw_scope (the hooks' own, shared), which the hooks' connect6
 * and sendmsg6 consume (rw_scope_of). They never refuse anything.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "lib/scope.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* The hooks' map (the loader reuses its descriptor). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_scope_stash);
} rw_scope SEC(".maps");

struct sockaddr;
struct bpf_sock_addr_kern {
	struct sockaddr *uaddr;
	__u32 uaddrlen;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

#define SIN6_SCOPE_ID_OFF 24 /* offsetof(struct sockaddr_in6, sin6_scope_id) */
#define SIN6_LEN 28

static __always_inline int rw_scope_take(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0, scope = 0;
	struct rw_scope_stash *s = bpf_map_lookup_elem(&rw_scope, &zero);
	struct bpf_sock_addr_kern *kctx;

	if (!s)
		return 1;
	s->cookie = 0;
	if ((ctx->user_ip6[0] & bpf_htonl(0xffc00000)) != bpf_htonl(0xfe800000))
		return 1;
	kctx = bpf_cast_to_kern_ctx(ctx);
	if (kctx->uaddrlen < SIN6_LEN)
		return 1;
	if (bpf_probe_read_kernel(&scope, sizeof(scope), (char *)kctx->uaddr + SIN6_SCOPE_ID_OFF))
		return 1;
	s->scope_id = scope;
	s->cookie = bpf_get_socket_cookie(ctx);
	return 1;
}

SEC("cgroup/connect6")
int rw_scope_connect6(struct bpf_sock_addr *ctx)
{
	return rw_scope_take(ctx);
}

SEC("cgroup/sendmsg6")
int rw_scope_sendmsg6(struct bpf_sock_addr *ctx)
{
	return rw_scope_take(ctx);
}
