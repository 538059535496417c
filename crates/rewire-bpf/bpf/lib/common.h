/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Common ground of the hooks: kernel headers, errno and protocol numbers the
 * BPF target lacks, the configuration and what every hook does with it.
 *
 * API: map rw_conf; rw_get_conf(); rw_refuse(err) (fail a sock_addr call
 * with -err); rw_storage_create(map, sk) (socket storage, created if
 * missing; always NULL in the test build with RW_TEST_NO_STORAGE).
 */
#pragma once

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "../rewire_abi.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#define SOCK_STREAM 1
#define SOCK_DGRAM 2

#define EAGAIN 11
#define EPERM 1
#define ENOENT 2
#define ENOBUFS 105
#define EINVAL 22
#define EACCES 13
#define ELOOP 40
#define EPROTOTYPE 91
#define EOPNOTSUPP 95
#define EISCONN 106
#define ENOTCONN 107
#define EADDRINUSE 98
#define ECONNREFUSED 111
#define EPROTONOSUPPORT 93
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#define IPPROTO_ICMPV6 58
#define EFAULT 14

#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* = IP6T_SO_ORIGINAL_DST at SOL_IPV6 */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rw_conf);
} rw_conf SEC(".maps");

static __always_inline struct rw_conf *rw_get_conf(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&rw_conf, &zero);
}

/* Fails the connect/sendmsg with -err (the program returns 0). */
static __always_inline int rw_refuse(int err)
{
	bpf_set_retval(-err);
	return 0;
}

/* Socket storage, created if missing. The test build of the object
 * (rewire-test.bpf.o, built with RW_TEST_NO_STORAGE; never loaded outside
 * the tests) fails every such allocation, so a test can see that a hook
 * that cannot keep a flow's state refuses it. */
#ifdef RW_TEST_NO_STORAGE
#define rw_storage_create(map, sk) ((void *)0)
#else
#define rw_storage_create(map, sk) bpf_sk_storage_get(map, sk, 0, BPF_SK_STORAGE_GET_F_CREATE)
#endif
