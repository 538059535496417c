// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * The borrowed-socket boundary in the BPF LSM, where the kernel loads it:
 *
 *   lsm/file_receive         a process inside the managed subtree may not
 *                            receive a socket made outside it: SCM_RIGHTS
 *                            and pidfd_getfd both install the descriptor
 *                            through receive_fd(), which asks this hook),
 *                            nor an io_uring ring set up with SQPOLL
 *                            whose kernel thread runs outside it (the
 *                            thread makes and uses sockets for whoever
 *                            submits: outside the subtree, past every hook)
 *   lsm/ptrace_access_check  a process inside the subtree may not ptrace,
 *                            pidfd_getfd, process_vm_writev or write the
 *                            /proc/PID/mem of a process outside it (every
 *                            one of those asks ptrace_may_access)
 *
 * Unlike the cgroup guard (guard.bpf.c) this stops the socket at the door,
 * so a borrowed socket that its owner had already connected cannot send
 * either. LSM programs are global: each returns at once unless the calling
 * task is inside the subtree (one map lookup, one helper call). A
 * service's processes are trusted, as in the hooks.
 *
 * Refusals are reported and counted as RW_REASON_BORROWED, with no
 * destination. Some kernels list the BPF LSM as active and still refuse
 * every trampoline program (EPERM before the verifier); rewire detects that
 * at start by loading this object and says which boundary holds.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "subtree.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

struct socket {
	struct sock *sk;
} __attribute__((preserve_access_index));
struct css_set {
	struct cgroup *dfl_cgrp;
} __attribute__((preserve_access_index));
struct task_struct {
	struct css_set *cgroups;
} __attribute__((preserve_access_index));
/* io_uring's ring file: an anonymous inode named "[io_uring]" whose
 * private_data is the ring (struct io_ring_ctx). io_uring_fops is static
 * and not a ksym on kernels without CONFIG_KALLSYMS_ALL, so the file is
 * recognised by its filesystem and name. Read with CO-RE probe reads
 * (private_data is a void pointer to the verifier). */
struct qstr {
	const unsigned char *name;
} __attribute__((preserve_access_index));
struct dentry {
	struct qstr d_name;
} __attribute__((preserve_access_index));
struct path {
	struct dentry *dentry;
} __attribute__((preserve_access_index));
struct super_block {
	unsigned long s_magic;
} __attribute__((preserve_access_index));
struct inode {
	struct super_block *i_sb;
} __attribute__((preserve_access_index));
struct file {
	struct path f_path;
	struct inode *f_inode;
	void *private_data;
} __attribute__((preserve_access_index));
struct io_sq_data {
	struct task_struct *thread;
} __attribute__((preserve_access_index));
struct io_ring_ctx {
	unsigned int flags;
	struct io_sq_data *sq_data;
} __attribute__((preserve_access_index));

#define RW_ANON_INODE_FS_MAGIC 0x09041934
#define RW_IORING_SETUP_SQPOLL (1U << 1)

/* rw_cgroup_in through probe reads, for a cgroup pointer the verifier
 * does not know as one (reached through a void pointer). */
static __always_inline int rw_cgroup_in_probed(struct cgroup *cg, __u32 level, __u64 id)
{
	for (int i = 0; i < RW_GUARD_MAX_DEPTH && cg; i++) {
		int l = BPF_CORE_READ(cg, level);

		if (l < (int)level)
			return 0;
		if (l == (int)level)
			return BPF_CORE_READ(cg, kn, id) == id;
		cg = BPF_CORE_READ(cg, self.parent, cgroup);
	}
	return 0;
}

/* 1 when `file` is an io_uring ring set up with SQPOLL whose kernel thread
 * is not inside the subtree (or is not known): what is submitted to such a
 * ring runs on that thread, so the sockets it makes are made and used
 * outside. A ring without SQPOLL runs requests in the submitting task (and
 * its own io-wq workers), inside: it passes. */
static __always_inline int rw_outside_sqpoll_ring(struct file *file, struct rw_guard_conf *conf)
{
	static const char want[] = "[io_uring]";
	char name[sizeof(want) + 1] = {};
	const unsigned char *np;
	struct io_ring_ctx *ring;
	struct io_sq_data *sqd;
	struct task_struct *thread;
	struct css_set *cs;

	if (!bpf_core_type_exists(struct io_ring_ctx))
		return 0; /* a kernel without io_uring */
	if (BPF_CORE_READ(file, f_inode, i_sb, s_magic) != RW_ANON_INODE_FS_MAGIC)
		return 0;
	np = BPF_CORE_READ(file, f_path.dentry, d_name.name);
	/* sizeof(want) + 1 bytes: a longer name reads as longer, not as a match. */
	if (!np || bpf_probe_read_kernel_str(name, sizeof(name), np) != sizeof(want))
		return 0;
	for (int i = 0; i < (int)sizeof(want); i++)
		if (name[i] != want[i])
			return 0;
	ring = BPF_CORE_READ(file, private_data);
	if (!ring || !(BPF_CORE_READ(ring, flags) & RW_IORING_SETUP_SQPOLL))
		return 0;
	sqd = BPF_CORE_READ(ring, sq_data);
	thread = sqd ? BPF_CORE_READ(sqd, thread) : 0;
	cs = thread ? BPF_CORE_READ(thread, cgroups) : 0;
	if (!cs)
		return 1; /* the thread is not known: refuse */
	return !rw_cgroup_in_probed(BPF_CORE_READ(cs, dfl_cgrp), conf->level, conf->subtree_id);
}

static __always_inline void rw_lsm_report(void)
{
	struct rw_event *e = rw_borrowed_event();

	if (e)
		bpf_ringbuf_submit(e, 0);
}

SEC("lsm/file_receive")
int rw_lsm_file_receive(unsigned long long *ctx)
{
	struct file *file = (struct file *)ctx[0];
	struct rw_guard_conf *conf = rw_caller_inside();
	int ret = (int)ctx[1]; /* an earlier LSM's verdict */
	struct socket *sock;
	struct sock *sk;

	if (ret || !conf)
		return ret;
	sock = bpf_sock_from_file(file);
	if (!sock) {
		if (!rw_outside_sqpoll_ring(file, conf))
			return 0; /* neither a socket nor an outside SQPOLL ring */
		rw_lsm_report();
		return -EPERM;
	}
	sk = sock->sk;
	if (!sk || rw_cgroup_in(sk->sk_cgrp_data.cgroup, conf->level, conf->subtree_id))
		return 0;
	rw_lsm_report();
	return -EPERM;
}

SEC("lsm/ptrace_access_check")
int rw_lsm_ptrace_access_check(unsigned long long *ctx)
{
	struct task_struct *child = (struct task_struct *)ctx[0];
	struct rw_guard_conf *conf = rw_caller_inside();
	int ret = (int)ctx[2]; /* an earlier LSM's verdict */
	struct css_set *cs;

	if (ret || !conf)
		return ret;
	cs = child->cgroups;
	if (cs && rw_cgroup_in(cs->dfl_cgrp, conf->level, conf->subtree_id))
		return 0;
	rw_lsm_report();
	return -EPERM;
}
