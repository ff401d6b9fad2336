//! Getting a VM's base image to the destination before an incremental migration, and telling
//! the overlay that a VM is about to move.
//!
//! [`BaseStager`] is what the orchestrator needs. Two implementations: the depot's staging API
//! ([`super::depot_stage::DepotStager`], used when the destination's site has a depot and the
//! VM runs from a depot image), and [`LocalCopyStager`], the direct, verified copy used
//! otherwise: both hosts' image directories must be visible from the manager's file system
//! (true in the lab, where every host's image directory is also under
//! `/var/lib/viola-lab/images/HOST/`). It copies to a temporary name, checks the BLAKE3 hash of
//! what landed against the source's, and only then renames into place, so a half copy never
//! looks like a base.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub use viola_api::migration::StagingProgress;

/// Why a base could not be staged.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(
        "no local view of the image directory of {uri} (`images_local`): a base that is not a \
         depot image is copied directly only where the manager sees both hosts' directories; \
         give the VM a depot image, or move it with its whole disk (`viola vm migrate --full-copy`)"
    )]
    UnknownHost { uri: String },
    #[error("{path} is outside the image directory {prefix} of {uri}")]
    OutsideImageDir {
        path: String,
        prefix: String,
        uri: String,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("copy of {path} is corrupt: BLAKE3 {got} instead of {want}")]
    HashMismatch {
        path: PathBuf,
        want: String,
        got: String,
    },
    #[error("the staging task died")]
    Join(#[source] tokio::task::JoinError),
    #[error("cannot reach the depot of site {site} at {addr}")]
    DepotUnreachable {
        site: String,
        addr: std::net::SocketAddr,
        #[source]
        source: Box<viola_depot::client::ClientError>,
    },
    #[error("request to the depot of site {site} failed")]
    DepotRequest {
        site: String,
        #[source]
        source: Box<viola_depot::client::ClientError>,
    },
    #[error("the depot of site {site} ended staging {stage_id} {state}: {message}")]
    DepotRefused {
        site: String,
        stage_id: String,
        state: String,
        message: String,
    },
    #[error(
        "the depot of site {site} did not have staging {stage_id} ready by the deadline ({waited_ms} ms; last state {state}, {bytes_done} of {bytes_total} bytes)"
    )]
    DepotLate {
        site: String,
        stage_id: String,
        waited_ms: u64,
        state: String,
        bytes_done: u64,
        bytes_total: u64,
    },
    #[error(
        "the depot of site {site} laid down {laid:?}, which does not end in the VM's base {base}"
    )]
    ChainMismatch {
        site: String,
        base: String,
        laid: Vec<PathBuf>,
    },
}

/// Puts `base_path` (a path as the hosts see it) on the destination host.
pub trait BaseStager: Send + Sync + 'static {
    fn stage(
        &self,
        base_path: &str,
        source_uri: &str,
        dest_uri: &str,
    ) -> impl Future<Output = Result<StagedBase, StageError>> + Send;

    /// Stages the base of a migrating VM, knowing the VM (its domain XML may name the depot
    /// image it runs from), the deadline, and where to report progress. By default a direct
    /// copy through [`stage`](Self::stage).
    fn stage_for_vm(
        &self,
        job: &StageJob<'_>,
    ) -> impl Future<Output = Result<StagedHow, StageError>> + Send {
        async move {
            let staged = self
                .stage(job.base_path, job.source_uri, job.dest_uri)
                .await?;
            Ok(StagedHow::DirectCopy {
                reason: "this stager only copies directly".into(),
                staged,
            })
        }
    }
}

/// What the migration knows when it stages a VM's base.
pub struct StageJob<'a> {
    pub vm: &'a str,
    /// The image right below the VM's disk, as the hosts see it.
    pub base_path: &'a str,
    pub source_uri: &'a str,
    pub dest_uri: &'a str,
    /// The VM's domain XML at the source.
    pub domain_xml: &'a str,
    /// The base must be in place by then (Unix ms).
    pub deadline_unix_ms: u64,
    /// Sees every progress update.
    pub progress: &'a (dyn Fn(StagingProgress) + Send + Sync),
}

