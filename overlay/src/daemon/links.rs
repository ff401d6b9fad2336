//! Peer links: accepting and dialing QUIC connections, and serving each one (datagrams into the
//! switch, the control streams both ways, gossip into the peer book).

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};
use viola_common::identity::{self, Role, alpn};

use super::Ctx;
use super::control::serve_quic;
use super::switching::{Conn, DriverDrop, Refusal};
use crate::HostId;
use crate::control::{self, ControlMsg};
use viola_api::overlay::LinkBytes;

/// A peer's host name from its certificate.
pub(super) fn host_id(id: &identity::PeerIdentity) -> HostId {
    format!("{}/{}", id.site, id.host).into()
}

/// Accepts connections (peers and control clients) until cancelled, then waits for the ones
/// it serves to end.
pub(super) async fn acceptor(ctx: Rc<Ctx>) {
    let mut links = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            () = ctx.token.cancelled() => break,
            i = ctx.endpoint.accept() => match i { Some(i) => i, None => break },
            Some(_) = links.join_next() => continue,
        };
        links.spawn_local(accepted(ctx.clone(), incoming));
    }
    while links.join_next().await.is_some() {}
}

async fn accepted(ctx: Rc<Ctx>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(Duration::from_secs(10), incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            warn!(%remote, "handshake refused: {e}");
            ctx.state.borrow_mut().refuse(Refusal::Handshake);
            return;
        }
        Err(_) => return,
    };
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.as_deref() == Some(alpn::OVERLAY_CONTROL) {
        match identity::peer_identity(&conn)
            .map_err(|e| e.to_string())
            .and_then(|p| {
                p.require_role(&[Role::Adaptmgr, Role::Cli])
                    .map_err(|e| e.to_string())
            }) {
            Ok(()) => tokio::select! {
                () = serve_quic(ctx.clone(), conn.clone()) => {}
                () = ctx.identity.until_revoked(&conn) => {
                    conn.close(identity::CLOSE_REVOKED.into(), b"revoked");
                }
            },
            Err(e) => {
                warn!(%remote, "control connection refused: {e}");
                ctx.state.borrow_mut().refuse(Refusal::Role);
                conn.close(2u32.into(), b"role");
            }
        }
        return;
    }
    serve_link(ctx, conn, false).await;
}

/// One attempt to reach `addr` (due in the peer book), serving the connection it makes; the
/// outcome goes back to the book.
pub(super) async fn dial(ctx: Rc<Ctx>, addr: SocketAddr) {
    let attempt = async {
        let connecting = ctx
            .endpoint
            .connect(addr, &identity::server_name(Role::Overlay))
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(5), connecting)
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|e| e.to_string())
    };
    let attempt = tokio::select! {
        () = ctx.token.cancelled() => return,
        a = attempt => a,
    };
    let conn = match attempt {
        Ok(conn) => conn,
        Err(e) => {
            debug!(%addr, "connect failed: {e}");
            ctx.state
                .borrow_mut()
                .peers
                .dial_failed(addr, Instant::now());
            return;
        }
    };
    ctx.state.borrow_mut().peers.dial_succeeded(addr);
    let is_me = identity::peer_identity(&conn)
        .map(|id| host_id(&id) == ctx.me)
        .unwrap_or(false);
    if is_me {
        conn.close(0u32.into(), b"self");
        ctx.state.borrow_mut().peers.dialed_self(addr);
        return;
    }
    serve_link(ctx.clone(), conn, true).await;
    ctx.state
        .borrow_mut()
        .peers
        .dialed_link_ended(addr, Instant::now());
}

