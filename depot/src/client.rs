//! A QUIC client for a depot: staging requests, the image list and uploads (the adaptation
//! manager's API), and sources for fetching.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use viola_common::identity::{self, Identity, Role, alpn};

use crate::api::{ImageEntry, StageRequest, StageState, StageStatus, UploadReport};
use crate::transfer::{self, PathTuning, Source, TransferError, transport_config};
use crate::wire::{self, Frame, MAX_UPLOAD_BLOB, Request, Response};

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
    #[error("reading the image to upload")]
    Source(#[source] std::io::Error),
    #[error("the image to upload ended after {sent} of {size} bytes")]
    ShortSource { sent: u64, size: u64 },
    #[error("the depot's image list did not end after {0} pages")]
    EndlessList(usize),
}

/// Pages of the image list a client reads at most (a depot that says "more" forever is not
/// followed forever).
const MAX_IMAGE_PAGES: usize = 10_000;

/// One step of an upload: a read from the source and its blob frame, or what stopped it.
enum Step {
    Sent(usize),
    Short,
    Source(std::io::Error),
    Write(quinn::WriteError),
    Answered(Result<Option<Response>, ClientError>),
}

/// The control frame a depot answered with (`None`: it finished without one).
async fn read_answer(recv: &mut quinn::RecvStream) -> Result<Option<Response>, ClientError> {
    match transfer::read_frame(recv).await? {
        Some(Frame::Control(c)) => Ok(Some(wire::parse_response(&c).map_err(TransferError::from)?)),
        Some(_) => Err(ClientError::Refused(
            "data frame instead of an answer".into(),
        )),
        None => Ok(None),
    }
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

    /// The depot's named images, sorted by name (all pages).
    pub async fn images(&self) -> Result<Vec<ImageEntry>, ClientError> {
        let mut all: Vec<ImageEntry> = Vec::new();
        for _ in 0..MAX_IMAGE_PAGES {
            let after = all.last().map(|e| e.name.clone());
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(TransferError::from)?;
            transfer::write_frame(&mut send, &wire::control(&Request::Images { after })).await?;
            send.finish().map_err(TransferError::from)?;
            match read_answer(&mut recv).await? {
                Some(Response::Images { images, more }) => {
                    // Each page must continue the list, or paging could loop.
                    let progresses = images
                        .first()
                        .is_none_or(|f| all.last().is_none_or(|l| f.name > l.name));
                    if !progresses || (more && images.is_empty()) {
                        return Err(ClientError::Refused("image list out of order".into()));
                    }
                    all.extend(images);
                    if !more {
                        return Ok(all);
                    }
                }
                Some(Response::Error { message }) => return Err(ClientError::Refused(message)),
                _ => return Err(ClientError::Refused("unexpected answer".into())),
            }
        }
        Err(ClientError::EndlessList(MAX_IMAGE_PAGES))
    }

    /// Uploads `size` bytes read from `reader` as image `name` (an existing name only with
    /// `replace`); the depot imports them and answers with its report. `progress` sees the
    /// bytes sent so far. Needs a certificate of role `adaptmgr`. If `reader` ends before
    /// `size` bytes the stream is reset and the depot keeps nothing.
    pub async fn upload(
        &self,
        name: &str,
        size: u64,
        replace: bool,
        mut reader: impl AsyncRead + Unpin,
        mut progress: impl FnMut(u64),
    ) -> Result<UploadReport, ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(TransferError::from)?;
        let req = Request::Upload {
            name: name.to_string(),
            size,
            replace,
        };
        transfer::write_frame(&mut send, &wire::control(&req)).await?;
        // The depot says whether it takes the upload before any byte is sent.
        match read_answer(&mut recv).await? {
            Some(Response::Ok) => {}
            Some(Response::Error { message }) => return Err(ClientError::Refused(message)),
            _ => {
                return Err(ClientError::Refused(
                    "no answer to the upload request".into(),
                ));
            }
        }
        // The depot answers once, at the end or when it gives up early (an error, after which
        // it reads nothing more): that answer is awaited all along, so a client waiting on a
        // slow reader still learns at once that the depot gave up.
        let answer = read_answer(&mut recv);
        tokio::pin!(answer);
        let mut buf = vec![0u8; MAX_UPLOAD_BLOB as usize];
        let mut sent = 0u64;
        while sent < size {
            let want = (size - sent).min(buf.len() as u64) as usize;
            let step = async {
                let n = match reader.read(&mut buf[..want]).await {
                    Ok(0) => return Step::Short,
                    Ok(n) => n,
                    Err(e) => return Step::Source(e),
                };
                let written = async {
                    send.write_all(&wire::blob_header(n)).await?;
                    send.write_all(&buf[..n]).await
                };
                match written.await {
                    Ok(()) => Step::Sent(n),
                    Err(e) => Step::Write(e),
                }
            };
            let step = tokio::select! {
                step = step => step,
                early = &mut answer => Step::Answered(early),
            };
            match step {
                Step::Sent(n) => {
                    sent += n as u64;
                    progress(sent);
                }
                Step::Short => {
                    let _ = send.reset(0u32.into());
                    return Err(ClientError::ShortSource { sent, size });
                }
                Step::Source(e) => {
                    let _ = send.reset(0u32.into());
                    return Err(ClientError::Source(e));
                }
                Step::Write(e) => {
                    // The depot stopped reading; its reason is on the stream (it writes it
                    // right after; bounded all the same).
                    let why = tokio::time::timeout(Duration::from_secs(10), &mut answer).await;
                    return Err(match why {
                        Ok(Ok(Some(Response::Error { message }))) => ClientError::Refused(message),
                        _ => TransferError::from(e).into(),
                    });
                }
                Step::Answered(early) => {
                    let _ = send.reset(0u32.into());
                    return Err(match early? {
                        Some(Response::Error { message }) => ClientError::Refused(message),
                        _ => ClientError::Refused("the depot ended the upload early".into()),
                    });
                }
            }
        }
        transfer::write_frame(&mut send, &Frame::End).await?;
        send.finish().map_err(TransferError::from)?;
        match answer.await? {
            Some(Response::Upload(report)) => Ok(report),
            Some(Response::Error { message }) => Err(ClientError::Refused(message)),
            _ => Err(ClientError::Refused("no answer after the upload".into())),
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
