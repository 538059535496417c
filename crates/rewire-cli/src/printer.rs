//! The event printer of `rewire run` and `rewire daemon`: the kernel's
//! decisions as lines on stderr (text or JSON), rate-limited per process
//! and kind ([`EventLimiter`]), with one summary per origin and interval
//! for what was held back, a line whenever the kernel's ring buffer dropped
//! events (read from the per-cause counters, which never lose a count), and
//! the counters when it stops.

use std::io::Write;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::unix::AsyncFd;

use rewire::abi::RwEvent;
use rewire_control::events::{Event, EventKind};
use rewire_control::hooks::{Counters, Events};
use rewire_control::limiter::{EventLimiter, Limits, Origin, Suppressed};
use rewire_control::Config;

/// How `rewire run` and `rewire daemon` print the kernel's events.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum EventFormat {
    Text,
    Json,
    Off,
}

/// Reads the kernel's counters; None when they cannot be read right now.
pub type CountersFn = Box<dyn FnMut() -> Option<Counters> + Send>;

/// Events taken from the ring buffer before the printer looks at its clock again.
const BATCH: usize = 4096;
/// Events drained at most when stopping (the ring buffer holds a few thousand).
const FINAL_DRAIN: usize = 1 << 20;

/// Formats and writes what the printer has to say.
pub struct Printer<W: Write> {
    cfg: Arc<RwLock<Config>>,
    format: EventFormat,
    limiter: EventLimiter,
    counters: CountersFn,
    /// The counters at the last look (None: never read).
    last: Option<Counters>,
    /// Start of the current interval.
    window: Instant,
    buf: Vec<u8>,
    out: W,
    /// Lines start with their syslog priority (stderr is the journal; see `logging`).
    journal: bool,
}

#[derive(Serialize)]
struct LostRecord {
    /// Events the ring buffer dropped since the last look.
    dropped: u64,
    /// Over how long.
    seconds: f64,
    /// The counters now.
    counters: Counters,
}

impl<W: Write> Printer<W> {
    /// A printer writing to `out`; reads the counters once as the baseline.
    pub fn new(cfg: Arc<RwLock<Config>>, format: EventFormat, limits: Limits, mut counters: CountersFn, out: W) -> Self {
        let last = counters();
        Printer {
            cfg,
            format,
            limiter: EventLimiter::new(limits),
            counters,
            last,
            window: Instant::now(),
            buf: Vec::new(),
            out,
            journal: false,
        }
    }

    /// Starts each line with its syslog priority (`<5>` a decision, `<4>` events lost), for the journal.
    pub fn with_priorities(mut self, journal: bool) -> Self {
        self.journal = journal;
        self
    }

    /// The interval of the rate limits and counter checks.
    pub fn interval(&self) -> Duration {
        self.limiter.limits().interval
    }

    /// One kernel event: printed, or counted for the interval's summary.
    pub fn event(&mut self, raw: &RwEvent) {
        if matches!(self.format, EventFormat::Off) {
            return;
        }
        let Some(kind) = EventKind::from_code(raw.kind) else { return };
        if !self.limiter.admit(Origin { uid: raw.uid, pid: raw.pid, kind }, &raw.comm) {
            return;
        }
        // Decoded only when printed: a flood costs the printer little.
        let Some(ev) = Event::from_raw(raw, &self.cfg.read().unwrap_or_else(|e| e.into_inner())) else { return };
        match self.format {
            EventFormat::Text => self.line(format_args!("rewire: {ev}")),
            EventFormat::Json => self.json(&ev),
            EventFormat::Off => {}
        }
    }

