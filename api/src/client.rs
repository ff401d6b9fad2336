//! A client of the manager's endpoint (used by the CLI and the monitor).

use std::net::SocketAddr;

use viola_common::identity::{self, Identity, Role, alpn};

use crate::manager::{Request, Response};
use crate::wire::{self, FrameError};

/// Why talking to the manager failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot set up the client endpoint")]
    Endpoint(#[source] std::io::Error),
    #[error("invalid TLS configuration")]
    Tls(#[source] identity::TlsConfigError),
    #[error("cannot connect to the manager at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connection to the manager at {addr} failed")]
    Connection {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error(
        "no manager served the connection (tried {tried}, up to {per_addr_s} s each; of \
         replicated managers only the leader serves, the others refuse); last: {last}"
    )]
    NoManager {
        tried: String,
        per_addr_s: u64,
        last: String,
    },
    #[error("exchange with the manager failed")]
    Frame(#[from] FrameError),
    #[error("the manager closed the request without an answer")]
    NoAnswer,
    #[error("sending the request's data failed")]
    Body(#[source] std::io::Error),
}

/// One connection to the manager.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Client {
    /// Connects to the manager at `addr` with this daemon's (or user's) identity; the
    /// manager must present an `adaptmgr` certificate from the same CA.
    pub async fn connect(me: &Identity, addr: SocketAddr) -> Result<Self, ClientError> {
        let bind: SocketAddr = if addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Endpoint)?;
        endpoint
            .set_default_client_config(me.client_config(alpn::ADAPTMGR).map_err(ClientError::Tls)?);
        let conn = endpoint
            .connect(addr, &identity::server_name(Role::Adaptmgr))
            .map_err(|source| ClientError::Connect { addr, source })?
            .await
            .map_err(|source| ClientError::Connection { addr, source })?;
        Ok(Self { endpoint, conn })
    }

    /// Connects to the first of `addrs` that answers within `per_addr` (a replicated
    /// manager: only the leader listens, the others stand by); returns it and its address.
    pub async fn connect_first(
        me: &Identity,
        addrs: &[SocketAddr],
        per_addr: std::time::Duration,
    ) -> Result<(Self, SocketAddr), ClientError> {
        let mut last = String::from("no address given");
        for &addr in addrs {
            match tokio::time::timeout(per_addr, Self::connect(me, addr)).await {
                Ok(Ok(client)) => return Ok((client, addr)),
                Ok(Err(ClientError::Connection { addr, source })) => {
                    last = format!("{addr}: {source}");
                }
                // A local failure (endpoint, TLS setup) is the same for every address.
                Ok(Err(e)) => return Err(e),
                Err(_) => last = format!("{addr}: no answer"),
            }
        }
        Err(ClientError::NoManager {
            tried: addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            per_addr_s: per_addr.as_secs().max(1),
            last,
        })
    }

    /// Sends `req` and hands every response frame to `on_response` until the stream ends;
    /// returns the last one.
    pub async fn call(
        &self,
        req: &Request,
        mut on_response: impl FnMut(&Response),
    ) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.open().await?;
        wire::write_frame(&mut send, req).await?;
        let _ = send.finish();
        let mut last = None;
        while let Some(resp) = wire::read_frame::<Response>(&mut recv).await? {
            on_response(&resp);
            last = Some(resp);
        }
        last.ok_or(ClientError::NoAnswer)
    }

    /// Like [`call`](Self::call), sending `body` after the request on the same stream (an
    /// image import: exactly the size the request gives). Frames are read while the body is
    /// sent, so a manager that refuses at once is heard at once.
    pub async fn call_with_body(
        &self,
        req: &Request,
        mut body: impl tokio::io::AsyncRead + Unpin,
        mut on_response: impl FnMut(&Response),
    ) -> Result<Response, ClientError> {
        let (mut send, mut recv) = self.open().await?;
        wire::write_frame(&mut send, req).await?;
        let sending = async move {
            let copied = tokio::io::copy(&mut body, &mut send).await;
            let _ = send.finish();
            copied
        };
        let reading = async {
            let mut last = None;
            while let Some(resp) = wire::read_frame::<Response>(&mut recv).await? {
                on_response(&resp);
                last = Some(resp);
            }
            Ok::<_, ClientError>(last)
        };
        let (sent, last) = tokio::join!(sending, reading);
        match (last?, sent) {
            // The manager's answer says what happened (also when it stopped the body early).
            (Some(last), _) => Ok(last),
            (None, Err(e)) => Err(ClientError::Body(e)),
            (None, Ok(_)) => Err(ClientError::NoAnswer),
        }
    }

    /// A new request stream.
    async fn open(&self) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        let addr = self.conn.remote_address();
        self.conn
            .open_bi()
            .await
            .map_err(|source| ClientError::Connection { addr, source })
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}
