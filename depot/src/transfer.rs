//! Verified multi-source part transfers over QUIC (both ends).
//!
//! Fetching a part: its index is fetched from any source and accepted only if its BLAKE3 is
//! the part id; it is recorded as a partial part (so its chunks survive GC and a restart can
//! resume). The missing chunks are cut into ranges that workers — several per source — take
//! from one shared queue, so faster sources serve more ranges (multi-source splitting). Every
//! chunk is checked against its hash from the index before it is stored; a source that sends
//! one bad byte is marked lying, its current range goes back to the queue and it gets no more
//! work. When every chunk is present the part is committed. Chunks already present (a resumed
//! transfer) are re-hashed locally, never fetched again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::VarInt;
use serde::Serialize;
use viola_common::identity::{self, Role};

use crate::api::ImageEntry;
use crate::hash::Hash;
use crate::part::PartIndex;
use crate::store::{PathIoError, Store, StoreError};
use crate::upload::Uploads;
use crate::wire::{self, Frame, MAX_CONTROL_LEN, Request, Response, WireError};

/// Errors of one transfer.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("QUIC connection")]
    Connection(#[from] quinn::ConnectionError),
    #[error("writing to the stream")]
    Write(#[from] quinn::WriteError),
    #[error("reading from the stream")]
    Read(#[from] quinn::ReadExactError),
    #[error("stream closed")]
    Closed(#[from] quinn::ClosedStream),
    #[error("protocol")]
    Wire(#[from] WireError),
    #[error("peer answered: {0}")]
    Remote(String),
    #[error("unexpected frame from peer: {0}")]
    Unexpected(&'static str),
    #[error("index from {source_name} does not hash to part {part}")]
    BadIndex { source_name: String, part: Hash },
    #[error("store")]
    Store(#[from] StoreError),
    #[error("no source could provide part {part}: {detail}")]
    NoSource { part: Hash, detail: String },
}

/// Path properties used to size flow-control windows.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathTuning {
    /// Expected bottleneck rate, Mbit/s.
    pub rate_mbit: f64,
    /// Expected round-trip time, ms.
    pub rtt_ms: f64,
    #[serde(default)]
    pub congestion: Congestion,
}

impl Default for PathTuning {
    fn default() -> Self {
        Self {
            rate_mbit: 1000.0,
            rtt_ms: 50.0,
            congestion: Congestion::default(),
        }
    }
}

/// QUIC congestion controller. BBR is the default: across the lab's WAN link (20 ms RTT,
/// 200 Mbit/s token bucket) it reached 0.84 of iperf3's rate where Cubic reached 0.64
/// (`scripts/bench/depot.sh`); quinn still calls its BBR experimental.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    #[default]
    Bbr,
}

/// A UDP socket for a QUIC endpoint with kernel buffers of at least `bytes` each way: the
/// default (~200 kB) overflows at a few hundred Mbit/s and the drops look like congestion.
pub fn udp_socket(
    addr: std::net::SocketAddr,
    bytes: usize,
) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind(addr)?;
    let fd = sock.as_raw_fd();
    let size = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| {
            // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const size).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        // The FORCE variant needs CAP_NET_ADMIN; otherwise take what rmem_max allows.
        if set(force) != 0 {
            let _ = set(plain);
        }
    }
    Ok(sock)
}

/// A quinn endpoint on `addr` with large socket buffers (a server if `server` is given).
pub fn endpoint(
    addr: std::net::SocketAddr,
    server: Option<quinn::ServerConfig>,
    tuning: PathTuning,
) -> std::io::Result<quinn::Endpoint> {
    let buf = (4 * tuning.bdp() as usize).max(8 << 20);
    let sock = udp_socket(addr, buf)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, sock, runtime)
}

impl PathTuning {
    /// Bandwidth-delay product in bytes.
    pub fn bdp(&self) -> u64 {
        (self.rate_mbit * 1e6 / 8.0 * self.rtt_ms / 1e3).max(0.0) as u64
    }
}

/// A transport whose windows fill the path: each stream may have 2×BDP in flight (at least
/// QUIC's defaults), the connection 8×BDP, so a long fast link is never window-limited.
pub fn transport_config(t: PathTuning) -> quinn::TransportConfig {
    let bdp = t.bdp();
    let stream = (2 * bdp).max(1_250_000);
    let conn = (8 * bdp).max(8 * 1_250_000);
    let mut cfg = quinn::TransportConfig::default();
    cfg.stream_receive_window(VarInt::try_from(stream).unwrap_or(VarInt::MAX))
        .receive_window(VarInt::try_from(conn).unwrap_or(VarInt::MAX))
        .send_window(conn)
        .max_concurrent_bidi_streams(VarInt::from_u32(256))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .initial_rtt(Duration::from_secs_f64((t.rtt_ms / 1e3).max(0.001)));
    if t.congestion == Congestion::Bbr {
        cfg.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    cfg
}

/// Reads one frame; `None` when the peer finished the stream cleanly.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Frame>, TransferError> {
    let mut h = [0u8; wire::HEADER_LEN];
    match recv.read_exact(&mut h).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let (kind, len) = wire::parse_header(h)?;
    let mut payload = vec![0u8; len as usize];
    recv.read_exact(&mut payload).await?;
    Ok(Some(wire::frame_from(kind, payload)?))
}

pub async fn write_frame(send: &mut quinn::SendStream, f: &Frame) -> Result<(), TransferError> {
    send.write_all(&wire::encode(f)).await?;
    Ok(())
}

async fn request(
    conn: &quinn::Connection,
    req: &Request,
) -> Result<(quinn::SendStream, quinn::RecvStream), TransferError> {
    let (mut send, recv) = conn.open_bi().await?;
    write_frame(&mut send, &wire::control(req)).await?;
    send.finish()?;
    Ok((send, recv))
}

async fn expect_blob(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, TransferError> {
    match read_frame(recv).await? {
        Some(Frame::Blob(b)) => Ok(b),
        Some(Frame::Control(c)) => match wire::parse_response(&c)? {
            Response::Error { message } => Err(TransferError::Remote(message)),
            _ => Err(TransferError::Unexpected("control frame instead of blob")),
        },
        _ => Err(TransferError::Unexpected("no blob")),
    }
}

/// Fetches and verifies the index of `part` from one source.
pub async fn fetch_index(
    conn: &quinn::Connection,
    source_name: &str,
    part: Hash,
) -> Result<PartIndex, TransferError> {
    let (_s, mut recv) = request(conn, &Request::Index { part }).await?;
    let bytes = expect_blob(&mut recv).await?;
    if Hash::of(&bytes) != part {
        return Err(TransferError::BadIndex {
            source_name: source_name.to_string(),
            part,
        });
    }
    PartIndex::decode(&bytes).map_err(|_| TransferError::BadIndex {
        source_name: source_name.to_string(),
        part,
    })
}

/// Fetches a manifest (validated, not yet trusted beyond that) from one source.
pub async fn fetch_manifest(
    conn: &quinn::Connection,
    image: &str,
) -> Result<crate::manifest::Manifest, TransferError> {
    let (_s, mut recv) = request(
        conn,
        &Request::Manifest {
            image: image.to_string(),
        },
    )
    .await?;
    let bytes = expect_blob(&mut recv).await?;
    crate::manifest::Manifest::from_json(&bytes)
        .map_err(|e| TransferError::Remote(format!("invalid manifest: {e}")))
}

/// Which of `parts` the source holds completely.
pub async fn have(conn: &quinn::Connection, parts: &[Hash]) -> Result<Vec<bool>, TransferError> {
    let (_s, mut recv) = request(
        conn,
        &Request::Have {
            parts: parts.to_vec(),
        },
    )
    .await?;
    match read_frame(&mut recv).await? {
        Some(Frame::Control(c)) => match wire::parse_response(&c)? {
            Response::Have { complete } if complete.len() == parts.len() => Ok(complete),
            Response::Error { message } => Err(TransferError::Remote(message)),
            _ => Err(TransferError::Unexpected("bad have answer")),
        },
        _ => Err(TransferError::Unexpected("no have answer")),
    }
}

/// A depot to fetch from.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub conn: quinn::Connection,
}

/// Tuning of one fetch.
#[derive(Clone, Copy, Debug)]
pub struct FetchOptions {
    /// Chunks per range request.
    pub range_chunks: usize,
    /// Concurrent range requests per source.
    pub streams_per_source: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            range_chunks: 64,
            streams_per_source: 8,
        }
    }
}

