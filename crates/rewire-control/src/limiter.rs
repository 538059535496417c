//! Rate limits for event lines, so that no process can drown the log.
//!
//! The kernel reports a refusal for every datagram or connect it refuses:
//! a process sending refused datagrams in a loop makes millions of events a
//! second. [`EventLimiter`] lets through at most
//! [`Limits::lines_per_origin`] lines per *origin* (process and event kind)
//! and [`Limits::lines_total`] lines overall in each interval; the rest are
//! counted, and [`EventLimiter::end_interval`] returns one [`Suppressed`]
//! summary per origin that had events held back. The number of tracked
//! origins is capped ([`Limits::max_origins`]): idle ones are evicted, and
//! events of new origins beyond the cap are counted per kind under "other
//! processes". Memory stays bounded whatever the event rate, and so does the
//! output: at most `lines_total + max_origins + kinds` lines per interval.
//!
//! The kernel's per-cause counters ([`crate::hooks::Counters`]) count every
//! decision whatever is printed or suppressed.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::events::EventKind;

/// How many lines the limiter lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Lines per origin (process and event kind) per interval.
    pub lines_per_origin: u32,
    /// Lines of all origins together per interval.
    pub lines_total: u32,
    /// Origins tracked at once.
    pub max_origins: usize,
    /// The interval (one second).
    pub interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { lines_per_origin: 10, lines_total: 200, max_origins: 256, interval: Duration::from_secs(1) }
    }
}

/// Where events come from: one process and one kind of event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Origin {
    /// The process's uid.
    pub uid: u32,
    /// The process.
    pub pid: u32,
    /// The kind of event.
    pub kind: EventKind,
}

#[derive(Clone, Copy, Debug)]
struct State {
    /// Its command name, as the kernel reports it (NUL-padded).
    comm: [u8; 16],
    /// Events this interval.
    seen: u64,
    /// Lines printed this interval.
    printed: u32,
    /// Events held back this interval.
    suppressed: u64,
}

/// One summary line: `count` events of `kind` were not printed in the last
/// `seconds`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Suppressed {
    /// The kind of event.
    pub kind: EventKind,
    /// How many were not printed.
    pub count: u64,
    /// The process's command name (None: other processes, beyond the cap).
    pub command: Option<String>,
    /// The process (None: other processes, beyond the cap).
    pub pid: Option<u32>,
    /// Its uid (None: other processes, beyond the cap).
    pub uid: Option<u32>,
    /// The length of the interval summarised.
    pub seconds: f64,
}

impl std::fmt::Display for Suppressed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "suppressed {} {} event(s) from ", self.count, self.kind)?;
        match (&self.command, self.pid, self.uid) {
            (Some(c), Some(p), Some(u)) => write!(f, "{c} (pid {p}, uid {u})")?,
            _ => write!(f, "other processes (too many at once to name each)")?,
        }
        write!(f, " in the last {:.1} s (rate limit; the counters count them all)", self.seconds)
    }
}

/// Decides which events are printed; see the module documentation.
#[derive(Debug)]
pub struct EventLimiter {
    limits: Limits,
    origins: HashMap<Origin, State>,
    /// Events of origins that found the table full, per kind.
    overflow: Vec<(EventKind, u64)>,
    /// Lines printed this interval, all origins.
    printed: u32,
    /// Whether an entry may be idle this interval (a fruitless search clears it).
    may_evict: bool,
}

impl EventLimiter {
    /// A limiter with `limits`.
    pub fn new(limits: Limits) -> Self {
        EventLimiter { limits, origins: HashMap::new(), overflow: Vec::new(), printed: 0, may_evict: true }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Origins tracked right now (at most [`Limits::max_origins`]).
    pub fn tracked(&self) -> usize {
        self.origins.len()
    }

    /// Whether an event from `origin` (command `comm`) is printed; if not,
    /// it is counted for the interval's summary.
    pub fn admit(&mut self, origin: Origin, comm: &[u8; 16]) -> bool {
        let total_ok = self.printed < self.limits.lines_total;
        let per_origin = self.limits.lines_per_origin;
        if !self.origins.contains_key(&origin) && self.origins.len() >= self.limits.max_origins && !self.evict_idle() {
            self.count_overflow(origin.kind);
            return false;
        }
        let st = self.origins.entry(origin).or_insert(State { comm: *comm, seen: 0, printed: 0, suppressed: 0 });
        st.seen += 1;
        st.comm = *comm;
        if total_ok && st.printed < per_origin {
            st.printed += 1;
            self.printed += 1;
            true
        } else {
            st.suppressed += 1;
            false
        }
    }

    /// Removes one origin without events this interval (it has nothing to
    /// report). Searches at most once per interval in vain.
    fn evict_idle(&mut self) -> bool {
        if !self.may_evict {
            return false;
        }
        match self.origins.iter().find(|(_, s)| s.seen == 0).map(|(k, _)| *k) {
            Some(k) => {
                self.origins.remove(&k);
                true
            }
            None => {
                self.may_evict = false;
                false
            }
        }
    }

    fn count_overflow(&mut self, kind: EventKind) {
        match self.overflow.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => self.overflow.push((kind, 1)),
        }
    }