    /// Ends the interval: summaries of what was held back, and a line if
    /// the ring buffer dropped events.
    pub fn tick(&mut self) {
        let elapsed = std::mem::replace(&mut self.window, Instant::now()).elapsed();
        let seconds = elapsed.as_secs_f64();
        if matches!(self.format, EventFormat::Off) {
            return;
        }
        for s in self.limiter.end_interval(elapsed) {
            self.suppressed(&s);
        }
        let Some(now) = (self.counters)() else { return };
        let dropped = now.events_lost.saturating_sub(self.last.map_or(0, |c| c.events_lost));
        self.last = Some(now);
        if dropped == 0 {
            return;
        }
        match self.format {
            EventFormat::Text => self.line_at(
                4,
                format_args!(
                    "rewire: the kernel dropped {dropped} event(s) in the last {seconds:.1} s (ring buffer full: they \
                 came faster than they were read); the counters count every decision: {now}"
                ),
            ),
            EventFormat::Json => self.json_at(
                4,
                &serde_json::json!({
                    "events_lost": LostRecord { dropped, seconds, counters: now }
                }),
            ),
            EventFormat::Off => {}
        }
    }

    /// The last interval and the counters, when the printer stops.
    pub fn finish(&mut self) {
        self.tick();
        if matches!(self.format, EventFormat::Off) {
            return;
        }
        if let Some(c) = (self.counters)() {
            match self.format {
                EventFormat::Text => self.line(format_args!("rewire: counters: {c}")),
                EventFormat::Json => self.json(&serde_json::json!({ "counters": c })),
                EventFormat::Off => {}
            }
        }
        self.flush();
    }

    fn suppressed(&mut self, s: &Suppressed) {
        match self.format {
            EventFormat::Text => self.line(format_args!("rewire: {s}")),
            EventFormat::Json => self.json(&serde_json::json!({ "suppressed": s })),
            EventFormat::Off => {}
        }
    }

    fn line(&mut self, args: std::fmt::Arguments<'_>) {
        self.line_at(5, args)
    }

    fn line_at(&mut self, priority: u8, args: std::fmt::Arguments<'_>) {
        self.priority(priority);
        let _ = self.buf.write_fmt(args);
        self.buf.push(b'\n');
    }

    /// One JSON line, with the wall-clock time it was written
    /// (`timestamp_unix`, seconds since the epoch).
    fn json<T: Serialize>(&mut self, v: &T) {
        self.json_at(5, v)
    }

    fn json_at<T: Serialize>(&mut self, priority: u8, v: &T) {
        let Ok(mut v) = serde_json::to_value(v) else { return };
        self.priority(priority);
        if let Some(o) = v.as_object_mut() {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            o.insert("timestamp_unix".into(), serde_json::Value::from(now.as_secs_f64()));
        }
        if serde_json::to_writer(&mut self.buf, &v).is_ok() {
            self.buf.push(b'\n');
        }
    }

    fn priority(&mut self, priority: u8) {
        if self.journal {
            let _ = write!(self.buf, "<{priority}>");
        }
    }

    /// Writes what is buffered.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.out.write_all(&self.buf);
            let _ = self.out.flush();
            self.buf.clear();
        }
    }
}