/// What a fetch did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct FetchReport {
    pub part: Option<Hash>,
    pub chunks_total: usize,
    /// Chunks that were already here (resume) and re-verified locally.
    pub chunks_already_present: usize,
    pub chunks_fetched: usize,
    pub bytes_fetched: u64,
    /// Verified bytes per source.
    pub bytes_by_source: HashMap<String, u64>,
    /// Sources caught sending data that does not match its hash.
    pub lying_sources: Vec<String>,
    /// Chunks thrown away because they failed verification.
    pub bad_chunks: usize,
    /// Sources that failed (connection lost, protocol error).
    pub failed_sources: Vec<String>,
}

/// Ranges still to fetch, and how many are being fetched right now. A worker that finds the
/// queue empty waits while ranges are in flight, because a source that lies or fails puts its
/// range back: a worker that left then would leave that range to no one (seen in the depot lab
/// test on a loaded machine: the honest second source's workers had quit before the first
/// source's corrupt range came back, and the fetch failed with "chunks missing").
struct Work {
    queue: VecDeque<Vec<usize>>,
    in_flight: usize,
}

struct Shared {
    store: Store,
    idx: PartIndex,
    work: Mutex<Work>,
    /// Woken whenever a range is done or put back, for workers waiting on ranges in flight.
    work_changed: tokio::sync::Notify,
    report: Mutex<FetchReport>,
    progress: Arc<AtomicU64>,
}

