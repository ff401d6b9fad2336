//! The hypervisor boundary: everything Viola does to a host's VMs goes through [`Hypervisor`].
//! [`libvirt::LibvirtHypervisor`] is the real backend (the `virt` crate); `fake::FakeCluster`
//! (feature `fake`) is an in-memory federation of hosts for logic tests.
//!
//! The trait is synchronous because libvirt calls block (a migration blocks for its whole
//! duration). Async code holds a [`Host`]: one connection to one host whose calls run on tokio's
//! blocking pool, so a slow libvirtd never stalls the runtime and each call is one line.

pub mod domain;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod libvirt;
pub mod xml;

use std::sync::Arc;

pub use domain::{Boot, DomainError, DomainSpec, PortFilter, lab_cmdline};
use serde::{Deserialize, Serialize};
pub use viola_api::domain::{DiskCounters, DomainState, JobProgress, NicCounters, StorageCopy};
pub use viola_api::migration::MigrationTuning;

/// One domain as listed on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub persistent: bool,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    pub cpu_time_ns: u64,
}

/// Usage figures of one running domain at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStats {
    pub summary: DomainSummary,
    /// Memory the balloon currently gives the guest (KiB); `None` without a balloon.
    pub balloon_current_kib: Option<u64>,
    /// Resident set of the QEMU process (KiB), when libvirt reports it.
    pub rss_kib: Option<u64>,
    pub disks: Vec<DiskCounters>,
    pub nics: Vec<NicCounters>,
}

/// A disk of a domain with its backing chain, as the migration needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Guest-visible target (`vda`).
    pub target: String,
    /// Path of the top image (the VM's own copy-on-write overlay).
    pub path: String,
    pub format: String,
    /// The image directly below the top one, if any (`(path, format)`).
    pub backing: Option<(String, String)>,
    pub read_only: bool,
}

/// A NIC of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicInfo {
    pub mac: String,
    pub bridge: Option<String>,
    pub tap: Option<String>,
}

/// CPU scheduling knobs. `None` leaves a value unchanged (when setting) or means "not
/// reported" (when reading).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTuning {
    /// Relative weight against other VMs on the host (cgroup `cpu.shares`).
    pub shares: Option<u64>,
    /// Whole-VM cap: at most `quota_us` of CPU time per `period_us` (cgroup CFS bandwidth).
    pub cap: Option<CpuCap>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuCap {
    pub period_us: u64,
    /// `-1` (libvirt's "unlimited") is represented as `None` by callers of [`CpuCap::percent`].
    pub quota_us: i64,
}

impl CpuCap {
    /// No cap: libvirt's `-1` quota (the VM's cgroup then has only its host's limits).
    pub const UNLIMITED: Self = Self {
        period_us: 100_000,
        quota_us: -1,
    };

    /// A cap of `percent` of one CPU (100 = one full CPU, 150 = one and a half) per 100 ms.
    pub fn percent(percent: u32) -> Self {
        Self {
            period_us: 100_000,
            quota_us: i64::from(percent) * 1000,
        }
    }
}

/// What to ask of one live migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRequest {
    /// libvirt URI of the destination daemon (`qemu+tls://198.18.2.11/system`).
    pub dest_uri: String,
    /// Disks to copy (targets such as `vda`).
    pub disks: Vec<String>,
    pub storage: StorageCopy,
    /// Explicit data-channel URI (`tcp://198.18.2.11`), when the destination's own idea of its
    /// address is not reachable from the source.
    pub migrate_uri: Option<String>,
    /// Bandwidth, downtime, compression and TLS (its fields sit at the top level in JSON).
    #[serde(flatten)]
    pub tuning: MigrationTuning,
}

impl MigrationRequest {
    /// A migration to `dest_uri` copying `disks` as `storage` says, uncapped, unencrypted, with
    /// QEMU's defaults otherwise.
    pub fn new(dest_uri: impl Into<String>, disks: Vec<String>, storage: StorageCopy) -> Self {
        Self {
            dest_uri: dest_uri.into(),
            disks,
            storage,
            migrate_uri: None,
            tuning: MigrationTuning::default(),
        }
    }
}

/// Host-level facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub hostname: String,
    pub cpus: u32,
    pub memory_kib: u64,
    pub free_memory_kib: u64,
}

/// Why a hypervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot connect to {uri}")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("no domain named {0:?}")]
    NoSuchDomain(String),
    #[error("domain {domain:?} already exists")]
    AlreadyExists { domain: String },
    #[error("{op} on {domain:?}: {value} is out of range (allowed {min}..={max})")]
    OutOfRange {
        op: &'static str,
        domain: String,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("{op} on {domain:?} is not possible on this host: {reason}")]
    Unsupported {
        op: &'static str,
        domain: String,
        reason: String,
    },
    #[error("{op} on {domain:?} failed")]
    Libvirt {
        op: &'static str,
        domain: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("invalid domain XML of {domain:?}: {reason}")]
    Xml { domain: String, reason: String },
    #[error("{op} on {domain:?} failed: {reason}")]
    Failed {
        op: &'static str,
        domain: String,
        reason: String,
    },
    #[error("the blocking hypervisor task died")]
    Join(#[source] tokio::task::JoinError),
}

