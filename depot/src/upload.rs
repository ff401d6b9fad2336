//! Receiving an image over the network (`upload`: the adaptation manager relays a user's image)
//! and importing it under a name. The frame sequence is in [`crate::wire`].
//!
//! - Before any byte: the name is valid, new (unless `replace`) and not being uploaded already;
//!   the size is above zero, at most the configured limit (64 GiB by default) and at most the
//!   store's free space; at most `max_uploads` uploads run at once. Anything else is refused at
//!   once, so the client sends nothing.
//! - The bytes go to a temp file created exclusively (mode 0600) in the store's `tmp/`, one
//!   frame (at most [`crate::wire::MAX_UPLOAD_BLOB`]) in memory at a time. Exactly `size` bytes
//!   then the end frame, or the upload fails; so does a client silent for the idle timeout.
//! - The file is untrusted: [`image::inspect_untrusted`] decides its format from its first
//!   bytes and refuses a backing file, an external data file or any other format's signature
//!   before qemu opens it (format pinned, so qemu never probes). Then
//!   [`image::import_self_contained`] cuts it into the store as a one-part image and writes
//!   the name last, atomically (a new name by `link`, so of two racing writers one is told the
//!   name exists).
//! - Nothing half-made: the temp file is removed on every path (a guard, also when the task is
//!   aborted at shutdown; a crash leaves it to the next start's cleaning of `tmp/`), and the
//!   name is written only after everything before it succeeded. At shutdown the import stops
//!   before its next chunk and before the name. Parts and chunks committed by an import that
//!   then failed stay, unnamed: they are content-addressed, harmless, and the next GC removes
//!   them.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use viola_common::identity::PeerIdentity;

use crate::api::UploadReport;
use crate::chunker::ChunkerSpec;
use crate::image::{self, ImageError, UntrustedImageError};
use crate::manifest::{self, ManifestError};
use crate::store::{PathIoError, Store, StoreError};
use crate::transfer::{self, TransferError};
use crate::wire::{self, MAX_UPLOAD_BLOB, Response, WireError};

/// Default largest upload.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 30;

/// Limits of uploads (the daemon's configuration).
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    /// Largest image accepted, bytes (refused up front above it).
    pub max_bytes: u64,
    /// Uploads received at once (each holds a temp file of up to `max_bytes`).
    pub max_concurrent: usize,
    /// An upload whose client sends nothing for this long fails (and frees its slot).
    pub idle_timeout: Duration,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            max_concurrent: 2,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Upload counters (the daemon exports them).
#[derive(Clone, Debug, Default)]
pub struct UploadCounters {
    /// Uploads imported and named.
    pub ok: Counter,
    /// Uploads refused: role, name, size, space, busy, or the image itself.
    pub refused: Counter,
    /// Uploads that failed otherwise: the stream broke or was short, I/O, import, shutdown.
    pub failed: Counter,
    /// Bytes of uploads imported.
    pub bytes: Counter,
}

