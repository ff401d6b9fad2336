//! A QUIC client for a depot: staging requests (the adaptation manager's API) and sources for
//! fetching.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use viola_common::identity::{self, Identity, Role, alpn};

use crate::api::{StageRequest, StageState, StageStatus};
use crate::transfer::{self, PathTuning, Source, TransferError, transport_config};
use crate::wire::{self, Frame, Request, Response};

/// Errors talking to a depot.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("TLS configuration")]
    Tls(#[from] identity::TlsConfigError),
    #[error("binding a UDP socket")]
    Bind(#[source] std::io::Error),
    #[error("connecting to depot at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("handshake with depot at {addr}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("peer at {addr} is not a depot")]
    NotADepot { addr: SocketAddr },
    #[error("request")]
    Transfer(#[from] TransferError),
    #[error("depot refused: {0}")]
    Refused(String),
    #[error("staging {stage_id} ended {state:?}: {message}")]
    StageFailed {
        stage_id: String,
        state: StageState,
        message: String,
    },
    #[error("staging {0} not ready before the timeout")]
    Timeout(String),
}

/// A connection to one depot.
pub struct DepotClient {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub site: String,
}

/// A client endpoint (any local port) for `identity`.
pub fn client_endpoint(
    identity: &Identity,
    tuning: PathTuning,
) -> Result<quinn::Endpoint, ClientError> {
    let mut ep = transfer::endpoint(SocketAddr::from(([0, 0, 0, 0], 0)), None, tuning)
        .map_err(ClientError::Bind)?;
    let mut cfg = identity.client_config(alpn::DEPOT)?;
    cfg.transport_config(Arc::new(transport_config(tuning)));
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Connects on `endpoint` to the depot at `addr` and checks it is a depot.
pub async fn connect_on(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<(quinn::Connection, identity::PeerIdentity), ClientError> {
    let conn = endpoint
        .connect(addr, &identity::server_name(Role::Depot))
        .map_err(|source| ClientError::Connect { addr, source })?
        .await
        .map_err(|source| ClientError::Handshake { addr, source })?;
    let peer = identity::peer_identity(&conn).map_err(|_| ClientError::NotADepot { addr })?;
    if peer.role != Role::Depot {
        return Err(ClientError::NotADepot { addr });
    }
    Ok((conn, peer))
}

impl DepotClient {
    pub async fn connect(
        identity: &Identity,
        addr: SocketAddr,
        tuning: PathTuning,
    ) -> Result<Self, ClientError> {
        let endpoint = client_endpoint(identity, tuning)?;
        let (conn, peer) = connect_on(&endpoint, addr).await?;
        let site = peer.site;
        Ok(Self {
            endpoint,
            conn,
            site,
        })
    }

    /// This depot as a fetch source.
    pub fn source(&self) -> Source {
        Source {
            name: self.site.clone(),
            conn: self.conn.clone(),
        }
    }

    async fn stage_call(&self, req: &Request) -> Result<StageStatus, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(TransferError::from)?;
        transfer::write_frame(&mut send, &wire::control(req)).await?;
        send.finish().map_err(TransferError::from)?;
        match transfer::read_frame(&mut recv).await? {
            Some(Frame::Control(c)) => {
                match wire::parse_response(&c).map_err(TransferError::from)? {
                    Response::Stage(s) => Ok(s),
                    Response::Error { message } => Err(ClientError::Refused(message)),
                    _ => Err(ClientError::Refused("unexpected answer".into())),
                }
            }
            _ => Err(ClientError::Refused("no answer".into())),
        }
    }

    /// Asks the depot to stage an image; returns its first status (with the prediction).
    pub async fn stage(&self, req: StageRequest) -> Result<StageStatus, ClientError> {
        self.stage_call(&Request::Stage(req)).await
    }

    pub async fn stage_status(&self, stage_id: &str) -> Result<StageStatus, ClientError> {
        self.stage_call(&Request::StageStatus {
            stage_id: stage_id.to_string(),
        })
        .await
    }

    /// Polls until the staging is ready (or failed, or `timeout` passed). `on_status` sees
    /// every status (for progress bars).
    pub async fn wait_ready(
        &self,
        stage_id: &str,
        timeout: Duration,
        mut on_status: impl FnMut(&StageStatus),
    ) -> Result<StageStatus, ClientError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let st = self.stage_status(stage_id).await?;
            on_status(&st);
            match st.state {
                StageState::Ready => return Ok(st),
                StageState::Failed | StageState::Rejected => {
                    return Err(ClientError::StageFailed {
                        stage_id: st.stage_id,
                        state: st.state,
                        message: st.message,
                    });
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= until {
                return Err(ClientError::Timeout(stage_id.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
