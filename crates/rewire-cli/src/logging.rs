//! rewire's own log lines: text (coloured only on a terminal) or JSON on
//! stderr, filtered by `$REWIRE_LOG` (default `info`). The filter sits in a
//! `tracing_subscriber` reload layer so that a running daemon's can be
//! changed without a restart (`rewire log-level`, through the control
//! socket): raising it to `debug` while a problem happens, then back.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
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
    if json {
        registry.with(fmt.json().flatten_event(true)).init();
    } else {
        registry.with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))).init();
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
