//! The scope program (`bpf/scope.bpf.c`): keeps the scope id (`%eth0`) of
//! an IPv6 link-local original destination.
//!
//! The hooks' sock_addr context has no `sin6_scope_id`; these two programs
//! read it from the kernel's copy of the address (`bpf_cast_to_kern_ctx`, a
//! kfunc, so loaded with libbpf as the guard is) and leave it in the hooks'
//! per-CPU map `rw_scope` for the same call. They are attached to the
//! hooks' cgroup with `BPF_F_PREORDER` (Linux 6.15+), which runs them before
//! the hooks' own connect6/sendmsg6 whatever the attach order. They refuse
//! nothing: where they cannot be loaded or attached, link-local
//! destinations are recorded with scope id 0 (as before) and the caller is
//! told why.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::bpfsys;
use crate::libbpf::Object;
use crate::paths::scope_dir;

/// `BPF_F_PREORDER` (not in every system's headers yet).
const BPF_F_PREORDER: u32 = 1 << 6;

/// The loaded and attached scope programs; detached when dropped.
pub struct Scope {
    _links: Vec<OwnedFd>,
    _obj: Object,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scope")
    }
}

fn err(what: &str, e: io::Error) -> String {
    format!("the link-local scope program: {what}: {e}")
}

impl Scope {
    /// Loads the programs with the hooks' `rw_scope` map and attaches them
    /// to `cgroup` (the hooks' own) ahead of the hooks.
    pub fn attach(rw_scope: BorrowedFd<'_>, cgroup: &Path) -> Result<Self, String> {
        let obj = load(rw_scope)?;
        let cg = File::open(cgroup).map_err(|e| err(&format!("opening {}", cgroup.display()), e))?;
        let mut links = vec![];
        for &(prog, section) in rewire_bpf::SCOPE_PROGRAMS {
            let t = bpfsys::cgroup_attach_type(section).expect("sock_addr section");
            let link = bpfsys::link_create_flags(prog_fd(&obj, prog)?, cg.as_fd(), t, BPF_F_PREORDER)
                .map_err(|e| err(&format!("attaching {prog} ahead of the hooks (BPF_F_PREORDER, Linux 6.15+)"), e))?;
            links.push(link);
        }
        Ok(Scope { _links: links, _obj: obj })
    }

    /// The daemon's: loaded with the `rw_scope` pinned in `dir`, links
    /// pinned in `<dir>/scope/`; links already attached to `cgroup` are
    /// updated in place, others replaced.
    pub fn persistent(cgroup: &Path, dir: &Path) -> Result<(), String> {
        Self::persistent_loaded(cgroup, dir, load_pinned(dir))
    }

    /// As [`Scope::persistent`], with the object loaded ahead by [`load_pinned`].
    pub(crate) fn persistent_loaded(cgroup: &Path, dir: &Path, obj: Result<Object, String>) -> Result<(), String> {
        let obj = obj?;
        let cg_id = crate::cgroup::cgroup_id(cgroup).map_err(|e| err("the cgroup's id", io::Error::other(e.to_string())))?;
        let cg = File::open(cgroup).map_err(|e| err(&format!("opening {}", cgroup.display()), e))?;
        let sdir = scope_dir(dir);
        std::fs::create_dir_all(&sdir).map_err(|e| err(&format!("creating {}", sdir.display()), e))?;
        for &(prog, section) in rewire_bpf::SCOPE_PROGRAMS {
            let fd = prog_fd(&obj, prog)?;
            let path = sdir.join(prog);
            if let Ok(link) = bpfsys::obj_get(&path) {
                if bpfsys::link_info(link.as_fd()).is_ok_and(|i| i.attached_to(cg_id)) {
                    bpfsys::link_update(link.as_fd(), fd).map_err(|e| err(&format!("updating {prog}"), e))?;
                    continue;
                }
                let _ = bpfsys::link_detach(link.as_fd());
                std::fs::remove_file(&path).map_err(|e| err(&format!("removing {}", path.display()), e))?;
            }
            let t = bpfsys::cgroup_attach_type(section).expect("sock_addr section");
            let link = bpfsys::link_create_flags(fd, cg.as_fd(), t, BPF_F_PREORDER)
                .map_err(|e| err(&format!("attaching {prog} ahead of the hooks (BPF_F_PREORDER, Linux 6.15+)"), e))?;
            bpfsys::obj_pin(link.as_fd(), &path).map_err(|e| err(&format!("pinning {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// Detaches and unpins a daemon's scope links; how many.
pub fn remove_pinned(dir: &Path) -> io::Result<usize> {
    bpfsys::remove_pinned_links(&scope_dir(dir)).map_err(|(_, e)| e)
}

/// Loads the scope object with the `rw_scope` pinned in `dir` (not attached).
pub(crate) fn load_pinned(dir: &Path) -> Result<Object, String> {
    let map = bpfsys::obj_get(&dir.join("rw_scope")).map_err(|e| err("opening the pinned rw_scope", e))?;
    load(map.as_fd())
}

/// Loads the scope object with the hooks' `rw_scope` map.
fn load(rw_scope: BorrowedFd<'_>) -> Result<Object, String> {
    Object::load(rewire_bpf::scope_object(), "rewire_scope", &[("rw_scope", rw_scope)]).map_err(|e| err(e.what, e.source))
}

/// The loaded program `prog`'s descriptor.
fn prog_fd<'a>(obj: &'a Object, prog: &str) -> Result<BorrowedFd<'a>, String> {
    obj.prog_fd(prog).map_err(|e| err(e.what, e.source))
}
