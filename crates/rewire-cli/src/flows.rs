//! `rewire flows`: the live redirected flows of a daemon's instance, read
//! from the kernel ([`rewire_control::flows`]: a BPF iterator over the
//! sockets reading the instance's pinned socket storage), as a table, JSON,
//! or followed (`--watch`: each flow as it starts and as it ends).
//!
//! `--watch` reads the kernel again every 200 ms (the iterator loaded once)
//! rather than the events ring buffer: a BPF ring buffer has one consumer
//! position, so a second reader next to the daemon would take the daemon's
//! events away from it (and from its journal). So a flow that starts and
//! ends between two reads is not shown; each decision is in the daemon's
//! `--events` stream.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use rewire_control::flows::{self, Flow};
use rewire_control::Config;

use crate::manage::pin_dir;

/// How often `--watch` reads the kernel.
const WATCH_EVERY: Duration = Duration::from_millis(200);

pub fn flows(config: &Path, json: bool, watch: bool) -> Result<i32> {
    let cfg = Config::load(config)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        // Not root: the daemon reads them, for root and its control group.
        const NEEDS: &str = "`rewire flows` needs root (it loads a BPF iterator and reads the kernel's per-socket state)";
        if watch {
            bail!("{NEEDS}");
        }
        let list = rewire_control::control::flows(&cfg.cgroup, Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("{NEEDS}, or a daemon that answers this user on its control socket: {e}"))?;
        if json {
            println!("{list}");
        } else {
            print_table_json(&list);
        }
        return Ok(0);
    }
    let dir = pin_dir(&cfg);
    let ctx = || format!("reading the flows of cgroup `{}`", cfg.cgroup);
    let reader = flows::FlowsReader::open(&dir).with_context(ctx)?;
    let list = || reader.list(&cfg).with_context(ctx);
    if !watch {
        let now = list()?;
        if json {
            println!("{}", serde_json::to_string(&now)?);
        } else {
            print_table(&now);
        }
        return Ok(0);
    }
    let mut live: BTreeMap<u64, Flow> = BTreeMap::new();
    loop {
        let now: BTreeMap<u64, Flow> = list()?.into_iter().map(|f| (f.id, f)).collect();
        for (id, f) in &now {
            if !live.contains_key(id) {
                emit("start", f, json)?;
            }
        }
        for (id, f) in &live {
            if !now.contains_key(id) {
                emit("end", f, json)?;
            }
        }
        live = now;
        std::thread::sleep(WATCH_EVERY);
    }
}

fn emit(what: &str, f: &Flow, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::json!({ "event": what, "flow": f }));
    } else {
        println!("{what} {}", line(f));
    }
    Ok(())
}

fn line(f: &Flow) -> String {
    let chain: Vec<&str> = f.chain.iter().map(|h| h.name.as_str()).collect();
    let dst = f.original_dst.map_or_else(|| "?".to_string(), |a| a.to_string());
    format!(
        "{:016x} {:?} pid={} comm={} uid={} dst={} chain={} age={:.1}s{}",
        f.id,
        f.protocol,
        f.pid,
        f.comm,
        f.uid,
        dst,
        chain.join(">"),
        f.age.as_secs_f64(),
        if f.delivered { " delivered" } else { "" }
    )
}

/// [`print_table`] for the flows the daemon sent (their JSON form).
fn print_table_json(list: &serde_json::Value) {
    println!(
        "{:<16} {:<5} {:>7} {:<15} {:>6} {:<40} {:<30} {:>8}",
        "FLOW", "PROTO", "PID", "COMMAND", "UID", "DESTINATION", "CHAIN", "AGE"
    );
    for f in list.as_array().into_iter().flatten() {
        let chain: Vec<&str> = f["chain"].as_array().into_iter().flatten().filter_map(|h| h["name"].as_str()).collect();
        println!(
            "{:<16} {:<5} {:>7} {:<15} {:>6} {:<40} {:<30} {:>7.1}s",
            f["id"].as_str().unwrap_or("?"),
            f["protocol"].as_str().unwrap_or("?"),
            f["pid"],
            f["comm"].as_str().unwrap_or("?"),
            f["uid"],
            f["original_dst"].as_str().unwrap_or("?"),
            chain.join(">"),
            f["age_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }
}

fn print_table(list: &[Flow]) {
    println!(
        "{:<16} {:<5} {:>7} {:<15} {:>6} {:<40} {:<30} {:>8}",
        "FLOW", "PROTO", "PID", "COMMAND", "UID", "DESTINATION", "CHAIN", "AGE"
    );
    for f in list {
        let chain: Vec<&str> = f.chain.iter().map(|h| h.name.as_str()).collect();
        let dst = f.original_dst.map_or_else(|| "?".to_string(), |a| a.to_string());
        let proto = match f.protocol {
            flows::Protocol::Tcp => "tcp",
            flows::Protocol::Udp => "udp",
        };
        println!(
            "{:016x} {:<5} {:>7} {:<15} {:>6} {:<40} {:<30} {:>7.1}s",
            f.id,
            proto,
            f.pid,
            f.comm,
            f.uid,
            dst,
            chain.join(">"),
            f.age.as_secs_f64()
        );
    }
}