/// Fetches part `part` into `store` from `sources`, verifying every chunk; resumes from what
/// the store already has. `progress` counts verified bytes as they arrive.
pub async fn fetch_part(
    store: &Store,
    part: Hash,
    sources: &[Source],
    opts: FetchOptions,
    progress: Arc<AtomicU64>,
) -> Result<FetchReport, TransferError> {
    let mut report = FetchReport {
        part: Some(part),
        ..FetchReport::default()
    };
    if store.has_part(&part) {
        let idx = store.part_index(&part)?;
        report.chunks_total = idx.chunks.len();
        report.chunks_already_present = idx.chunks.len();
        return Ok(report);
    }
    // The index: from a previous attempt, else from the first source that gives a valid one.
    let idx = match store.partial_index(&part)? {
        Some(idx) => idx,
        None => {
            let mut got = None;
            let mut errors = Vec::new();
            for s in sources {
                match fetch_index(&s.conn, &s.name, part).await {
                    Ok(idx) => {
                        got = Some(idx);
                        break;
                    }
                    Err(e) => {
                        if matches!(e, TransferError::BadIndex { .. }) {
                            report.lying_sources.push(s.name.clone());
                        }
                        errors.push(format!("{}: {}", s.name, viola_common::errors::chain(&e)));
                    }
                }
            }
            let idx = got.ok_or_else(|| TransferError::NoSource {
                part,
                detail: errors.join("; "),
            })?;
            store.begin_partial(&idx)?;
            idx
        }
    };
    report.chunks_total = idx.chunks.len();
    // Resume: re-verify what is already here (it may predate a crash), fetch only the rest.
    let mut missing = Vec::new();
    for (i, c) in idx.chunks.iter().enumerate() {
        if c.zero {
            continue;
        }
        if store.has_chunk(&c.hash) {
            if store.read_chunk(&c.hash).is_ok() {
                report.chunks_already_present += 1;
                continue;
            }
            let _ = std::fs::remove_file(store.chunk_path(&c.hash));
        }
        missing.push(i);
    }
    let queue: VecDeque<Vec<usize>> = missing
        .chunks(opts.range_chunks.max(1))
        .map(<[usize]>::to_vec)
        .collect();
    let shared = Arc::new(Shared {
        store: store.clone(),
        idx,
        work: Mutex::new(Work {
            queue,
            in_flight: 0,
        }),
        work_changed: tokio::sync::Notify::new(),
        report: Mutex::new(report),
        progress,
    });
    let mut workers = tokio::task::JoinSet::new();
    for s in sources {
        let bad = Arc::new(AtomicBool::new(false));
        for _ in 0..opts.streams_per_source.max(1) {
            let (shared, s, bad) = (shared.clone(), s.clone(), bad.clone());
            workers.spawn(async move { worker(shared, s, bad).await });
        }
    }
    while workers.join_next().await.is_some() {}
    let shared =
        Arc::try_unwrap(shared).map_err(|_| TransferError::Unexpected("worker outlived fetch"))?;
    let mut report = shared
        .report
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    report.lying_sources.sort();
    report.lying_sources.dedup();
    report.failed_sources.sort();
    report.failed_sources.dedup();
    let still = shared.store.missing_chunks(&shared.idx);
    if !still.is_empty() {
        return Err(TransferError::NoSource {
            part,
            detail: format!(
                "{} chunks missing; lying sources {:?}, failed sources {:?}",
                still.len(),
                report.lying_sources,
                report.failed_sources
            ),
        });
    }
    shared.store.commit_part(&shared.idx)?;
    Ok(report)
}

