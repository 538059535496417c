//! The TCP side of a proxy: binding (or inheriting) the listeners,
//! accepting within the descriptor budget, and one flow from its records
//! to its relay and its line. The UDP side is [`crate::udp`].

#[allow(clippy::wildcard_imports)]
use crate::*;

/// Binds the listeners (IPv6 ones IPv6-only, so each family has its own socket).
pub fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    bind_or_inherit(addrs, &mut vec![])
}

/// Binds the listeners, taking the socket of an address from `inherited`
/// (socket activation: [`activation::take`]) where there is one.
pub fn bind_or_inherit(addrs: &[SocketAddr], inherited: &mut Vec<activation::Inherited>) -> std::io::Result<Vec<TcpListener>> {
    addrs
        .iter()
        .map(|a| {
            if let Some(s) = activation::claim(inherited, activation::Transport::Tcp, *a) {
                tracing::info!("listening on {a} (tcp) with the socket passed by the service manager ({s})");
                let l = std::net::TcpListener::from(s.fd);
                l.set_nonblocking(true)?;
                socket2::SockRef::from(&l).set_linger(Some(Duration::ZERO))?;
                return TcpListener::from_std(l);
            }
            let s = socket2::Socket::new(socket2::Domain::for_address(*a), socket2::Type::STREAM, None)?;
            if a.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            s.set_nonblocking(true)?;
            // Accepted sockets inherit it: abortive from their first moment (see `abortive`).
            s.set_linger(Some(Duration::ZERO))?;
            s.bind(&(*a).into())?;
            s.listen(4096)?;
            TcpListener::from_std(s.into())
        })
        .collect()
}

/// Runs the TCP side of a proxy on bound listeners. At [`Phase::Drain`] the
/// listeners are closed, live flows get the grace period and are cut after
/// it (or at [`Phase::Cut`]); returns when every flow's line was sent to
/// `logs`. New connections wait in the listen backlog while the proxy's
/// descriptor budget has no room for another flow.
pub async fn serve(
    proxy: Arc<Proxy>,
    listeners: Vec<TcpListener>,
    logs: mpsc::UnboundedSender<FlowLog>,
    mut phase: watch::Receiver<Phase>,
) {
    let (cut_tx, cut_rx) = watch::channel(false);
    let mut acceptors = tokio::task::JoinSet::new();
    for l in listeners {
        listener_options(&l, proxy.opts.accel);
        acceptors.spawn(accept_loop(proxy.clone(), l, logs.clone(), phase.clone(), cut_rx.clone()));
    }
    drop(logs);
    while acceptors.join_next().await.is_some() {}
    wind_down(&proxy, "tcp", &proxy.tcp_live, &mut phase, &cut_tx).await;
}

/// Sets on a listener what every connection it accepts must have from its
/// first moment, once for all of them (an accepted socket is a clone of its
/// listener and inherits both): an abortive close (`SO_LINGER` 0, see
/// [`abortive`]) and no Nagle delay (`TCP_NODELAY`, see
/// [`relay::relay_with`]). Two `setsockopt` calls per listener instead of
/// two per flow (each one also runs rewire's sockopt program). Whatever the
/// listener's origin (bound here, passed by a service manager, or by a
/// caller of [`serve`]).
///
/// With `accel`, the listener also opts in to accelerated legs
/// ([`rewire::accelerate`]): every connection it accepts inherits that too.
fn listener_options(l: &TcpListener, accel: bool) {
    if accel {
        if let Err(e) = rewire::accelerate(l) {
            tracing::warn!("opting the listener in to accelerated legs: {e}; its flows stay on TCP");
        }
    }
    let s = socket2::SockRef::from(l);
    if let Err(e) = s.set_linger(Some(Duration::ZERO)) {
        tracing::warn!("SO_LINGER on a listener: {e}");
    }
    if let Err(e) = s.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY on a listener: {e}");
    }
}

/// Accepts on one listener until [`Phase::Drain`], then closes it.
async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    logs: mpsc::UnboundedSender<FlowLog>,
    mut phase: watch::Receiver<Phase>,
    cut: watch::Receiver<bool>,
) {
    loop {
        // Room for one more flow, or wait: the kernel's backlog holds new connections meanwhile.
        let grant = match proxy.budget.try_take_leaving(TCP_FLOW_FDS, ACCEPT_HEADROOM) {
            Some(g) => g,
            None => {
                let b = &proxy.budget;
                proxy.accept_paused.note(format_args!("{} of {} descriptors held by flows", b.used(), b.total()));
                tokio::select! {
                    g = b.take_leaving(TCP_FLOW_FDS, ACCEPT_HEADROOM) => g,
                    _ = reached(&mut phase, Phase::Drain) => break,
                }
            }
        };
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    let (proxy2, logs, cut, live) = (proxy.clone(), logs.clone(), cut.clone(), proxy.tcp_live.enter());
                    tokio::spawn(async move {
                        let _grant = grant;
                        if let Some(line) = handle_prepared(&proxy2, s, peer, cut).await {
                            let _ = logs.send(line);
                        }
                        drop(live);
                    });
                }
                Err(e) => {
                    let pause = if limits::out_of_descriptors(&e) { 100 } else { 10 };
                    proxy.accept_errors.note(&e);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            },
            _ = reached(&mut phase, Phase::Drain) => break,
        }
    }
    drop(listener);
}

/// Handles one accepted connection until it ends or is cut; returns its
/// line, or `None` for a connection without records (counted instead).
pub async fn handle(proxy: &Proxy, client: TcpStream, peer: SocketAddr, cut: watch::Receiver<bool>) -> Option<FlowLog> {
    // A socket from any listener: what `listener_options` gives the ones
    // `serve` accepts on, set on this one.
    abortive(&client, true);
    let _ = client.set_nodelay(true);
    handle_prepared(proxy, client, peer, cut).await
}