impl HypervisorError {
    /// True when the error says the domain does not exist (useful for "already gone" cleanup).
    pub fn is_no_such_domain(&self) -> bool {
        match self {
            Self::NoSuchDomain(_) => true,
            Self::Libvirt { source, .. } => source.code() == virt::error::ErrorNumber::NoDomain,
            _ => false,
        }
    }

    /// True when the connection itself failed (cannot connect, or the daemon went away), so
    /// the caller should open a new one rather than use this one again.
    pub fn is_connection_error(&self) -> bool {
        use virt::error::{ErrorDomain, ErrorNumber};
        match self {
            Self::Connect { .. } => true,
            // The fake's unreachable host.
            Self::Failed { op, .. } => *op == "connect",
            // A dead daemon shows as transport (RPC) errors on every later call.
            Self::Libvirt { source, .. } => {
                source.domain() == ErrorDomain::Rpc
                    || matches!(
                        source.code(),
                        ErrorNumber::NoConnect | ErrorNumber::InvalidConn | ErrorNumber::Rpc
                    )
            }
            _ => false,
        }
    }
}

/// One host's hypervisor. Every call blocks; use [`blocking`] from async code.
pub trait Hypervisor: Send + Sync + 'static {
    /// The URI this backend talks to (used in logs and as the migration destination id).
    fn uri(&self) -> &str;
    fn host_info(&self) -> Result<HostInfo, HypervisorError>;
    /// All domains, running or only defined.
    fn list_domains(&self) -> Result<Vec<DomainSummary>, HypervisorError>;
    /// One domain, `Ok(None)` when it does not exist.
    fn domain(&self, name: &str) -> Result<Option<DomainSummary>, HypervisorError>;
    /// Usage of every running domain.
    fn stats(&self) -> Result<Vec<DomainStats>, HypervisorError>;
    fn domain_xml(&self, name: &str) -> Result<String, HypervisorError>;
    fn disks(&self, name: &str) -> Result<Vec<DiskInfo>, HypervisorError>;
    fn nics(&self, name: &str) -> Result<Vec<NicInfo>, HypervisorError>;
    /// Defines a persistent domain; returns its name.
    fn define(&self, xml: &str) -> Result<String, HypervisorError>;
    fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// Asks the guest to shut down (ACPI).
    fn shutdown(&self, name: &str) -> Result<(), HypervisorError>;
    /// Pulls the plug.
    fn destroy(&self, name: &str) -> Result<(), HypervisorError>;
    /// Removes the persistent definition (the domain must not run).
    fn undefine(&self, name: &str) -> Result<(), HypervisorError>;
    /// Hot-plugs or unplugs vCPUs of a running domain, within its maximum; also persisted.
    fn set_vcpus(&self, name: &str, vcpus: u32) -> Result<(), HypervisorError>;
    /// Sets the balloon target of a running domain, within its maximum; also persisted.
    fn set_memory(&self, name: &str, kib: u64) -> Result<(), HypervisorError>;
    fn cpu_tuning(&self, name: &str) -> Result<CpuTuning, HypervisorError>;
    fn set_cpu_tuning(&self, name: &str, tuning: CpuTuning) -> Result<(), HypervisorError>;
    /// Live-migrates `name` peer-to-peer to `req.dest_uri` (persisting it there and undefining
    /// it here on success). Blocks until the migration ends.
    fn migrate(&self, name: &str, req: &MigrationRequest) -> Result<(), HypervisorError>;
    /// Progress of the domain's running job; `Ok(None)` when no job runs.
    fn job_progress(&self, name: &str) -> Result<Option<JobProgress>, HypervisorError>;
    /// Statistics of the last completed job (on a migration's destination: downtime, time).
    fn completed_job(&self, name: &str) -> Result<Option<JobProgress>, HypervisorError>;
    /// Aborts the domain's running job (a migration): the domain keeps running here.
    fn abort_job(&self, name: &str) -> Result<(), HypervisorError>;
    /// Whether a file exists at `path` on this host (seen by the hypervisor).
    fn image_exists(&self, path: &str) -> Result<bool, HypervisorError>;
    /// Creates a qcow2 overlay at `path` over `backing` (format `backing_format`), with the
    /// virtual size of `capacity_bytes`.
    fn create_overlay(
        &self,
        path: &str,
        backing: &str,
        backing_format: &str,
        capacity_bytes: u64,
    ) -> Result<(), HypervisorError>;
    /// Virtual size of the image at `path`.
    fn image_capacity(&self, path: &str) -> Result<u64, HypervisorError>;
    /// Deletes the image at `path` (no error when it is already gone).
    fn delete_image(&self, path: &str) -> Result<(), HypervisorError>;
}

