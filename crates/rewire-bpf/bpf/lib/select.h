/* SPDX-License-Identifier: (MIT OR GPL-2.0) */
/*
 * Selecting flows by their origin beyond uid and exact cgroup: a cgroup
 * path prefix (the cgroup and everything below it) and the executable the
 * process runs (the WFP application id).
 *
 * API: map rw_sel, rw_origin_bits (the calling task's selectors),
 * rw_sel_match (a rule's condition); needs rw_get_conf (common.h).
 *
 * The executable is known by the running binary's identity, the inode of
 * `current->mm->exe_file` and its file system's device, not by a name the
 * process chose (comm, argv[0]): rewire_control computes the same pair
 * with stat(2) when it loads the rules. A script is matched by its
 * interpreter (the kernel's exe_file is the interpreter's binary). A
 * binary replaced on disk (a package upgrade writes a new inode) no longer
 * matches until the rules are loaded again; processes still running the
 * old inode keep matching.
 *
 * Evaluated once for a flow's first connect or send (rw_origin_bits) and
 * carried in its records (rw_records.origin_sel, tagged), so the services
 * further down the chain are matched on the origin's selection, never on
 * the proxy's.
 */
#pragma once

#include "common.h"

/* The kernel structures read, relocated against the running kernel's BTF. */
struct super_block {
	__u32 s_dev;
} __attribute__((preserve_access_index));
struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));
struct file {
	struct inode *f_inode;
} __attribute__((preserve_access_index));
struct mm_struct {
	struct file *exe_file;
} __attribute__((preserve_access_index));
struct task_struct {
	struct mm_struct *mm;
} __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, RW_MAX_SEL);
	__type(key, __u32);
	__type(value, struct rw_sel);
} rw_sel SEC(".maps");

/* The selectors the calling task matches (bit i: rw_sel[i]); 0 without
 * any. A task without an address space (a kernel thread) has no
 * executable and matches none of the exe selectors. A global function:
 * verified once. */
__attribute__((noinline)) int rw_origin_bits(void)
{
	struct rw_conf *conf = rw_get_conf();
	struct task_struct *t;
	struct mm_struct *mm;
	__u64 ino = 0, dev = 0;
	__u32 n, bits = 0;

	if (!conf || !conf->n_sel)
		return 0;
	n = conf->n_sel;
	t = (struct task_struct *)bpf_get_current_task_btf();
	mm = t->mm;
	if (mm) {
		struct file *f = mm->exe_file;
		if (f) {
			struct inode *i = f->f_inode;
			if (i) {
				struct super_block *sb = i->i_sb;
				ino = i->i_ino;
				if (sb)
					dev = sb->s_dev;
			}
		}
	}
	for (__u32 i = 0; i < RW_MAX_SEL; i++) {
		__u32 k = i;
		struct rw_sel *s;

		if (i >= n)
			break;
		s = bpf_map_lookup_elem(&rw_sel, &k);
		if (!s)
			continue;
		if (s->kind == RW_SEL_CGROUP) {
			if (bpf_get_current_ancestor_cgroup_id(s->level) == s->id)
				bits |= 1u << i;
		} else if (s->kind == RW_SEL_EXE) {
			if (ino && s->id == ino && s->dev == dev)
				bits |= 1u << i;
		}
	}
	return (int)bits;
}

/* Whether an origin that matched `origin` selectors meets a rule's `sel`:
 * one of its cgroup selectors if it has any, and one of its executable
 * selectors if it has any. */
static __always_inline int rw_sel_match(__u32 sel, __u32 origin)
{
	__u32 cg = sel & ((1u << RW_SEL_EXE_BASE) - 1), exe = sel & ~((1u << RW_SEL_EXE_BASE) - 1);

	return (!cg || (cg & origin)) && (!exe || (exe & origin));
}