/// What a worker should do next.
enum Next {
    Fetch(Vec<usize>),
    /// Nothing queued, but ranges are in flight and may come back.
    Wait,
    Done,
}

fn next_range(sh: &Shared) -> Next {
    let Ok(mut work) = sh.work.lock() else {
        return Next::Done;
    };
    match work.queue.pop_front() {
        Some(range) => {
            work.in_flight += 1;
            Next::Fetch(range)
        }
        None if work.in_flight > 0 => Next::Wait,
        None => Next::Done,
    }
}

async fn worker(sh: Arc<Shared>, src: Source, bad: Arc<AtomicBool>) {
    loop {
        if bad.load(Ordering::Relaxed) {
            return;
        }
        // Registered before looking, so a change between the look and the wait is not missed.
        let changed = sh.work_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let range = match next_range(&sh) {
            Next::Fetch(range) => range,
            Next::Wait => {
                changed.await;
                continue;
            }
            Next::Done => return,
        };
        let result = fetch_range(&sh, &src, &range).await;
        if let Err((rest, lying, err)) = &result {
            tracing::warn!(source = %src.name, lying, error = %viola_common::errors::chain(err), "range failed; requeued");
            if let Ok(mut r) = sh.report.lock() {
                if *lying {
                    r.lying_sources.push(src.name.clone());
                    r.bad_chunks += 1;
                } else {
                    r.failed_sources.push(src.name.clone());
                }
            }
            bad.store(true, Ordering::Relaxed);
            if let Ok(mut work) = sh.work.lock() {
                work.queue.push_front(rest.clone());
            }
        }
        if let Ok(mut work) = sh.work.lock() {
            work.in_flight -= 1;
        }
        sh.work_changed.notify_waiters();
        if result.is_err() {
            return;
        }
    }
}

/// Fetches chunks `range` (sorted indices) from one source. On failure returns the chunks
/// still missing, whether the source lied, and the error.
async fn fetch_range(
    sh: &Shared,
    src: &Source,
    range: &[usize],
) -> Result<(), (Vec<usize>, bool, TransferError)> {
    let (first, last) = (range[0], range[range.len() - 1]);
    let mut pending: Vec<usize> = range.to_vec();
    let fail = |pending: &Vec<usize>, lying: bool, e: TransferError| (pending.clone(), lying, e);
    let req = Request::Chunks {
        part: sh.idx.id(),
        first: first as u32,
        count: (last - first + 1) as u32,
    };
    let (_send, mut recv) = request(&src.conn, &req)
        .await
        .map_err(|e| fail(&pending, false, e))?;
    loop {
        let frame = read_frame(&mut recv)
            .await
            .map_err(|e| fail(&pending, false, e))?;
        match frame {
            Some(Frame::Chunk { index, data }) => {
                let i = index as usize;
                let Some(entry) = sh.idx.chunks.get(i) else {
                    return Err(fail(
                        &pending,
                        true,
                        TransferError::Unexpected("chunk index out of range"),
                    ));
                };
                if Hash::of(&data) != entry.hash || data.len() != entry.len as usize {
                    // Lying (or broken) source: drop its bytes, the range goes elsewhere.
                    return Err(fail(
                        &pending,
                        true,
                        TransferError::Remote(format!("chunk {i} fails verification")),
                    ));
                }
                if let Some(pos) = pending.iter().position(|&p| p == i) {
                    sh.store
                        .put_chunk(&entry.hash, &data)
                        .map_err(|e| fail(&pending, false, e.into()))?;
                    pending.swap_remove(pos);
                    sh.progress.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Ok(mut r) = sh.report.lock() {
                        r.chunks_fetched += 1;
                        r.bytes_fetched += data.len() as u64;
                        *r.bytes_by_source.entry(src.name.clone()).or_default() +=
                            data.len() as u64;
                    }
                }
            }
            Some(Frame::End) | None => break,
            Some(Frame::Control(c)) => {
                let msg = match wire::parse_response(&c) {
                    Ok(Response::Error { message }) => message,
                    _ => "unexpected control frame".into(),
                };
                return Err(fail(&pending, false, TransferError::Remote(msg)));
            }
            Some(Frame::Blob(_)) => {
                return Err(fail(
                    &pending,
                    true,
                    TransferError::Unexpected("blob in chunk stream"),
                ));
            }
        }
    }
    if pending.is_empty() {
        Ok(())
    } else {
        pending.sort_unstable();
        Err((
            pending,
            false,
            TransferError::Unexpected("source ended the range early"),
        ))
    }
}