/// How a base got to the destination (recorded in the migration's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StagedHow {
    /// Verified direct copy from the source's image directory.
    DirectCopy { reason: String, staged: StagedBase },
    /// Laid down by the destination site's depot.
    Depot {
        site: String,
        image: String,
        stage_id: String,
        /// Bytes the depot fetched from other depots for it.
        bytes_fetched: u64,
        /// The chain as the depot laid it down, base first.
        chain: Vec<PathBuf>,
        elapsed_ms: u64,
    },
}

impl std::fmt::Display for StagedHow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DirectCopy { reason, staged } => write!(
                f,
                "direct verified copy ({reason}): {} bytes, BLAKE3 {}{}",
                staged.bytes,
                &staged.blake3[..staged.blake3.len().min(16)],
                if staged.copied {
                    ""
                } else {
                    ", identical file already there"
                }
            ),
            Self::Depot {
                site,
                image,
                stage_id,
                bytes_fetched,
                chain,
                elapsed_ms,
            } => write!(
                f,
                "depot of site {site} staged image {image} ({stage_id}) in {elapsed_ms} ms: {} part(s), {bytes_fetched} bytes fetched from other depots",
                chain.len()
            ),
        }
    }
}

/// What staging did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedBase {
    pub blake3: String,
    pub bytes: u64,
    /// False when an identical file was already there.
    pub copied: bool,
}

/// How one host's image directory is seen from the manager.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageDirView {
    /// The directory as the host (its libvirtd) sees it, e.g. `/var/lib/libvirt/images`.
    pub host_dir: PathBuf,
    /// The same directory as the manager sees it, e.g. `/var/lib/viola-lab/images/a1`.
    pub local_dir: PathBuf,
}

/// Direct verified copy between image directories the manager can see.
#[derive(Debug, Clone, Default)]
pub struct LocalCopyStager {
    views: BTreeMap<String, ImageDirView>,
}

impl LocalCopyStager {
    /// `views` maps a libvirt URI to that host's image directory view.
    pub fn new(views: BTreeMap<String, ImageDirView>) -> Self {
        Self { views }
    }

    fn local_path(&self, uri: &str, path: &str) -> Result<PathBuf, StageError> {
        let view = self.views.get(uri).ok_or_else(|| StageError::UnknownHost {
            uri: uri.to_owned(),
        })?;
        let rel = Path::new(path)
            .strip_prefix(&view.host_dir)
            .ok()
            .filter(|r| {
                r.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
            })
            .ok_or_else(|| StageError::OutsideImageDir {
                path: path.to_owned(),
                prefix: view.host_dir.display().to_string(),
                uri: uri.to_owned(),
            })?;
        Ok(view.local_dir.join(rel))
    }
}

/// BLAKE3 of a file, streaming.
pub fn hash_file(path: &Path) -> Result<(String, u64), StageError> {
    let read_err = |source| StageError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hasher.finalize().to_hex().to_string(), total))
}