/// A running printer task; [`PrinterHandle::stop`] ends it cleanly.
pub struct PrinterHandle {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl PrinterHandle {
    /// Prints what is left in the ring buffer, the last summaries and the
    /// counters, then ends the task (aborted if that takes over 5 s).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Prints the kernel's events to stderr until stopped.
///
/// `since`: the counters from which on drops are reported (a daemon reads
/// them before it attaches, so that drops before the printer starts are
/// reported too); `None`: from the printer's start.
pub fn spawn(
    events: Events,
    cfg: Arc<RwLock<Config>>,
    format: EventFormat,
    limits: Limits,
    counters: CountersFn,
    since: Option<Counters>,
) -> PrinterHandle {
    let (stop, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut printer = Printer::new(cfg, format, limits, counters, std::io::stderr()).with_priorities(crate::logging::to_journal());
        if since.is_some() {
            printer.last = since;
        }
        serve(events, printer, rx).await;
    });
    PrinterHandle { stop, task }
}

async fn serve<W: Write>(events: Events, mut p: Printer<W>, mut stop: tokio::sync::oneshot::Receiver<()>) {
    // SAFETY: the ring buffer's fd is owned by `events`, which the AsyncFd
    // owns: it stays open for as long as it is registered.
    let mut fd = match unsafe { AsyncFd::register(events) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot watch the event ring buffer: {e}; no events are printed");
            return;
        }
    };
    let interval = p.interval();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // The clock and the stop come first: a flood keeps the ring
            // buffer readable all the time.
            biased;
            _ = &mut stop => break,
            _ = tick.tick() => p.tick(),
            r = fd.readable_mut() => {
                let Ok(mut guard) = r else { break };
                let mut n = 0;
                while n < BATCH {
                    let Some(raw) = guard.get_inner_mut().next_event() else { break };
                    p.event(&raw);
                    n += 1;
                }
                if n < BATCH {
                    guard.clear_ready();
                }
            }
        }
        p.flush();
    }
    let events = fd.get_mut();
    for _ in 0..FINAL_DRAIN {
        let Some(raw) = events.next_event() else { break };
        p.event(&raw);
    }
    p.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: u32, pid: u32) -> RwEvent {
        let mut e = RwEvent { kind, pid, uid: 65534, err: -libc::ECONNREFUSED, service_id: 1, ..Default::default() };
        e.comm[..5].copy_from_slice(b"flood");
        e
    }

    fn cfg() -> Arc<RwLock<Config>> {
        let c = Config::parse(
            "cgroup = \"t\"\n[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:1\"\nmatch = { ports = 80 }\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        Arc::new(RwLock::new(c))
    }

    /// A counters source the test moves: `events_lost` as given.
    fn counters(lost: Arc<std::sync::atomic::AtomicU64>) -> CountersFn {
        Box::new(move || Some(Counters { events_lost: lost.load(std::sync::atomic::Ordering::SeqCst), ..Default::default() }))
    }

    fn run(format: EventFormat) -> String {
        let lost = Arc::new(std::sync::atomic::AtomicU64::new(7));
        let limits = Limits { lines_per_origin: 2, ..Limits::default() };
        let mut p = Printer::new(cfg(), format, limits, counters(lost.clone()), Vec::new());
        for _ in 0..1000 {
            p.event(&raw(rewire::abi::RW_REASON_NO_LISTENER, 42));
        }
        p.event(&raw(99, 42)); // unknown kind: ignored
        p.tick(); // the baseline (7) is not news
        lost.store(17, std::sync::atomic::Ordering::SeqCst);
        p.event(&raw(rewire::abi::RW_REASON_NO_LISTENER, 42));
        p.finish();
        String::from_utf8(p.out.clone()).unwrap()
    }

    #[test]
    fn text_output_is_limited_summarised_and_reports_drops() {
        let out = run(EventFormat::Text);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2 + 1 + 1 + 1 + 1, "{out}");
        assert!(lines[0].starts_with("rewire: REFUSED tcp flow"), "{out}");
        assert!(lines[2].starts_with("rewire: suppressed 998 no_listener event(s) from flood (pid 42, uid 65534)"), "{out}");
        assert!(lines[3].starts_with("rewire: REFUSED"), "a new interval prints again: {out}");
        assert!(lines[4].starts_with("rewire: the kernel dropped 10 event(s) in the last"), "{out}");
        assert!(lines[4].contains("events_lost=17"), "{out}");
        assert!(lines[5].starts_with("rewire: counters: redirect=0"), "{out}");
    }

    #[test]
    fn json_output_has_suppressed_events_lost_and_counters_records() {
        let out = run(EventFormat::Json);
        let v: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(v.len(), 6, "{out}");
        assert_eq!(v[0]["kind"], "no_listener");
        assert_eq!(v[2]["suppressed"]["count"], 998);
        assert_eq!(v[2]["suppressed"]["pid"], 42);
        assert_eq!(v[2]["suppressed"]["command"], "flood");
        assert_eq!(v[4]["events_lost"]["dropped"], 10);
        assert_eq!(v[4]["events_lost"]["counters"]["events_lost"], 17);
        assert_eq!(v[5]["counters"]["events_lost"], 17);
    }

    #[test]
    fn off_prints_nothing() {
        assert_eq!(run(EventFormat::Off), "");
    }
}
