//! Loading (verifying) the hooks' programs, and what it costs.
//!
//! Almost all of the time from `rewire daemon`'s start to hooks attached,
//! and of every reload, is the kernel's verifier: each program of the
//! object is verified at each load, its global functions with it (about
//! half a million verified instructions in all). The kernel verifies
//! privileged loads concurrently (no global verifier lock for
//! `CAP_BPF`/`CAP_SYS_ADMIN` callers), so the programs are loaded from as
//! many threads as there are CPUs, biggest first. Nothing else changes:
//! the same programs, with the same maps, are verified the same way;
//! attaching happens after every program is loaded, as before.
//!
//! [`LoadTimes`] records where the time went, for the daemon's log line
//! (`hooks attached in 0.83 s (verify 0.70 s ...)`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use aya::programs::Program;
use aya::Ebpf;

use crate::error::HooksError;

/// Where the time of one load of the hooks went.
#[derive(Clone, Debug, Default)]
pub struct LoadTimes {
    /// Parsing the object, creating (or opening the pinned) maps and
    /// relocating: `EbpfLoader::load`.
    pub maps: Duration,
    /// Writing the configuration's tables into the maps.
    pub tables: Duration,
    /// Wall time of loading every program (the verifier).
    pub verify: Duration,
    /// Threads the programs were loaded from.
    pub threads: usize,
    /// Per program: its name, how long its load took, and how many
    /// instructions the verifier walked (`verified_insns`, when the
    /// kernel reports it).
    pub programs: Vec<(&'static str, Duration, Option<u32>)>,
    /// Pinning the maps (staged) and putting the links live (update,
    /// create, pin), and publishing the staged maps.
    pub links: Duration,
    /// The programs were loaded ahead, before the reload that put them
    /// live (`verify` and `maps` were not part of its time).
    pub ahead: bool,
    /// How long the reload waited for the programs loaded ahead (a reload
    /// right after the previous one finds them still loading).
    pub waited: Duration,
}

impl LoadTimes {
    /// The sum of every program's verified instructions.
    pub fn verified_insns(&self) -> u64 {
        self.programs.iter().filter_map(|p| p.2).map(u64::from).sum()
    }

    /// The sum of the programs' own load times (more than [`Self::verify`]
    /// when they were loaded in parallel).
    pub fn verify_cpu(&self) -> Duration {
        self.programs.iter().map(|p| p.1).sum()
    }

    /// Every program, slowest first: `name 0.123 s 45678 insns`.
    pub fn per_program(&self) -> String {
        let mut p = self.programs.clone();
        p.sort_by_key(|p| std::cmp::Reverse(p.1));
        p.iter()
            .map(|(n, t, i)| format!("{n} {:.3} s {} insns", t.as_secs_f64(), i.map_or("?".into(), |i| i.to_string())))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for LoadTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ahead {
            write!(
                f,
                "programs verified ahead ({:.2} s, {}k insns, maps {:.2} s; waited {:.2} s for them); tables {:.2} s; pins and links {:.2} s",
                self.verify.as_secs_f64(),
                self.verified_insns() / 1000,
                self.maps.as_secs_f64(),
                self.waited.as_secs_f64(),
                self.tables.as_secs_f64(),
                self.links.as_secs_f64()
            )?;
            return Ok(());
        }
        write!(
            f,
            "verify {:.2} s ({} programs, {}k insns, {:.2} s over {} thread(s)); maps {:.2} s; tables {:.2} s; pins and links {:.2} s",
            self.verify.as_secs_f64(),
            self.programs.len(),
            self.verified_insns() / 1000,
            self.verify_cpu().as_secs_f64(),
            self.threads,
            self.maps.as_secs_f64(),
            self.tables.as_secs_f64(),
            self.links.as_secs_f64()
        )
    }
}

/// How many threads load programs: one per CPU this process may run on
/// (`REWIRE_LOAD_THREADS` overrides it, to measure), at most one per program.
fn threads(programs: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = std::env::var(crate::paths::ENV_LOAD_THREADS).ok().and_then(|v| v.parse().ok()).unwrap_or(cpus);
    n.clamp(1, programs.max(1))
}

/// Loads (verifies) the programs `names` of `bpf`, from several threads,
/// and records their times in `times`. The first error is returned (the
/// other loads finish; a failed generation is dropped whole).
pub(crate) fn load_programs(bpf: &mut Ebpf, names: &[&'static str], times: &mut LoadTimes) -> Result<(), HooksError> {
    let start = Instant::now();
    // In the order of `names` (rewire_bpf::PROGRAMS lists the biggest first),
    // so the longest loads start first and the short ones fill in.
    let mut work: Vec<(usize, &'static str, &mut Program)> = vec![];
    for (name, prog) in bpf.programs_mut() {
        if let Some(i) = names.iter().position(|&n| n == name) {
            work.push((i, names[i], prog));
        }
    }
    if let Some(&missing) = names.iter().find(|n| !work.iter().any(|w| w.1 == **n)) {
        return Err(HooksError::Config(format!("object lacks {missing}")));
    }
    work.sort_by_key(|w| std::cmp::Reverse(w.0));
    let n = threads(work.len());
    let queue = Mutex::new(work);
    let results = Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| loop {
                let Some((_, name, prog)) = queue.lock().unwrap_or_else(|e| e.into_inner()).pop() else { break };
                let t = Instant::now();
                let r = load_one(name, prog);
                let took = t.elapsed();
                let insns = prog.info().ok().and_then(|i| i.verified_instruction_count());
                results.lock().unwrap_or_else(|e| e.into_inner()).push((name, took, insns, r));
            });
        }
    });
    times.verify += start.elapsed();
    times.threads = n;
    let mut first_err = None;
    for (name, took, insns, r) in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        times.programs.push((name, took, insns));
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn load_one(name: &'static str, prog: &mut Program) -> Result<(), HooksError> {
    let err = |source| HooksError::Program { name, source };
    match prog {
        Program::CgroupSockAddr(p) => p.load().map_err(err),
        Program::CgroupSock(p) => p.load().map_err(err),
        Program::CgroupSockopt(p) => p.load().map_err(err),
        Program::SockOps(p) => p.load().map_err(err),
        Program::CgroupSkb(p) => p.load().map_err(err),
        Program::SkMsg(p) => p.load().map_err(err),
        _ => Err(HooksError::Config(format!("program {name} is not a cgroup program"))),
    }
}