/// Handles staging requests on the server (implemented by the daemon).
pub trait Stager: Send + Sync + 'static {
    fn stage(&self, req: crate::api::StageRequest) -> crate::api::StageStatus;
    fn status(&self, stage_id: &str) -> Option<crate::api::StageStatus>;
}

/// What a server offers beyond parts, manifests and the image list: the daemon's staging and
/// uploads (a bare part server has neither and says so when asked).
#[derive(Clone, Default)]
pub struct Services {
    pub stager: Option<Arc<dyn Stager>>,
    pub uploads: Option<Arc<Uploads>>,
}

/// Serves one accepted connection until it closes.
pub async fn serve_connection(store: Store, conn: quinn::Connection, services: Services) {
    let peer = match identity::peer_identity(&conn) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %viola_common::errors::chain(&e), "connection without a Viola identity");
            conn.close(VarInt::from_u32(1), b"no identity");
            return;
        }
    };
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let Ok((send, recv)) = conn.accept_bi().await else {
            break;
        };
        let (store, services, peer) = (store.clone(), services.clone(), peer.clone());
        streams.spawn(async move {
            if let Err(e) = serve_stream(&store, send, recv, &services, &peer).await {
                tracing::debug!(peer = %peer, error = %viola_common::errors::chain(&e), "stream ended with an error");
            }
        });
        while streams.try_join_next().is_some() {}
    }
    streams.shutdown().await;
}

/// The roles that may make a request.
fn allowed_roles(req: &Request) -> &'static [Role] {
    match req {
        Request::Index { .. }
        | Request::Chunks { .. }
        | Request::Manifest { .. }
        | Request::Have { .. } => &[Role::Depot, Role::Adaptmgr, Role::Cli],
        Request::Stage(_) | Request::StageStatus { .. } | Request::Images { .. } => {
            &[Role::Adaptmgr, Role::Cli]
        }
        // The manager enforces tenants and relays users' uploads; nobody else writes names.
        Request::Upload { .. } => &[Role::Adaptmgr],
    }
}

/// The request in control frame `c`, if it parses and `peer`'s role may make it; else what to
/// answer (and the request, if it parsed).
fn admit(c: &[u8], peer: &identity::PeerIdentity) -> Result<Request, (Option<Request>, String)> {
    let req = wire::parse_request(c).map_err(|e| (None, e.to_string()))?;
    match peer.require_role(allowed_roles(&req)) {
        Ok(()) => Ok(req),
        Err(e) => Err((Some(req), e.to_string())),
    }
}

/// Bounds the image list's page by the answer's size, never by a silent cut: the page ends
/// where the next entry would not fit one control frame, and says there is more.
const IMAGES_PAGE_BYTES: usize = MAX_CONTROL_LEN as usize - 256;

