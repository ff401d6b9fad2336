//! The control API (status, expect_move): one typed handler, [`handle`], behind two transports
//! with the same JSON lines (see [`crate::api_types`]): the local unix socket, and QUIC with ALPN
//! `viola-overlay-ctl/1` for the adaptation manager and the CLI (mutual TLS, role `adaptmgr` or
//! `cli`, checked when the connection is accepted). Also the matching clients.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinSet;
use tracing::{info, warn};
use viola_common::identity::{self, Identity, Role, alpn};

use super::Ctx;
use crate::api_types::{ControlReply, ControlRequest};
use crate::wire::{self, ViolinId};

/// The longest request a client may send.
const MAX_REQUEST: u64 = 64 * 1024;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers one control request.
pub(super) fn handle(ctx: &Ctx, req: ControlRequest) -> ControlReply {
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
fn answer_line(ctx: &Ctx, line: &str) -> String {
    let reply = match serde_json::from_str::<ControlRequest>(line) {
        Ok(req) => handle(ctx, req),
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
            let _ = w.write_all(answer_line(&ctx, &line).as_bytes()).await;
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
        let _ = send
            .write_all(answer_line(&ctx, line.trim()).as_bytes())
            .await;
        let _ = send.finish();
    }
}

/// Why a control request to a daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The unix control socket.
    #[error("cannot reach the control socket {}", .path.display())]
    Socket {
        /// The socket.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A local QUIC endpoint for the request.
    #[error("cannot open a QUIC endpoint")]
    Endpoint(#[source] io::Error),
    /// TLS configuration from our identity.
    #[error("TLS configuration")]
    Tls(#[from] identity::TlsConfigError),
    /// The connection could not be started.
    #[error("cannot connect")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed (includes refusal by the daemon).
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    /// Sending the request.
    #[error("cannot send the request")]
    Send(#[from] quinn::WriteError),
    /// Receiving the reply.
    #[error("cannot read the reply")]
    Receive(#[from] quinn::ReadToEndError),
    /// The daemon did not answer in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The request could not be encoded.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    /// The reply is not a control reply.
    #[error("bad reply")]
    Reply(#[source] serde_json::Error),
}

/// How long a client waits for a reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a client waits for a reply over QUIC (connection set-up included).
const QUIC_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request to the daemon's unix control socket and returns its reply.
pub async fn request_unix(
    socket: &Path,
    req: &ControlRequest,
) -> Result<ControlReply, ClientError> {
    let io_err = |source| ClientError::Socket {
        path: socket.to_owned(),
        source,
    };
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(io_err)?;
    let mut line = serde_json::to_string(req).map_err(ClientError::Encode)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await.map_err(io_err)?;
    let mut reply = String::new();
    tokio::time::timeout(REPLY_TIMEOUT, stream.read_to_string(&mut reply))
        .await
        .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))?
        .map_err(io_err)?;
    serde_json::from_str(&reply).map_err(ClientError::Reply)
}

/// Sends one request to the daemon at `addr` over QUIC with mutual TLS (our identity must have
/// role `adaptmgr` or `cli`) and returns its reply.
pub async fn request_quic(
    me: &Identity,
    addr: SocketAddr,
    req: &ControlRequest,
) -> Result<ControlReply, ClientError> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Endpoint)?;
    endpoint.set_default_client_config(me.client_config(alpn::OVERLAY_CONTROL)?);
    let conn = endpoint
        .connect(addr, &identity::server_name(Role::Overlay))?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let body = serde_json::to_vec(req).map_err(ClientError::Encode)?;
    send.write_all(&body).await?;
    let _ = send.finish();
    let reply = tokio::time::timeout(QUIC_REPLY_TIMEOUT, recv.read_to_end(16 << 20))
        .await
        .map_err(|_| ClientError::Timeout(QUIC_REPLY_TIMEOUT))??;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    serde_json::from_slice(&reply).map_err(ClientError::Reply)
}