/// Runs a blocking hypervisor call on tokio's blocking pool (see [`Host`] for the usual way).
pub async fn blocking<H, T, F>(hv: &Arc<H>, call: F) -> Result<T, HypervisorError>
where
    H: Hypervisor + ?Sized,
    T: Send + 'static,
    F: FnOnce(&H) -> Result<T, HypervisorError> + Send + 'static,
{
    let hv = Arc::clone(hv);
    tokio::task::spawn_blocking(move || call(&hv))
        .await
        .map_err(HypervisorError::Join)?
}

/// Opens hypervisors by URI (the libvirt one opens a connection, the fake looks a host up).
pub trait Connector: Send + Sync + 'static {
    fn open(&self, uri: &str) -> Result<Arc<dyn Hypervisor>, HypervisorError>;
}

/// One host's hypervisor as async code uses it: one connection, every call run on tokio's
/// blocking pool. Cheap to clone (the connection is shared).
#[derive(Clone)]
pub struct Host {
    hv: Arc<dyn Hypervisor>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").field("uri", &self.uri()).finish()
    }
}

/// Async forms of the [`Hypervisor`] calls: string arguments are copied for the blocking pool,
/// the others passed as they are.
macro_rules! async_calls {
    ($( $(#[$doc:meta])* fn $name:ident($($s:ident: &str),* $(; $($c:ident: $cty:ty),*)?) -> $ret:ty; )*) => {
        $(
            $(#[$doc])*
            pub async fn $name(&self, $($s: &str,)* $($($c: $cty,)*)?) -> Result<$ret, HypervisorError> {
                $(let $s = $s.to_owned();)*
                self.call(move |hv| hv.$name($(&$s,)* $($($c,)*)?)).await
            }
        )*
    };
}

impl Host {
    pub fn new(hv: Arc<dyn Hypervisor>) -> Self {
        Self { hv }
    }

    /// Opens a connection to the host at `uri` (on the blocking pool: libvirt connects
    /// synchronously).
    pub async fn open(connector: &Arc<dyn Connector>, uri: &str) -> Result<Self, HypervisorError> {
        let connector = Arc::clone(connector);
        let uri = uri.to_owned();
        tokio::task::spawn_blocking(move || connector.open(&uri))
            .await
            .map_err(HypervisorError::Join)?
            .map(Self::new)
    }

    pub fn uri(&self) -> &str {
        self.hv.uri()
    }

    /// The synchronous hypervisor behind this host.
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hv
    }

    /// Runs any call on the blocking pool.
    pub async fn call<T, F>(&self, call: F) -> Result<T, HypervisorError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T, HypervisorError> + Send + 'static,
    {
        let hv = Arc::clone(&self.hv);
        tokio::task::spawn_blocking(move || call(hv.as_ref()))
            .await
            .map_err(HypervisorError::Join)?
    }

    async_calls! {
        fn host_info() -> HostInfo;
        fn list_domains() -> Vec<DomainSummary>;
        fn domain(name: &str) -> Option<DomainSummary>;
        fn stats() -> Vec<DomainStats>;
        fn domain_xml(name: &str) -> String;
        fn disks(name: &str) -> Vec<DiskInfo>;
        fn nics(name: &str) -> Vec<NicInfo>;
        fn define(xml: &str) -> String;
        fn start(name: &str) -> ();
        fn shutdown(name: &str) -> ();
        fn destroy(name: &str) -> ();
        fn undefine(name: &str) -> ();
        fn set_vcpus(name: &str; vcpus: u32) -> ();
        fn set_memory(name: &str; kib: u64) -> ();
        fn cpu_tuning(name: &str) -> CpuTuning;
        fn set_cpu_tuning(name: &str; tuning: CpuTuning) -> ();
        fn job_progress(name: &str) -> Option<JobProgress>;
        fn completed_job(name: &str) -> Option<JobProgress>;
        fn abort_job(name: &str) -> ();
        fn image_exists(path: &str) -> bool;
        fn create_overlay(path: &str, backing: &str, backing_format: &str; capacity_bytes: u64) -> ();
        fn image_capacity(path: &str) -> u64;
        fn delete_image(path: &str) -> ();
    }

    /// Live-migrates `name` as [`Hypervisor::migrate`] does; blocks (on the pool) until it ends.
    pub async fn migrate(&self, name: &str, req: MigrationRequest) -> Result<(), HypervisorError> {
        let name = name.to_owned();
        self.call(move |hv| hv.migrate(&name, &req)).await
    }
}
