//! The control API (status, expect_move, set_violin, remove_violin): one typed handler, [`handle`], behind two transports
//! with the same JSON lines (see `viola_api::overlay`): the local unix socket, and QUIC with ALPN
//! `viola-overlay-ctl/1` for the adaptation manager and the CLI (mutual TLS, role `adaptmgr` or
//! `cli`, checked when the connection is accepted). The clients are in `viola_api::overlay`.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{Ctx, violins};
use crate::wire::{self, ViolinId};
use viola_api::overlay::{ControlReply, ControlRequest};

/// The longest request a client may send.
const MAX_REQUEST: u64 = 64 * 1024;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers one control request.
pub(super) async fn handle(ctx: &Rc<Ctx>, req: ControlRequest) -> ControlReply {
    match req {
        ControlRequest::Status => ControlReply::Status(Box::new(ctx.status())),
        ControlRequest::ExpectMove { violin, mac, host } => {
            let res = expect_move(ctx, violin, &mac, &host);
            info!(violin, %mac, %host, ok = res.is_ok(), "expect_move");
            match res {
                Ok(()) => ControlReply::Done,
                Err(reason) => ControlReply::Refused {
                    reason: reason.to_owned(),
                },
            }
        }
        ControlRequest::SetViolin { violin } => {
            let id = violin.id;
            let res = violins::set(ctx, violin);
            info!(violin = id, ok = res.is_ok(), "set_violin");
            outcome(res)
        }
        ControlRequest::RemoveViolin { violin } => {
            let res = violins::remove(ctx, violin).await;
            info!(violin, ok = res.is_ok(), "remove_violin");
            outcome(res)
        }
    }
}

fn outcome(res: Result<(), String>) -> ControlReply {
    match res {
        Ok(()) => ControlReply::Done,
        Err(reason) => {
            warn!(%reason, "control request refused");
            ControlReply::Refused { reason }
        }
    }
}

fn expect_move(ctx: &Ctx, violin: u32, mac: &str, host: &str) -> Result<(), &'static str> {
    let violin = ViolinId::new(violin).ok_or("violin id exceeds 24 bits")?;
    let mac = wire::parse_mac(mac).ok_or("bad MAC")?;
    let mut st = ctx.state.borrow_mut();
    let st = &mut *st;
    let member = st
        .switch
        .expect_move(Instant::now(), violin, mac, host.into(), &mut st.out);
    st.execute();
    if member {
        Ok(())
    } else {
        Err("not a member of that violin")
    }
}

/// Answers one request line with one reply line (newline included).
async fn answer_line(ctx: &Rc<Ctx>, line: &str) -> String {
    let reply = match serde_json::from_str::<ControlRequest>(line) {
        Ok(req) => handle(ctx, req).await,
        Err(e) => ControlReply::Refused {
            reason: format!("bad request: {e}"),
        },
    };
    let mut line = serde_json::to_string(&reply)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"cannot encode the reply"}"#.to_owned());
    line.push('\n');
    line
}

/// Serves the unix control socket at `path` (mode 0600) until cancelled.
pub(super) async fn serve_unix(ctx: Rc<Ctx>, path: PathBuf) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), "control socket unavailable: {e}");
            return;
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    info!(path = %path.display(), "control socket");
    let mut clients = JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            () = ctx.token.cancelled() => break,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            Some(_) = clients.join_next() => continue,
        };
        let ctx = ctx.clone();
        clients.spawn_local(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r.take(MAX_REQUEST)).lines();
            let Ok(Ok(Some(line))) = tokio::time::timeout(REQUEST_TIMEOUT, lines.next_line()).await
            else {
                return;
            };
            let reply = answer_line(&ctx, &line).await;
            let _ = w.write_all(reply.as_bytes()).await;
        });
    }
    // Each client is answered within its request timeout.
    while clients.join_next().await.is_some() {}
}

/// Serves a control client's QUIC connection: one request per bidirectional stream, one reply.
pub(super) async fn serve_quic(ctx: Rc<Ctx>, conn: quinn::Connection) {
    loop {
        let (mut send, mut recv) = tokio::select! {
            () = ctx.token.cancelled() => return,
            s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => return },
        };
        let Ok(Ok(body)) =
            tokio::time::timeout(REQUEST_TIMEOUT, recv.read_to_end(MAX_REQUEST as usize)).await
        else {
            continue;
        };
        let line = String::from_utf8_lossy(&body);
        let reply = answer_line(&ctx, line.trim()).await;
        let _ = send.write_all(reply.as_bytes()).await;
        let _ = send.finish();
    }
}