/// [`handle`] for a connection accepted on a listener prepared by
/// [`listener_options`]: from its accept until the flow has finished, any
/// close resets the client (the listener is abortive and an accepted socket
/// inherits its linger), and it has `TCP_NODELAY`; neither is set again.
async fn handle_prepared(proxy: &Proxy, mut client: TcpStream, peer: SocketAddr, mut cut: watch::Receiver<bool>) -> Option<FlowLog> {
    let start = Instant::now();
    let opts = &proxy.opts;
    let mut log = FlowLog::new(opts, peer, "tcp");
    let progress = relay::Progress::default();
    let r = tokio::select! {
        r = flow(proxy, &mut client, &mut log, &progress) => r,
        _ = cut_signal(&mut cut) => Err(FlowError::Cut { grace_ms: opts.grace.as_millis() as u64 }),
    };
    let s = progress.stats();
    log.bytes_to_server = s.a_to_b;
    log.bytes_to_client = s.b_to_a;
    if matches!(opts.relay, RelayMode::Kernel { .. }) {
        log.kernel_bytes_to_server = Some(s.kernel_a_to_b);
        log.kernel_bytes_to_client = Some(s.kernel_b_to_a);
    }
    log.relay_fell_back = s.fell_back;
    if progress.pipes_refused.load(Ordering::Relaxed) {
        proxy.pipes_refused.note(format_args!("flow from {peer}"));
    }
    match r {
        Ok(()) => {}
        Err(FlowError::NoRecords(e)) => {
            proxy.no_records.note(format_args!("from {peer}: {e}"));
            return None;
        }
        Err(e) => {
            if let FlowError::Cut { .. } = e {
                log.cut = Some("shutdown");
                proxy.cut.fetch_add(1, Ordering::Relaxed);
            } else {
                proxy.flow_errors.note(format_args!("flow from {peer}: {e}"));
            }
            log.error = Some(e.to_string());
        }
    }
    log.finish(start);
    Some(log)
}

/// Makes the close of `sock` abortive (`on`: `SO_LINGER` on, timeout 0,
/// the close sends a reset) or orderly again (`SO_LINGER` off, a FIN).
///
/// Both sockets of a flow are abortive until the flow has finished in both
/// directions: the application then gets `ECONNRESET`, never an orderly end
/// of stream that it could take for a complete answer, whatever ends the
/// flow early: an onward connect refused by a closed service, a transfer
/// cut at shutdown, an upstream that failed mid-stream, or the proxy's own
/// death (the kernel closes a dead process's sockets as `close(2)` would,
/// with a FIN when nothing is unread, unless linger says otherwise).
/// `shutdown(SHUT_WR)` is not affected, so half-close is still relayed.
/// Set before a socket can carry anything: on the listener (an accepted
/// socket is a clone of its listener and inherits its linger, so there is
/// no moment between accept and this call) and on the onward socket
/// before its connect.
fn abortive(sock: &impl AsFd, on: bool) {
    let linger = on.then_some(Duration::ZERO);
    if let Err(e) = socket2::SockRef::from(sock).set_linger(linger) {
        tracing::debug!("SO_LINGER {linger:?} on a flow's socket: {e}");
    }
}

async fn flow(proxy: &Proxy, client: &mut TcpStream, log: &mut FlowLog, progress: &relay::Progress) -> Result<(), FlowError> {
    let opts = &proxy.opts;
    let mut upstream = match opts.destination {
        Destination::OriginalDst | Destination::FixedForTests(_) => {
            let dst = match opts.destination {
                Destination::FixedForTests(a) => a,
                _ => original_dst::netfilter_original_dst(client).map_err(FlowError::OriginalDst)?,
            };
            log.original_destination = Some(dst);
            let sock = if dst.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
                .map_err(|source| FlowError::Connect { dst, source })?;
            abortive(&sock, true);
            sock.connect(dst).await.map_err(|source| FlowError::Connect { dst, source })?
        }
        Destination::Records => {
            // Records and context in one kernel round trip.
            let (records, ctx) = rewire::query_redirect(client).map_err(FlowError::NoRecords)?;
            log.fill(opts, &records, Some(ctx));
            let dst = records.original_destination();
            let sock = rewire::asynchronous::onward_socket(&records).map_err(|source| FlowError::ConnectOnward { dst, source })?;
            if opts.accel {
                if let Err(e) = rewire::accelerate(&sock) {
                    tracing::debug!("opting the onward socket in to an accelerated leg: {e}");
                }
            }
            abortive(&sock, true);
            sock.connect(dst).await.map_err(|source| FlowError::ConnectOnward { dst, source: rewire::Error::from_io(source) })?
        }
    };
    // The client's socket has TCP_NODELAY from its listener; the onward one gets it here.
    let _ = upstream.set_nodelay(true);
    // Which sockets the kernel accelerated (known once accepted / connected:
    // sockops inserts them at establishment): read with recvmsg only.
    let accel = if opts.accel {
        let a = [rewire::is_accelerated(client).unwrap_or(false), rewire::is_accelerated(&upstream).unwrap_or(false)];
        log.accelerated = Some(a);
        a
    } else {
        [false, false]
    };
    relay::relay_accel(opts.relay, client, &mut upstream, accel, progress, &proxy.budget).await.map_err(FlowError::Relay)?;
    // Both directions ended with their FIN passed on: an orderly close now.
    abortive(&upstream, false);
    abortive(client, false);
    Ok(())
}