/// Errors listing the images.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error("store")]
    Store(#[from] StoreError),
    #[error("the entry of image {0:?} does not fit a control frame")]
    TooLarge(String),
    #[error("encoding the list")]
    Json(#[from] serde_json::Error),
}

/// The page of the image list after `after` whose answer takes at most `max_bytes` of JSON,
/// and whether more follow.
pub fn images_page(
    store: &Store,
    after: Option<&str>,
    max_bytes: usize,
) -> Result<(Vec<ImageEntry>, bool), ImagesError> {
    let names = store.images()?;
    // The envelope at its longest (`false` is longer than `true`).
    let empty = serde_json::to_vec(&Response::Images {
        images: Vec::new(),
        more: false,
    })?;
    let mut used = empty.len();
    let mut page = Vec::new();
    for (name, h) in names
        .into_iter()
        .filter(|(n, _)| after.is_none_or(|a| n.as_str() > a))
    {
        let entry = store.image_entry(&name, h);
        // Its JSON and the comma before it.
        let len = serde_json::to_vec(&entry)?.len() + 1;
        if used + len > max_bytes {
            if page.is_empty() {
                return Err(ImagesError::TooLarge(name));
            }
            return Ok((page, true));
        }
        used += len;
        page.push(entry);
    }
    Ok((page, false))
}

fn error_frame(message: String) -> Frame {
    wire::control(&Response::Error { message })
}

async fn serve_stream(
    store: &Store,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    services: &Services,
    peer: &identity::PeerIdentity,
) -> Result<(), TransferError> {
    // A control frame only: an upload's data frames are read by the upload, with their own
    // smaller bound.
    let mut h = [0u8; wire::HEADER_LEN];
    recv.read_exact(&mut h).await?;
    let (kind, len) = wire::parse_header(h)?;
    if kind != 1 {
        return Err(TransferError::Unexpected("request must be a control frame"));
    }
    let mut c = vec![0u8; len as usize];
    recv.read_exact(&mut c).await?;
    let stager = services.stager.as_deref();
    let req = match admit(&c, peer) {
        Ok(req) => req,
        Err((req, refusal)) => {
            if let (Some(Request::Upload { .. }), Some(u)) = (&req, &services.uploads) {
                u.count_refused();
                tracing::warn!(%peer, error = %refusal, "upload refused");
            }
            write_frame(&mut send, &error_frame(refusal)).await?;
            send.finish()?;
            return Ok(());
        }
    };
    match req {
        Request::Index { part } => match store.part_index(&part) {
            Ok(idx) => write_frame(&mut send, &Frame::Blob(idx.encode())).await?,
            Err(e) => write_frame(&mut send, &error_frame(viola_common::errors::chain(&e))).await?,
        },
        Request::Chunks { part, first, count } => match store.part_index(&part) {
            Ok(idx) => {
                let end = (first as usize)
                    .saturating_add(count as usize)
                    .min(idx.chunks.len());
                for i in (first as usize).min(end)..end {
                    let c = idx.chunks[i];
                    if c.zero {
                        continue;
                    }
                    // Sent as stored: the receiver verifies every chunk.
                    let data = tokio::fs::read(store.chunk_path(&c.hash))
                        .await
                        .map_err(|e| {
                            let path = store.chunk_path(&c.hash);
                            TransferError::Store(PathIoError::on("reading chunk", &path)(e))
                        })?;
                    send.write_all(&wire::chunk_header(i as u32, data.len()))
                        .await?;
                    send.write_all(&data).await?;
                }
                write_frame(&mut send, &Frame::End).await?;
            }
            Err(e) => write_frame(&mut send, &error_frame(viola_common::errors::chain(&e))).await?,
        },
        Request::Manifest { image } => match store.resolve(&image) {
            Ok((_, m)) => write_frame(&mut send, &Frame::Blob(m.to_json())).await?,
            Err(e) => write_frame(&mut send, &error_frame(viola_common::errors::chain(&e))).await?,
        },
        Request::Have { parts } => {
            let complete = parts
                .iter()
                .take(10_000)
                .map(|p| store.has_part(p))
                .collect();
            write_frame(&mut send, &wire::control(&Response::Have { complete })).await?;
        }
        Request::Stage(r) => match stager {
            Some(s) => write_frame(&mut send, &wire::control(&Response::Stage(s.stage(r)))).await?,
            None => {
                write_frame(
                    &mut send,
                    &error_frame("this depot does not stage images".into()),
                )
                .await?
            }
        },
        Request::StageStatus { stage_id } => match stager.and_then(|s| s.status(&stage_id)) {
            Some(st) => write_frame(&mut send, &wire::control(&Response::Stage(st))).await?,
            None => {
                write_frame(
                    &mut send,
                    &error_frame(format!("no staging request {stage_id:?}")),
                )
                .await?
            }
        },
        Request::Images { after } => {
            // One manifest read per image: off the async threads.
            let store = store.clone();
            let page = tokio::task::spawn_blocking(move || {
                images_page(&store, after.as_deref(), IMAGES_PAGE_BYTES)
            })
            .await;
            let answer = match page {
                Ok(Ok((images, more))) => wire::control(&Response::Images { images, more }),
                Ok(Err(e)) => error_frame(viola_common::errors::chain(&e)),
                Err(e) => error_frame(format!("listing the images: {e}")),
            };
            write_frame(&mut send, &answer).await?;
        }
        Request::Upload {
            name,
            size,
            replace,
        } => {
            return match &services.uploads {
                Some(u) => u.serve(send, recv, name, size, replace, peer).await,
                None => {
                    write_frame(
                        &mut send,
                        &error_frame("this depot does not accept uploads".into()),
                    )
                    .await?;
                    send.finish()?;
                    Ok(())
                }
            };
        }
    }
    send.finish()?;
    Ok(())
}
