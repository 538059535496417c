//! The daemon's side of its control socket ([`rewire_control::control`]):
//! accepts connections, admits root and the configured group only (the
//! peer's credentials, whatever the socket file's mode), and answers one
//! request per connection, then closes it.
//!
//! One request per connection, with the peer checked against the group
//! admitted *when its request is answered*: a member that connected
//! before a reload removed or changed `control_group` is refused, not
//! served on a connection it kept open (the socket file's new mode only
//! stops new connects).
//!
//! `status`, `flows` and `log-level` are answered here; a `reload` is
//! handed to the daemon's loop ([`ReloadJob`]), which applies reloads one
//! at a time and sends each its own outcome back. A new operation is one
//! arm in [`answer`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use rewire_control::control::{self, Admits, Peer, Request, Response, MAX_REQUEST};

/// A reload a caller asked for, and where its answer goes.
pub struct ReloadJob {
    /// The caller's file (for messages).
    pub path: PathBuf,
    /// Its text, as the caller read it.
    pub text: String,
    /// The caller's connection waits here.
    pub reply: oneshot::Sender<Response>,
}

/// What the daemon shares with the connections it serves.
pub struct Ctx {
    /// Who may use the socket now (a reload may change `control_group`).
    pub admits: Mutex<Admits>,
    /// The status object (blocking: it reads the pins).
    pub status: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    /// The live flows (blocking: it loads an iterator and reads the kernel).
    pub flows: Box<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>,
    /// The daemon's loop takes reloads from here.
    pub reloads: mpsc::Sender<ReloadJob>,
}

/// How long a connection may take to send a complete request.
const REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `listener` until the task is aborted.
pub fn spawn(listener: std::os::unix::net::UnixListener, ctx: Arc<Ctx>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(serve(stream, ctx.clone()));
                }
                Err(e) => {
                    tracing::warn!("control socket: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn serve(stream: tokio::net::UnixStream, ctx: Arc<Ctx>) {
    let admits = *ctx.admits.lock().unwrap_or_else(|e| e.into_inner());
    let peer = match Peer::of(&stream) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("control socket: cannot read a peer's credentials ({e}); refused");
            return;
        }
    };
    let (r, mut w) = stream.into_split();
    if !admits.admits(&peer) {
        tracing::warn!("control socket: refused pid {} (uid {}, gid {}): it admits {}", peer.pid, peer.uid, peer.gid, admits.describe());
        let _ = w.write_all(&control::response_line(&control::denied(admits))).await;
        return;
    }
    let mut lines = BufReader::new(r.take(MAX_REQUEST as u64));
    let mut line = Vec::new();
    match tokio::time::timeout(REQUEST_WAIT, lines.read_until(b'\n', &mut line)).await {
        Ok(Ok(0)) | Err(_) => return,
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!("control socket: pid {}: {e}", peer.pid);
            return;
        }
    }
    // Whom the socket admits now: a reload since the connect may have
    // removed or changed the group.
    let admits = *ctx.admits.lock().unwrap_or_else(|e| e.into_inner());
    let resp = if !admits.admits(&peer) {
        tracing::warn!(
            "control socket: refused a request of pid {} (uid {}, gid {}) made on a connection opened before the group \
             changed: it admits {}",
            peer.pid,
            peer.uid,
            peer.gid,
            admits.describe()
        );
        control::denied(admits)
    } else {
        match control::parse_request(&line) {
            Ok(req) => {
                tracing::debug!("control socket: {} from pid {} (uid {})", req.op(), peer.pid, peer.uid);
                answer(req, &peer, &ctx).await
            }
            Err(e) => Response::Error { error: e.to_string() },
        }
    };
    // One request per connection: the next one connects (and is checked) again.
    let _ = w.write_all(&control::response_line(&resp)).await;
    let _ = w.shutdown().await;
}

/// The answer to one admitted request.
async fn answer(req: Request, peer: &Peer, ctx: &Arc<Ctx>) -> Response {
    match req {
        Request::Status => {
            let c = ctx.clone();
            match tokio::task::spawn_blocking(move || (c.status)()).await {
                Ok(status) => Response::Status { status },
                Err(e) => Response::Error { error: format!("status: {e}") },
            }
        }
        Request::Reload { path, text } => {
            if !path.is_absolute() {
                return Response::Error { error: format!("{}: give the configuration's absolute path", path.display()) };
            }
            tracing::info!("reload of {} asked by pid {} (uid {})", path.display(), peer.pid, peer.uid);
            let (reply, answer) = oneshot::channel();
            if ctx.reloads.send(ReloadJob { path, text, reply }).await.is_err() {
                return Response::Error { error: "the daemon is stopping".into() };
            }
            answer.await.unwrap_or_else(|_| Response::Error { error: "the daemon stopped before it answered".into() })
        }
        Request::Flows => {
            let c = ctx.clone();
            match tokio::task::spawn_blocking(move || (c.flows)()).await {
                Ok(Ok(flows)) => Response::Flows { flows },
                Ok(Err(error)) => Response::Error { error },
                Err(e) => Response::Error { error: format!("flows: {e}") },
            }
        }
        Request::LogLevel { filter: None } => Response::LogLevel { filter: crate::logging::current() },
        Request::LogLevel { filter: Some(f) } => {
            tracing::info!("log filter change to `{f}` asked by pid {} (uid {})", peer.pid, peer.uid);
            match crate::logging::set(&f) {
                Ok(filter) => Response::LogLevel { filter },
                Err(error) => Response::Error { error },
            }
        }
    }
}
