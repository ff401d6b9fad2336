//! The staging API for the adaptation manager: "stage image X for VM v at host h by time t".
//!
//! Connect to the destination site's depot over QUIC (ALPN [`viola_common::identity::alpn::DEPOT`],
//! a certificate with role `adaptmgr` or `cli`), open a bidirectional stream, send a control
//! frame with [`crate::wire::Request::Stage`] and read back one control frame with
//! [`crate::wire::Response::Stage`]. Poll with [`crate::wire::Request::StageStatus`] on new
//! streams; `state` becomes `ready` when the chain is laid down and the overlay exists and passed
//! `qemu-img check` (with `chain_only`, when the chain is laid down and checked).
//! [`crate::client::DepotClient`] wraps this (`stage`, `stage_status`, `wait_ready`).
//!
//! Times are Unix milliseconds. The depot answers at once with its prediction; `accepted`
//! false means the planner says the deadline cannot be met (the depot still stages the image,
//! best effort, unless `reject_if_late` is set).
//!
//! The same connection lists the depot's images ([`crate::wire::Request::Images`], roles
//! `adaptmgr` and `cli`: [`ImageEntry`] per name, a page per request) and receives an image to
//! import ([`crate::wire::Request::Upload`], role `adaptmgr` only: the manager enforces tenants
//! and relays for users; the answer is an [`UploadReport`]). The frame sequences are in
//! [`crate::wire`]; [`crate::client::DepotClient`] wraps them (`images`, `upload`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::manifest::DiskFormat;

/// Stage `image` for `vm` at `host`, ready by `deadline_unix_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageRequest {
    /// Image name or manifest hash.
    pub image: String,
    /// VM name: the overlay is `<image dir of host>/<vm>.qcow2`.
    pub vm: String,
    /// Destination host (must be served by this depot's site).
    pub host: String,
    pub deadline_unix_ms: u64,
    /// Refuse instead of staging best-effort when the deadline cannot be met.
    #[serde(default)]
    pub reject_if_late: bool,
    /// Lay down the chain only, without `<vm>.qcow2`: for a caller that creates the VM's disk
    /// itself (the adaptation manager before an incremental migration needs the overlay with
    /// the source disk's virtual size, created by the migration so its rollback can remove it).
    #[serde(default)]
    pub chain_only: bool,
}

/// Where a staging request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Looking up the manifest and the parts' holders.
    Resolving,
    /// Fetching missing parts from other depots.
    Fetching,
    /// Laying the chain down and creating the overlay.
    Assembling,
    /// The overlay exists and passed `qemu-img check` (with `chain_only`: the chain is laid
    /// down and checked).
    Ready,
    Failed,
    Rejected,
}

/// Status, progress and readiness of one staging request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageStatus {
    pub stage_id: String,
    pub state: StageState,
    /// Whether the planner expects the deadline to hold.
    pub accepted: bool,
    pub predicted_ready_unix_ms: Option<u64>,
    pub ready_unix_ms: Option<u64>,
    pub deadline_unix_ms: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// The disk to give libvirt (the VM's overlay), once ready.
    pub overlay: Option<PathBuf>,
    /// The backing chain, base first.
    pub chain: Vec<PathBuf>,
    pub message: String,
}

/// One named image of a depot, as `images` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    pub name: String,
    /// The manifest the name points at.
    pub manifest: Hash,
    /// Size of the disk the image presents (its top part's virtual size), bytes.
    pub virtual_size: u64,
    /// Sum of the part files' sizes from the manifest (chunks shared with other parts or
    /// images are counted in each; zero runs are counted though not stored).
    pub bytes: u64,
    /// Parts (layers) of the chain.
    pub parts: usize,
    /// Whether every part is committed in this depot's store (false while a part is missing
    /// or still being fetched).
    pub complete: bool,
    /// Why the other fields are zero: the name's manifest could not be read (it is listed all
    /// the same, so a damaged image does not vanish from the list).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// What an upload did: the image the name now points at and how much of it was new here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadReport {
    pub name: String,
    /// The new manifest (the name points at it).
    pub manifest: Hash,
    /// The manifest the name pointed at before (an upload with `replace`).
    pub replaced: Option<Hash>,
    pub bytes_received: u64,
    /// As the depot decided from the image's first bytes (never probed by qemu).
    pub format: DiskFormat,
    pub virtual_size: u64,
    /// Parts of the image: always 1 (an upload is one self-contained image).
    pub parts: usize,
    pub chunks: usize,
    /// Chunks of zeros (stored as holes).
    pub zero_chunks: usize,
    /// Chunks, and their bytes, that this store did not hold before.
    pub new_chunks: usize,
    pub new_bytes: u64,
    /// Chunks, and their bytes, that the store already held (deduplicated).
    pub dedup_chunks: usize,
    pub dedup_bytes: u64,
}
