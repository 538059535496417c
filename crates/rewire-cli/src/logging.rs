//! rewire's own log lines: text (coloured only on a terminal) or JSON on
//! stderr, filtered by `$REWIRE_LOG` (default `info`). The filter sits in a
//! `tracing_subscriber` reload layer so that a running daemon's can be
//! changed without a restart (`rewire log-level`, through the control
//! socket): raising it to `debug` while a problem happens, then back.
//!
//! Under systemd, stderr is often the journal (`JOURNAL_STREAM` names its
//! device and inode): every line then starts with its syslog priority
//! (`<3>` error, `<4>` warning, `<5>` a kernel decision, `<6>` info, `<7>`
//! debug), which journald takes as the entry's priority and strips, so
//! `journalctl -p warning -u rewire` shows what needs attention.

use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The filter's reload handle, and the text it was made from.
struct Filter {
    handle: reload::Handle<EnvFilter, Registry>,
    spec: std::sync::Mutex<String>,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Installs the global subscriber: `json` lines or text, with the filter
/// `$REWIRE_LOG` gives (`info` if unset or invalid).
pub fn init(json: bool) {
    let spec =
        std::env::var(rewire_control::paths::ENV_LOG).ok().filter(|s| EnvFilter::try_new(s).is_ok()).unwrap_or_else(|| "info".into());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&spec));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    let journal = to_journal();
    if json {
        let f = fmt.json().flatten_event(true);
        registry.with(f.map_event_format(|e| Priority { inner: e, journal })).init();
    } else {
        let f = fmt.with_ansi(!journal && std::io::IsTerminal::is_terminal(&std::io::stderr()));
        registry.with(f.map_event_format(|e| Priority { inner: e, journal })).init();
    }
    let _ = FILTER.set(Filter { handle, spec: std::sync::Mutex::new(spec) });
}

/// The filter in effect.
pub fn current() -> String {
    FILTER.get().map(|f| f.spec.lock().unwrap_or_else(|e| e.into_inner()).clone()).unwrap_or_default()
}

/// Replaces the filter (`EnvFilter` syntax); the old one stays on error.
pub fn set(spec: &str) -> Result<String, String> {
    let f = FILTER.get().ok_or("logging is not set up")?;
    let new = EnvFilter::try_new(spec).map_err(|e| format!("`{spec}` is not a log filter: {e}"))?;
    let mut cur = f.spec.lock().unwrap_or_else(|e| e.into_inner());
    // Said under the old filter, which shows info lines unless set lower.
    tracing::info!("log filter changes from `{cur}` to `{spec}`");
    f.handle.reload(new).map_err(|e| format!("cannot change the log filter: {e}"))?;
    *cur = spec.to_string();
    Ok(spec.to_string())
}

/// Whether stderr is the journal's stream (`JOURNAL_STREAM` is
/// `<device>:<inode>` of the very descriptor systemd connected).
pub fn to_journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let Some((dev, ino)) = std::env::var("JOURNAL_STREAM").ok().and_then(|v| {
            let (d, i) = v.split_once(':')?;
            Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
        }) else {
            return false;
        };
        nix::sys::stat::fstat(libc::STDERR_FILENO).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
    })
}

/// The syslog priority prefix of a line at `level` (`<6>` for info).
fn prefix(level: Level) -> &'static str {
    match level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        _ => "<7>",
    }
}

/// A line format that starts each line with its priority when stderr is the journal.
struct Priority<F> {
    inner: F,
    journal: bool,
}

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        if self.journal {
            writer.write_str(prefix(*event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}
