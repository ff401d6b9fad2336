//! The manager's web dashboard: HTTPS with client certificates from the federation CA, the
//! same ownership rules as the CLI ([`crate::tenants`]), a JSON API and a page that needs no
//! build step (HTML, CSS and JavaScript compiled into the binary).
//!
//! - `GET /` (and `/app.js`, `/app.css`): the page.
//! - `GET /api/v1/overview`: [`viola_api::dashboard::Overview`] for the caller.
//! - `GET /api/v1/history?series=PREFIX&range=hour|day`: [`viola_api::dashboard::HistoryView`].
//! - `GET /api/v1/events`: server-sent events; an `overview` event whenever the caller's
//!   overview changes (checked every second), a comment every 15 s to keep proxies from
//!   closing the stream.
//!
//! Why HTTP/1.1 and a hand-written router: five routes do not need a framework, and a browser
//! opens one TLS connection per origin for the page anyway. Bounded: at most
//! [`MAX_CONNECTIONS`] connections and [`MAX_EVENT_STREAMS`] event streams at once; a request
//! head must arrive within 10 s.

pub mod view;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use viola_api::dashboard::Viewer;
use viola_common::identity::{self, Identity, PeerIdentity};

use crate::history::Range;
use crate::manager::{Manager, now_ms};
use crate::tenants::Caller;

pub const MAX_CONNECTIONS: usize = 256;
pub const MAX_EVENT_STREAMS: usize = 64;
/// How often an event stream checks whether the caller's overview changed.
const EVENT_CHECK: Duration = Duration::from_secs(1);
const KEEPALIVE: Duration = Duration::from_secs(15);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// Why the dashboard could not start.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("cannot listen for the dashboard on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the dashboard's TLS configuration")]
    Tls(#[source] identity::TlsConfigError),
}

type Body = BoxBody<Bytes, Infallible>;

/// Binds `addr` and returns the bound address and a future serving the dashboard until `token`
/// is cancelled (then open connections are asked to close and given 5 s).
pub async fn serve(
    addr: SocketAddr,
    identity: &Identity,
    manager: Arc<Manager>,
    token: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = ()> + use<>), DashboardError> {
    let tls = identity
        .rustls_server_config(&[b"http/1.1"])
        .map_err(DashboardError::Tls)?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let identity = identity.clone();
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DashboardError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DashboardError::Bind { addr, source })?;
    let fut = async move {
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let streams = Arc::new(Semaphore::new(MAX_EVENT_STREAMS));
        let mut tasks = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                () = token.cancelled() => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                accepted = listener.accept() => accepted,
            };
            let Ok((tcp, peer_addr)) = accepted else {
                continue;
            };
            let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
                tracing::warn!(%peer_addr, "dashboard: too many connections; one refused");
                continue;
            };
            let acceptor = acceptor.clone();
            let manager = Arc::clone(&manager);
            let streams = Arc::clone(&streams);
            let token = token.clone();
            let identity = identity.clone();
            tasks.spawn(async move {
                let _permit = permit;
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%peer_addr, error = %e, "dashboard: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let Some(leaf) = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.clone().into_owned())
                else {
                    return;
                };
                let peer = match identity::identity_of(&leaf) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::info!(%peer_addr, error = %e, "dashboard: certificate without a Viola identity");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |req| {
                    let manager = Arc::clone(&manager);
                    let peer = peer.clone();
                    let streams = Arc::clone(&streams);
                    let token = token.clone();
                    async move { Ok::<_, Infallible>(route(req, &manager, &peer, &streams, token).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(Duration::from_secs(10))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(tls), service);
                // A user revoked while watching loses the page's event stream at once.
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        tracing::debug!(%peer_addr, error = %e, "dashboard connection ended");
                    },
                    () = identity.until_cert_revoked(&leaf) => {}
                }
            });
        }
        // Event streams end with the token; plain requests finish quickly.
        let drained = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), drained)
            .await
            .is_err()
        {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    };
    Ok((bound, fut))
}

