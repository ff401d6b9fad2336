//! Messages on the manager's endpoint (ALPN `viola-adaptmgr/1`). One request per
//! bidirectional stream; the manager answers with one or more [`Response`] frames (a migration
//! streams `Progress` frames, then `Migrated`). Monitors may only send `Report`; the CLI
//! (role `cli`) and other managers may send the rest.

use serde::{Deserialize, Serialize};

use crate::adaptation::{DecisionRecord, PolicyView};
use crate::domain::{DiskCounters, DomainState, NicCounters};
use crate::migration::{MigrationReport, MigrationStatus};

/// What a monitor pushes every interval (also its heartbeat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    pub site: String,
    /// Increases by one per report; the manager ignores reports older than the last seen.
    pub seq: u64,
    pub sent_ms: u64,
    pub usage: HostUsage,
    pub vms: Vec<VmUsage>,
    pub probes: Vec<ProbeResult>,
}

/// Host figures from /proc.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostUsage {
    pub cpus: u32,
    /// CPUs' worth of busy time over the last interval (0..=cpus).
    pub cpu_busy: f64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub net: Vec<NetUsage>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NetUsage {
    pub iface: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_bps: f64,
    pub tx_bps: f64,
}

/// One VM's figures from libvirt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmUsage {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub cpu_time_ns: u64,
    /// vCPUs' worth of busy time over the last interval (1.0 = one vCPU fully busy).
    pub cpu_busy: f64,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    pub balloon_kib: Option<u64>,
    pub rss_kib: Option<u64>,
    pub disks: Vec<DiskCounters>,
    pub nics: Vec<NicCounters>,
}

/// A service-level probe (an HTTP GET against a service inside a VM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub name: String,
    pub url: String,
    pub ok: bool,
    pub latency_ms: Option<f64>,
    pub error: Option<String>,
}

/// Change a VM's size; `None` fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmResize {
    pub vm: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// Cap in percent of one CPU (100 = one CPU).
    pub cap_percent: Option<u32>,
    pub shares: Option<u64>,
}

/// Move a VM to another host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMigrate {
    pub vm: String,
    pub to_host: String,
    pub bandwidth_mib_s: Option<u64>,
    /// Stage the base at the destination (incremental copy) rather than copy the whole disk.
    pub stage_base: bool,
    pub timeout_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Report(HostReport),
    ListHosts,
    ListVms,
    Resize(VmResize),
    Migrate(VmMigrate),
    /// Cancel a running migration of this VM.
    CancelMigration {
        vm: String,
    },
    /// Decisions of the policy loop with a sequence number above `after_seq`, oldest first, at
    /// most `limit` of them.
    Decisions {
        after_seq: u64,
        limit: u32,
    },
    /// The policy, mode and parameters in force.
    PolicyShow,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ack,
    Hosts(Vec<HostView>),
    Vms(Vec<VmView>),
    Progress(MigrationStatus),
    Migrated(Box<MigrationReport>),
    Decisions(Vec<DecisionRecord>),
    Policy(Box<PolicyView>),
    Error { message: String },
}

/// Liveness as the manager's failure detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Never reported yet.
    Unknown,
    Up,
    /// Declared failed (no heartbeat for the configured time) at `since_ms`.
    Failed {
        since_ms: u64,
    },
}

/// A host as `ListHosts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub site: String,
    pub cpus: u32,
    pub memory_kib: u64,
    pub state: HostState,
    pub last_heartbeat_ms: Option<u64>,
    /// The monitor's last report of the host's usage.
    pub usage: Option<HostUsage>,
}

/// A VM as `ListVms` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    /// Where it runs (or last ran).
    pub host: String,
    pub violin: Option<String>,
    pub macs: Vec<String>,
    pub state: DomainState,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    /// vCPUs' worth of CPU use in the last report.
    pub cpu_busy: f64,
    /// The persistent definition the manager keeps to re-instantiate the VM elsewhere if its
    /// host fails (`None` until it has fetched it).
    pub domain_xml: Option<String>,
    pub updated_ms: u64,
}