/// Why an upload did not make an image.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("bad image name")]
    Name(#[source] ManifestError),
    #[error("image {0} exists; pass replace to point it at the new content")]
    Exists(String),
    #[error("an upload of {0} is already in progress")]
    InProgress(String),
    #[error("an upload of 0 bytes")]
    Empty,
    #[error("{size} bytes is more than this depot accepts in one upload ({limit})")]
    TooBig { size: u64, limit: u64 },
    #[error("{size} bytes do not fit: the store has {free} bytes free")]
    NoSpace { size: u64, free: u64 },
    #[error("depot busy: {0} uploads in progress; try again later")]
    Busy(usize),
    #[error("store")]
    Store(#[source] StoreError),
    #[error("the client's stream broke off after {received} of {size} bytes")]
    Stream {
        received: u64,
        size: u64,
        #[source]
        source: quinn::ReadExactError,
    },
    #[error("the upload ended after {received} of {size} bytes")]
    Short { received: u64, size: u64 },
    #[error("more than the announced {size} bytes")]
    Overrun { size: u64 },
    #[error("protocol")]
    Wire(#[from] WireError),
    #[error("unexpected frame during an upload: {0}")]
    Unexpected(&'static str),
    #[error("no complete frame from the client for {0:?}")]
    Idle(Duration),
    #[error("the depot is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("image refused")]
    Untrusted(#[from] UntrustedImageError),
    #[error("import")]
    Import(#[source] ImageError),
    #[error("import task ended abnormally")]
    Task(#[source] tokio::task::JoinError),
}

impl UploadError {
    /// A refusal (the request or the image is not acceptable) rather than a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Name(_)
                | Self::Exists(_)
                | Self::InProgress(_)
                | Self::Empty
                | Self::TooBig { .. }
                | Self::NoSpace { .. }
                | Self::Busy(_)
                | Self::Untrusted(_)
        )
    }
}

impl From<ImageError> for UploadError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Store(StoreError::NameExists(name)) => Self::Exists(name),
            ImageError::Store(StoreError::Cancelled) => Self::ShuttingDown,
            ImageError::Manifest(m) => Self::Name(m),
            e => Self::Import(e),
        }
    }
}

/// The daemon's upload service: limits, the names being uploaded, counters.
pub struct Uploads {
    store: Store,
    chunker: ChunkerSpec,
    limits: UploadLimits,
    slots: Arc<tokio::sync::Semaphore>,
    names: Arc<Mutex<HashSet<String>>>,
    token: CancellationToken,
    counters: UploadCounters,
}

/// A name being uploaded; released when dropped.
struct Reserved {
    names: Arc<Mutex<HashSet<String>>>,
    name: String,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// What admission holds for the upload's lifetime.
struct Admitted {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _name: Reserved,
}

/// The upload's temp file, removed when dropped: on success, on error, and when the task is
/// aborted (shutdown).
struct TempFile(PathBuf);

impl TempFile {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Sets the flag when dropped: an import on a blocking thread outlives an aborted task, and
/// must stop instead of naming an image nobody waits for.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// One frame of an upload.
enum Incoming {
    /// A blob (its bytes in the buffer).
    Blob,
    End,
    /// The client finished its side without an end frame.
    Finished,
}

/// Progress lines of a long upload come this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

impl Uploads {
    /// `token` is the daemon's shutdown: uploads in progress fail when it is cancelled.
    pub fn new(
        store: Store,
        chunker: ChunkerSpec,
        limits: UploadLimits,
        token: CancellationToken,
        counters: UploadCounters,
    ) -> Self {
        Self {
            store,
            chunker,
            limits,
            slots: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent.max(1))),
            names: Arc::new(Mutex::new(HashSet::new())),
            token,
            counters,
        }
    }

    pub fn counters(&self) -> &UploadCounters {
        &self.counters
    }

    /// Counts an upload refused before it got here (the role check).
    pub fn count_refused(&self) {
        self.counters.refused.inc();
    }

    /// What can be decided before any byte arrives.
    fn admit(&self, name: &str, size: u64, replace: bool) -> Result<Admitted, UploadError> {
        manifest::validate_name(name).map_err(UploadError::Name)?;
        if size == 0 {
            return Err(UploadError::Empty);
        }
        if size > self.limits.max_bytes {
            return Err(UploadError::TooBig {
                size,
                limit: self.limits.max_bytes,
            });
        }
        if !replace {
            match self.store.resolve(name) {
                Err(StoreError::NoSuchImage(_)) => {}
                // A name whose manifest is damaged exists all the same.
                _ => return Err(UploadError::Exists(name.to_string())),
            }
        }
        // Only the temp file: the import's new chunks may need up to as much again, and an
        // import that runs out of space fails cleanly.
        let free = self.store.free_bytes().map_err(UploadError::Store)?;
        if size > free {
            return Err(UploadError::NoSpace { size, free });
        }
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| UploadError::Busy(self.limits.max_concurrent.max(1)))?;
        let reserved = {
            let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            if !names.insert(name.to_string()) {
                return Err(UploadError::InProgress(name.to_string()));
            }
            Reserved {
                names: self.names.clone(),
                name: name.to_string(),
            }
        };
        Ok(Admitted {
            _slot: slot,
            _name: reserved,
        })
    }

    /// Serves one `upload` request whose control frame was read (and its role admitted):
    /// answers, receives, imports, answers again, finishes the stream.
    pub async fn serve(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        name: String,
        size: u64,
        replace: bool,
        peer: &PeerIdentity,
    ) -> Result<(), TransferError> {
        let admitted = match self.admit(&name, size, replace) {
            Ok(a) => a,
            Err(e) => {
                self.counters.refused.inc();
                let message = viola_common::errors::chain(&e);
                tracing::warn!(%peer, %name, size, error = %message, "upload refused");
                transfer::write_frame(&mut send, &wire::control(&Response::Error { message }))
                    .await?;
                send.finish()?;
                return Ok(());
            }
        };
        tracing::info!(%peer, %name, size, replace, "upload started");
        if let Err(e) = transfer::write_frame(&mut send, &wire::control(&Response::Ok)).await {
            self.counters.failed.inc();
            return Err(e);
        }
        let started = Instant::now();
        let result = self
            .receive_and_import(&mut recv, &name, size, replace)
            .await;
        drop(admitted);
        let answer = match result {
            Ok(report) => {
                self.counters.ok.inc();
                self.counters.bytes.inc_by(size);
                tracing::info!(
                    %peer, %name, manifest = %report.manifest, replaced = ?report.replaced,
                    format = report.format.as_str(), bytes = size, new_bytes = report.new_bytes,
                    dedup_bytes = report.dedup_bytes, secs = started.elapsed().as_secs_f64(),
                    "upload imported"
                );
                Response::Upload(report)
            }
            Err(e) => {
                let message = viola_common::errors::chain(&e);
                if e.is_refusal() {
                    self.counters.refused.inc();
                    tracing::warn!(%peer, %name, size, error = %message, "upload refused");
                } else {
                    self.counters.failed.inc();
                    tracing::warn!(%peer, %name, size, error = %message, "upload failed");
                }
                // Nothing more is read: a client still sending learns at once.
                let _ = recv.stop(0u32.into());
                Response::Error { message }
            }
        };
        transfer::write_frame(&mut send, &wire::control(&answer)).await?;
        send.finish()?;
        Ok(())
    }

    async fn receive_and_import(
        &self,
        recv: &mut quinn::RecvStream,
        name: &str,
        size: u64,
        replace: bool,
    ) -> Result<UploadReport, UploadError> {
        // Absolute, so qemu-img never reads a relative store path as `protocol:...`.
        let path =
            std::path::absolute(self.store.tmp_file()).map_err(PathIoError::on::<UploadError>(
                "resolving",
                &self.store.tmp_dir(),
            ))?;
        let tmp = TempFile(path);
        self.receive(recv, &tmp, name, size).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let _stop_on_drop = StopOnDrop(stop.clone());
        let (store, spec, task_name, task_stop) = (
            self.store.clone(),
            self.chunker,
            name.to_string(),
            stop.clone(),
        );
        // `tmp` moves into the task: the temp file goes when the import ends, whichever way.
        let mut task = tokio::task::spawn_blocking(move || {
            let info = image::inspect_untrusted(tmp.path())?;
            tracing::info!(name = %task_name, format = info.format.as_str(), virtual_size = info.virtual_size, "upload accepted; importing");
            let mut logged = Instant::now();
            let imported = image::import_self_contained(
                &store,
                &info,
                &task_name,
                replace,
                spec,
                &task_stop,
                &mut |done, total| {
                    if logged.elapsed() >= LOG_EVERY {
                        logged = Instant::now();
                        tracing::info!(name = %task_name, done, total, "importing upload");
                    }
                },
            )?;
            Ok::<_, UploadError>((info, imported))
        });
        let joined = tokio::select! {
            r = &mut task => r,
            () = self.token.cancelled() => {
                stop.store(true, Ordering::Relaxed);
                task.await
            }
        };
        let (info, imported) = joined.map_err(UploadError::Task)??;
        let st = &imported.stats;
        Ok(UploadReport {
            name: name.to_string(),
            manifest: imported.hash,
            replaced: imported.replaced,
            bytes_received: size,
            format: info.format,
            virtual_size: info.virtual_size,
            parts: imported.manifest.parts.len(),
            chunks: st.chunks,
            zero_chunks: st.zero_chunks,
            new_chunks: st.new_chunks,
            new_bytes: st.new_bytes,
            dedup_chunks: st
                .chunks
                .saturating_sub(st.zero_chunks)
                .saturating_sub(st.new_chunks),
            dedup_bytes: size
                .saturating_sub(st.zero_bytes)
                .saturating_sub(st.new_bytes),
        })
    }

    /// Appends the blobs to the temp file until the end frame; exactly `size` bytes.
    async fn receive(
        &self,
        recv: &mut quinn::RecvStream,
        tmp: &TempFile,
        name: &str,
        size: u64,
    ) -> Result<(), UploadError> {
        let path = tmp.path();
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(PathIoError::on::<UploadError>("creating", path))?;
        let mut file = tokio::fs::File::from_std(file);
        let mut buf = Vec::with_capacity(MAX_UPLOAD_BLOB as usize);
        let mut received = 0u64;
        let started = Instant::now();
        let mut logged = started;
        loop {
            let next = tokio::select! {
                () = self.token.cancelled() => return Err(UploadError::ShuttingDown),
                r = tokio::time::timeout(self.limits.idle_timeout, read_frame(recv, &mut buf)) => r,
            };
            let frame = next
                .map_err(|_| UploadError::Idle(self.limits.idle_timeout))?
                .map_err(|source| UploadError::Stream {
                    received,
                    size,
                    source,
                })??;
            match frame {
                Incoming::Blob => {
                    if received + buf.len() as u64 > size {
                        return Err(UploadError::Overrun { size });
                    }
                    file.write_all(&buf)
                        .await
                        .map_err(PathIoError::on::<UploadError>("writing", path))?;
                    received += buf.len() as u64;
                    if logged.elapsed() >= LOG_EVERY {
                        logged = Instant::now();
                        let mbit = received as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e6;
                        tracing::info!(%name, received, size, mbit = format!("{mbit:.1}"), "receiving upload");
                    }
                }
                Incoming::End if received == size => break,
                Incoming::End | Incoming::Finished => {
                    return Err(UploadError::Short { received, size });
                }
            }
        }
        // Written through the page cache; the import reads it back and syncs what it keeps.
        file.flush()
            .await
            .map_err(PathIoError::on::<UploadError>("writing", path))?;
        Ok(())
    }
}

/// Reads one frame of an upload into `buf` (only blob and end frames are allowed; a blob's
/// length is checked before anything is allocated).
async fn read_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
) -> Result<Result<Incoming, UploadError>, quinn::ReadExactError> {
    let mut h = [0u8; wire::HEADER_LEN];
    match recv.read_exact(&mut h).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(Ok(Incoming::Finished)),
        Err(e) => return Err(e),
    }
    let (kind, len) = match wire::parse_header(h) {
        Ok(kl) => kl,
        Err(e) => return Ok(Err(e.into())),
    };
    match (kind, len) {
        (3, 0) => Ok(Err(UploadError::Unexpected("empty blob"))),
        (3, len) if len > MAX_UPLOAD_BLOB => Ok(Err(UploadError::Unexpected(
            "a blob above the upload frame limit (wire::MAX_UPLOAD_BLOB)",
        ))),
        (3, len) => {
            buf.resize(len as usize, 0);
            recv.read_exact(buf).await?;
            Ok(Ok(Incoming::Blob))
        }
        (4, _) => Ok(Ok(Incoming::End)),
        _ => Ok(Err(UploadError::Unexpected(
            "only blob and end frames may follow an upload request",
        ))),
    }
}
