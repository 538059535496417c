//! Telling a service manager what the daemon is doing (`sd_notify(3)`), so
//! that a unit with `Type=notify` (deploy/systemd/rewire.service) is started
//! only once the hooks are attached or adopted, and units ordered after it
//! never start inside a subtree that has no hooks yet. Reloads are framed by
//! `RELOADING=1` (with `MONOTONIC_USEC`) and `READY=1`; `STATUS=` says what
//! the daemon is doing in `systemctl status`.
//!
//! Without `NOTIFY_SOCKET` in the environment every call does nothing. A
//! failed notification is said once in the log and never stops the daemon.

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

static WARNED: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {e}");
        }
    }
}

/// `STATUS=` only.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// `READY=1` with a status line: the hooks are attached (or adopted), or a
/// reload is over (applied or refused: the hooks enforce either way).
pub fn ready(line: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(line)]);
}

/// `RELOADING=1` with the monotonic time systemd needs to pair it.
pub fn reloading(line: &str) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now, NotifyState::Status(line)]),
        Err(_) => send(&[NotifyState::Reloading, NotifyState::Status(line)]),
    }
}

/// `STOPPING=1`: the daemon ends (the hooks stay).
pub fn stopping(line: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(line)]);
}