/// The caller a certificate makes for the dashboard: administrators, and users of a configured
/// tenant; every other role (monitors, overlays, depots) is refused.
pub fn caller_of(peer: &PeerIdentity, manager: &Manager) -> Result<Caller, String> {
    let caller = Caller::of(peer).ok_or_else(|| format!("{peer} may not read the dashboard"))?;
    if let Caller::Tenant(t) = &caller
        && !manager.cfg.tenants.iter().any(|c| &c.name == t)
    {
        return Err(format!(
            "tenant {t:?} is not configured on this manager (no [[tenants]] table names it)"
        ));
    }
    Ok(caller)
}

async fn route(
    req: Request<Incoming>,
    manager: &Arc<Manager>,
    peer: &PeerIdentity,
    streams: &Arc<Semaphore>,
    token: CancellationToken,
) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let caller = match caller_of(peer, manager) {
        Ok(c) => c,
        Err(reason) => {
            tracing::warn!(%peer, %reason, "dashboard request refused");
            return text(StatusCode::FORBIDDEN, &format!("{reason}\n"));
        }
    };
    let viewer = Viewer {
        identity: peer.uri(),
        tenant: caller.tenant().map(str::to_owned),
    };
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    match path {
        "/" | "/index.html" => asset(INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" => asset(APP_JS, "text/javascript; charset=utf-8"),
        "/app.css" => asset(APP_CSS, "text/css; charset=utf-8"),
        "/api/v1/overview" => {
            let m = Arc::clone(manager);
            json_built_off_runtime(move || view::overview(&m, &caller, viewer, now_ms())).await
        }
        "/api/v1/history" => {
            let prefix = param(query, "series").unwrap_or_default();
            let range = match param(query, "range")
                .as_deref()
                .unwrap_or("hour")
                .parse::<Range>()
            {
                Ok(r) => r,
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
            };
            let m = Arc::clone(manager);
            json_built_off_runtime(move || view::history(&m, &caller, &prefix, range, now_ms()))
                .await
        }
        "/api/v1/events" => {
            let Ok(permit) = Arc::clone(streams).try_acquire_owned() else {
                return text(StatusCode::SERVICE_UNAVAILABLE, "too many event streams\n");
            };
            events(Arc::clone(manager), caller, viewer, token, permit)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The event stream: the overview whenever it changes (ignoring its timestamp).
fn events(
    manager: Arc<Manager>,
    caller: Caller,
    viewer: Viewer,
    token: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<Body> {
    struct State {
        manager: Arc<Manager>,
        caller: Caller,
        viewer: Viewer,
        token: CancellationToken,
        last: Option<String>,
        quiet_since: tokio::time::Instant,
        _permit: tokio::sync::OwnedSemaphorePermit,
    }
    let state = State {
        manager,
        caller,
        viewer,
        token,
        last: None,
        quiet_since: tokio::time::Instant::now(),
        _permit: permit,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.last.is_some() {
                tokio::select! {
                    () = s.token.cancelled() => return None,
                    () = tokio::time::sleep(EVENT_CHECK) => {}
                }
            }
            let (m, c, v) = (Arc::clone(&s.manager), s.caller.clone(), s.viewer.clone());
            let built = tokio::task::spawn_blocking(move || view::overview(&m, &c, v, 0)).await;
            let Ok(Ok(overview)) = built else {
                return None;
            };
            let body = serde_json::to_string(&overview).unwrap_or_default();
            if s.last.as_deref() != Some(body.as_str()) {
                // The timestamp is the time sent, not part of what changed.
                let mut stamped = overview;
                stamped.generated_ms = now_ms();
                let data = serde_json::to_string(&stamped).unwrap_or_default();
                s.last = Some(body);
                s.quiet_since = tokio::time::Instant::now();
                let frame = Frame::data(Bytes::from(format!("event: overview\ndata: {data}\n\n")));
                return Some((Ok::<_, Infallible>(frame), s));
            }
            if s.quiet_since.elapsed() >= KEEPALIVE {
                s.quiet_since = tokio::time::Instant::now();
                return Some((Ok(Frame::data(Bytes::from_static(b": keep-alive\n\n"))), s));
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "response\n"))
}

/// The value of `name` in a URL query (percent-decoded; `+` is a space).
fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn with_headers(
    status: StatusCode,
    content_type: &str,
    body: Bytes,
    cache: &str,
) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, cache)
        .header("x-content-type-options", "nosniff")
        .header(
            "content-security-policy",
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        )
        .header("referrer-policy", "no-referrer")
        .body(Full::new(body).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn asset(body: &'static str, content_type: &str) -> Response<Body> {
    with_headers(
        StatusCode::OK,
        content_type,
        Bytes::from_static(body.as_bytes()),
        "no-cache",
    )
}

/// Answers with what `build` makes, as JSON; `build` reads the inventory, so it runs on a
/// blocking thread.
async fn json_built_off_runtime<T, E>(
    build: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Response<Body>
where
    T: serde::Serialize + Send + 'static,
    E: std::error::Error + Send + 'static,
{
    match tokio::task::spawn_blocking(build).await {
        Ok(Ok(value)) => json(&value),
        Ok(Err(e)) => server_error(&e),
        Err(e) => server_error(&e),
    }
}

fn json<T: serde::Serialize>(value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(b) => with_headers(
            StatusCode::OK,
            "application/json",
            Bytes::from(b),
            "no-store",
        ),
        Err(e) => server_error(&e),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    with_headers(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body.to_owned()),
        "no-store",
    )
}

fn server_error(e: &(dyn std::error::Error + 'static)) -> Response<Body> {
    let chain = viola_common::errors::chain(e);
    tracing::warn!(error = %chain, "dashboard request failed");
    text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{chain}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        let q = "series=host%2Fa1%2F&range=day&x";
        assert_eq!(param(q, "series").as_deref(), Some("host/a1/"));
        assert_eq!(param(q, "range").as_deref(), Some("day"));
        assert_eq!(param(q, "x").as_deref(), Some(""));
        assert_eq!(param(q, "missing"), None);
        assert_eq!(percent_decode("a+b%zz%4"), "a b%zz%4");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[tokio::test]
    async fn a_user_revoked_while_watching_loses_the_event_stream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use viola_common::identity::revocation::{CRL_FILE, Register, RevokeTarget};
        use viola_common::identity::{CertificateAuthority, Role};
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test", 1).unwrap();
        let register = Register::new(dir.path());
        let issue = |role, name: &str| {
            let issued = ca
                .issue(&PeerIdentity::new(role, "fed", name).unwrap(), 1)
                .unwrap();
            register.record_issued(&issued.cert_pem).unwrap();
            issued
        };
        let mgr_dir = dir.path().join("mgr");
        issue(Role::Adaptmgr, "mgr").save(&mgr_dir).unwrap();
        let me = Identity::load_dir(&mgr_dir).unwrap();
        let ann = issue(Role::Cli, "ann").to_identity().unwrap();
        let inventory =
            Arc::new(crate::inventory::Inventory::open(&dir.path().join("inv")).unwrap());
        let manager = Arc::new(
            Manager::new(
                crate::manager::ManagerConfig::default(),
                inventory,
                Arc::new(viola_hypervisor::fake::FakeCluster::new()),
            )
            .unwrap(),
        );
        let token = CancellationToken::new();
        let (addr, serving) = serve("127.0.0.1:0".parse().unwrap(), &me, manager, token.clone())
            .await
            .unwrap();
        let server = tokio::spawn(serving);

        // Ann watches the live updates.
        let connector = tokio_rustls::TlsConnector::from(Arc::new(
            ann.rustls_client_config(b"http/1.1").unwrap(),
        ));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name =
            rustls_pki_types::ServerName::try_from(identity::server_name(Role::Adaptmgr)).unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"GET /api/v1/events HTTP/1.1\r\nHost: mgr\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tls.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");

        // She is removed from the federation: the CRL reaches the manager's identity directory.
        register
            .revoke(
                &ca,
                &RevokeTarget::Identity(PeerIdentity::new(Role::Cli, "fed", "ann").unwrap()),
                1,
            )
            .unwrap();
        std::fs::copy(dir.path().join(CRL_FILE), mgr_dir.join(CRL_FILE)).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the revoked user's event stream is still open"
        );

        token.cancel();
        server.await.unwrap();
    }
}