/// Registers a peer connection and serves it until it closes.
async fn serve_link(ctx: Rc<Ctx>, conn: quinn::Connection, dialed: bool) {
    let remote = conn.remote_address();
    let peer = match identity::peer_identity(&conn) {
        Ok(p) => p,
        Err(e) => {
            warn!(%remote, "no identity: {e}");
            conn.close(1u32.into(), b"identity");
            return;
        }
    };
    if let Err(e) = peer.require_role(&[Role::Overlay]) {
        warn!(%remote, "refused: {e}");
        ctx.state.borrow_mut().refuse(Refusal::Role);
        conn.close(2u32.into(), b"role");
        return;
    }
    let host = host_id(&peer);
    if host == ctx.me {
        conn.close(0u32.into(), b"self");
        return;
    }
    let (ctl_tx, ctl_rx) = mpsc::channel::<ControlMsg>(4096);
    let serial;
    {
        let mut st = ctx.state.borrow_mut();
        let st = &mut *st;
        let now = Instant::now();
        if let Some(old) = st.conns.get(&host) {
            let old_alive = old.conn.close_reason().is_none();
            // Simultaneous dials: both ends keep the one dialed by the smaller host name.
            let race = old_alive && now.duration_since(old.since) < Duration::from_secs(2);
            let new_dialer_is_smaller = if dialed { ctx.me < host } else { host < ctx.me };
            if race && !new_dialer_is_smaller {
                debug!(peer = %host, "duplicate connection; keeping the existing one");
                conn.close(0u32.into(), b"duplicate");
                return;
            }
            old.conn.close(0u32.into(), b"replaced");
            let carried = LinkBytes::of(&old.conn);
            st.ended_link_bytes
                .entry(host.clone())
                .or_default()
                .add(carried);
            st.switch.peer_down(&host, &mut st.out);
        }
        st.serial += 1;
        serial = st.serial;
        st.conns.insert(
            host.clone(),
            Conn {
                conn: conn.clone(),
                ctl: ctl_tx.clone(),
                since: now,
                serial,
                lost_counted: conn.stats().path.lost_packets,
            },
        );
        let known = st.peers.link_up(&host, remote);
        let max = conn.max_datagram_size().unwrap_or(1162);
        st.switch.peer_up(host.clone(), max, &mut st.out);
        st.execute();
        let _ = ctl_tx.try_send(ControlMsg::Peers { known });
    }
    info!(peer = %host, %remote, dialed, "peer connected");
    drop(ctl_tx);

    // With TAP offloads, the datagrams already received are taken as one batch, so that the
    // TAP writes can merge a flow's consecutive frames.
    let batch = if ctx.tap_offload { 64 } else { 1 };
    let datagrams = async {
        loop {
            let d = tokio::select! {
                () = ctx.token.cancelled() => return,
                d = conn.read_datagram() => match d { Ok(d) => d, Err(_) => return },
            };
            let mut st = ctx.state.borrow_mut();
            let st = &mut *st;
            let now = Instant::now();
            st.switch.handle_datagram(now, &host, d, &mut st.out);
            for _ in 1..batch {
                let Some(Ok(d)) = conn.read_datagram().now_or_never() else {
                    break;
                };
                st.switch.handle_datagram(now, &host, d, &mut st.out);
            }
            st.execute();
        }
    };
    let writer = control_writer(&conn, ctl_rx, &ctx);
    let reader = control_reader(&ctx, &conn, &host);
    tokio::select! {
        () = datagrams => {}
        () = writer => {}
        () = reader => {}
        () = ctx.identity.until_revoked(&conn) => {
            conn.close(identity::CLOSE_REVOKED.into(), b"revoked");
        }
    }
    let reason = conn
        .close_reason()
        .map_or_else(|| "ended".to_owned(), |r| r.to_string());
    conn.close(0u32.into(), b"bye");
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    if st.conns.get(&host).is_some_and(|c| c.serial == serial) {
        st.conns.remove(&host);
        st.ended_link_bytes
            .entry(host.clone())
            .or_default()
            .add(LinkBytes::of(&conn));
        st.switch.peer_down(&host, &mut st.out);
        st.execute();
        info!(peer = %host, "peer disconnected: {reason}");
    }
}

/// Writes the core's control messages for this peer onto one unidirectional stream.
async fn control_writer(conn: &quinn::Connection, mut rx: mpsc::Receiver<ControlMsg>, ctx: &Ctx) {
    let Ok(mut stream) = conn.open_uni().await else {
        return;
    };
    loop {
        let msg = tokio::select! {
            () = ctx.token.cancelled() => return,
            m = rx.recv() => match m { Some(m) => m, None => { std::future::pending::<()>().await; return } },
        };
        if stream.write_all(&control::encode(&msg)).await.is_err() {
            return;
        }
    }
}

/// Reads the peer's control messages: gossip goes to the peer book, the rest to the switch.
async fn control_reader(ctx: &Ctx, conn: &quinn::Connection, host: &HostId) {
    let Ok(mut stream) = conn.accept_uni().await else {
        return;
    };
    let mut body = Vec::new();
    loop {
        let mut prefix = [0u8; 4];
        tokio::select! {
            () = ctx.token.cancelled() => return,
            r = stream.read_exact(&mut prefix) => if r.is_err() { return },
        }
        let Ok(len) = control::check_len(prefix) else {
            warn!(peer = %host, "oversized control message; closing");
            conn.close(3u32.into(), b"control");
            return;
        };
        body.resize(len, 0);
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let msg = match control::decode(&body) {
            Ok(m) => m,
            Err(e) => {
                warn!(peer = %host, "bad control message: {e}");
                ctx.state.borrow_mut().count(DriverDrop::ControlMalformed);
                continue;
            }
        };
        if let ControlMsg::Peers { known } = &msg {
            let new = ctx
                .state
                .borrow_mut()
                .peers
                .learn(host, known, Instant::now());
            if !new.is_empty() {
                debug!(peer = %host, addrs = ?new, "new peer addresses from gossip");
                ctx.dial_due.notify_one();
            }
            continue;
        }
        let mut st = ctx.state.borrow_mut();
        let st = &mut *st;
        st.switch
            .handle_control(Instant::now(), host, msg, &mut st.out);
        st.execute();
    }
}