/// Copies `src` to `dst` through a temporary file, verified by BLAKE3, then renamed.
pub fn verified_copy(src: &Path, dst: &Path) -> Result<StagedBase, StageError> {
    let (want, bytes) = hash_file(src)?;
    if dst.exists()
        && let Ok((have, _)) = hash_file(dst)
        && have == want
    {
        return Ok(StagedBase {
            blake3: want,
            bytes,
            copied: false,
        });
    }
    let write_err = |source| StageError::Write {
        path: dst.to_owned(),
        source,
    };
    let file_name = dst
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dst.with_file_name(format!(".{file_name}.viola-part"));
    let result = (|| {
        let mut input = std::fs::File::open(src).map_err(|source| StageError::Read {
            path: src.to_owned(),
            source,
        })?;
        let mut output = std::fs::File::create(&tmp).map_err(write_err)?;
        std::io::copy(&mut input, &mut output).map_err(write_err)?;
        output.flush().map_err(write_err)?;
        output.sync_all().map_err(write_err)?;
        let (got, _) = hash_file(&tmp)?;
        if got != want {
            return Err(StageError::HashMismatch {
                path: dst.to_owned(),
                want: want.clone(),
                got,
            });
        }
        std::fs::rename(&tmp, dst).map_err(write_err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| StagedBase {
        blake3: want,
        bytes,
        copied: true,
    })
}

impl BaseStager for LocalCopyStager {
    async fn stage(
        &self,
        base_path: &str,
        source_uri: &str,
        dest_uri: &str,
    ) -> Result<StagedBase, StageError> {
        let src = self.local_path(source_uri, base_path)?;
        let dst = self.local_path(dest_uri, base_path)?;
        tokio::task::spawn_blocking(move || verified_copy(&src, &dst))
            .await
            .map_err(StageError::Join)?
    }
}

/// The move the overlay must expect.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MoveNotice {
    pub vm: String,
    pub macs: Vec<String>,
    pub source_uri: String,
    pub dest_uri: String,
}

/// Why the overlay could not be told.
#[derive(Debug, thiserror::Error)]
#[error("cannot tell the overlay about {vm}: {reason}")]
pub struct AnnounceError {
    pub vm: String,
    pub reason: String,
}

/// Tells the overlay daemons that a VM's MACs are about to appear at another host (so they
/// switch forwarding the moment the VM announces itself there, and never flap back), or that
/// the move was called off. Required by the migration: there is deliberately no do-nothing
/// implementation in the library.
pub trait MoveAnnouncer: Send + Sync + 'static {
    fn expect_move(
        &self,
        notice: &MoveNotice,
    ) -> impl Future<Output = Result<(), AnnounceError>> + Send;
    fn withdraw_move(
        &self,
        notice: &MoveNotice,
    ) -> impl Future<Output = Result<(), AnnounceError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_is_verified_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(a.join("base.qcow2"), &data).unwrap();
        let first = verified_copy(&a.join("base.qcow2"), &b.join("base.qcow2")).unwrap();
        assert!(first.copied);
        assert_eq!(first.bytes, data.len() as u64);
        assert_eq!(std::fs::read(b.join("base.qcow2")).unwrap(), data);
        let second = verified_copy(&a.join("base.qcow2"), &b.join("base.qcow2")).unwrap();
        assert!(!second.copied);
        assert_eq!(first.blake3, second.blake3);
    }

    #[test]
    fn a_different_file_at_the_destination_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("src"), b"good base").unwrap();
        std::fs::write(dir.path().join("dst"), b"stale").unwrap();
        let r = verified_copy(&dir.path().join("src"), &dir.path().join("dst")).unwrap();
        assert!(r.copied);
        assert_eq!(std::fs::read(dir.path().join("dst")).unwrap(), b"good base");
    }

    #[test]
    fn paths_escaping_the_image_dir_are_refused() {
        let mut views = BTreeMap::new();
        views.insert(
            "qemu+tcp://a/system".to_string(),
            ImageDirView {
                host_dir: "/var/lib/libvirt/images".into(),
                local_dir: "/srv/a".into(),
            },
        );
        let s = LocalCopyStager::new(views);
        assert_eq!(
            s.local_path("qemu+tcp://a/system", "/var/lib/libvirt/images/base.qcow2")
                .unwrap(),
            PathBuf::from("/srv/a/base.qcow2")
        );
        assert!(
            s.local_path(
                "qemu+tcp://a/system",
                "/var/lib/libvirt/images/../../etc/passwd"
            )
            .is_err()
        );
        assert!(s.local_path("qemu+tcp://a/system", "/etc/passwd").is_err());
        assert!(s.local_path("qemu+tcp://z/system", "/x").is_err());
    }
}