    /// Ends the interval (which lasted `elapsed`): returns the summaries of
    /// what was held back, sorted by uid, pid and kind, then those of
    /// other processes; forgets origins idle for the whole interval.
    pub fn end_interval(&mut self, elapsed: Duration) -> Vec<Suppressed> {
        let seconds = elapsed.as_secs_f64();
        let mut out: Vec<(Origin, Suppressed)> = self
            .origins
            .iter()
            .filter(|(_, s)| s.suppressed > 0)
            .map(|(o, s)| {
                let sup = Suppressed {
                    kind: o.kind,
                    count: s.suppressed,
                    command: Some(rewire::comm_to_string(&s.comm)),
                    pid: Some(o.pid),
                    uid: Some(o.uid),
                    seconds,
                };
                (*o, sup)
            })
            .collect();
        out.sort_by_key(|(o, _)| *o);
        let mut out: Vec<Suppressed> = out.into_iter().map(|(_, s)| s).collect();
        self.overflow.sort_by_key(|(k, _)| *k);
        out.extend(self.overflow.drain(..).map(|(kind, count)| Suppressed { kind, count, command: None, pid: None, uid: None, seconds }));
        self.origins.retain(|_, s| s.seen > 0);
        for s in self.origins.values_mut() {
            *s = State { seen: 0, printed: 0, suppressed: 0, ..*s };
        }
        self.printed = 0;
        self.may_evict = true;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(pid: u32, kind: EventKind) -> Origin {
        Origin { uid: 65534, pid, kind }
    }

    fn comm(s: &str) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..s.len()].copy_from_slice(s.as_bytes());
        c
    }

    fn limits(per: u32, total: u32, max: usize) -> Limits {
        Limits { lines_per_origin: per, lines_total: total, max_origins: max, interval: Duration::from_secs(1) }
    }

    #[test]
    fn each_origin_gets_its_lines_then_one_summary() {
        let mut l = EventLimiter::new(limits(3, 100, 8));
        let flood = (0..1000).filter(|_| l.admit(o(1, EventKind::NoListener), &comm("flood"))).count();
        let witness = (0..5).filter(|_| l.admit(o(2, EventKind::NoListener), &comm("witness"))).count();
        let other_kind = (0..2).filter(|_| l.admit(o(1, EventKind::Redirect), &comm("flood"))).count();
        assert_eq!((flood, witness, other_kind), (3, 3, 2), "the flood does not eat the witness's lines");
        let s = l.end_interval(Duration::from_secs(1));
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!((s[0].pid, s[0].count, s[0].kind), (Some(1), 997, EventKind::NoListener));
        assert_eq!((s[1].pid, s[1].count), (Some(2), 2));
        assert_eq!(
            s[0].to_string(),
            "suppressed 997 no_listener event(s) from flood (pid 1, uid 65534) in the last 1.0 s \
             (rate limit; the counters count them all)"
        );
        let j = serde_json::to_value(&s[1]).unwrap();
        assert_eq!(j["kind"], "no_listener");
        assert_eq!(j["command"], "witness");
        // A new interval: lines again, nothing left to summarise.
        assert!(l.admit(o(1, EventKind::NoListener), &comm("flood")));
        assert!(l.end_interval(Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn the_total_limit_holds_across_origins_and_is_summarised() {
        let mut l = EventLimiter::new(limits(10, 25, 1000));
        let printed = (0..100u32).filter(|i| l.admit(o(i % 50, EventKind::NoListener), &comm("x"))).count();
        assert_eq!(printed, 25);
        let s = l.end_interval(Duration::from_secs(1));
        assert_eq!(s.iter().map(|s| s.count).sum::<u64>(), 75, "every held-back event is in a summary");
    }

    #[test]
    fn origins_are_capped_idle_ones_evicted_and_the_rest_counted_as_others() {
        let mut l = EventLimiter::new(limits(1, 1000, 4));
        let mut admitted = 0;
        for pid in 0..100 {
            admitted += l.admit(o(pid, EventKind::NoListener), &comm("fork")) as u32;
        }
        assert_eq!(l.tracked(), 4);
        assert_eq!(admitted, 4);
        let s = l.end_interval(Duration::from_secs(1));
        let others: Vec<_> = s.iter().filter(|s| s.pid.is_none()).collect();
        assert_eq!(others.len(), 1, "{s:?}");
        assert_eq!(others[0].count, 96);
        assert!(others[0].to_string().contains("other processes"), "{}", others[0]);
        // Those four were active: kept for one interval, then evicted when idle.
        assert_eq!(l.tracked(), 4);
        assert!(l.admit(o(1000, EventKind::NoListener), &comm("new")), "an idle origin made room");
        assert_eq!(l.tracked(), 4);
        l.end_interval(Duration::from_secs(1));
        assert_eq!(l.tracked(), 1, "idle origins are forgotten");
        l.end_interval(Duration::from_secs(1));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn nothing_is_lost_between_lines_and_summaries() {
        let mut l = EventLimiter::new(Limits::default());
        let mut printed = 0u64;
        let mut summarised = 0u64;
        let n = 200_000u64;
        for i in 0..n {
            let pid = (i % 1000) as u32 * ((i / 50_000) as u32 + 1);
            printed += l.admit(o(pid, EventKind::NoListener), &comm("p")) as u64;
            if i % 30_000 == 0 {
                summarised += l.end_interval(Duration::from_secs(1)).iter().map(|s| s.count).sum::<u64>();
            }
            assert!(l.tracked() <= Limits::default().max_origins);
        }
        summarised += l.end_interval(Duration::from_secs(1)).iter().map(|s| s.count).sum::<u64>();
        assert_eq!(printed + summarised, n);
    }
}
