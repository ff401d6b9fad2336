//! The manager's view of the federation: sites, hosts (with capacities and liveness), VMs and
//! violins, plus an append-only event log (migrations, failures, restarts), persisted so a
//! restarted manager resumes where it stopped.
//!
//! Beside the latest figures, the inventory keeps per host and per VM a bounded history of the
//! monitor's CPU samples ([`SAMPLES_KEPT`], newest first), each host's last service-probe
//! results, and the policy loop's decision log, so a restarted manager's policy sees the same
//! history and `viola decisions` the same log.
//!
//! Store: one storage trait ([`Backend`]: ordered tables of bytes, atomic batches); by default
//! `redb` (an embedded, crash-safe B-tree with ACID transactions). Each record is a
//! JSON value under its name (sample series excepted: 16-byte binary records, read in bulk), so the file stays inspectable with `viola` itself and the schema
//! can grow fields (`#[serde(default)]`) without a migration. We chose it over a hand-rolled
//! JSON snapshot + journal because atomic multi-record updates (a report touches a host and
//! many VMs; a migration moves a VM and logs an event) and torn-write safety come for free,
//! while a journal would need its own framing, fsync discipline and compaction.

pub mod backend;
pub mod etcd_backend;
mod redb_backend;
mod store;

pub use backend::Backend;
pub use redb_backend::RedbBackend;
pub use store::{Inventory, InventoryError};

use serde::{Deserialize, Serialize};

use viola_api::domain::DomainState;
pub use viola_api::manager::HostState;
use viola_api::manager::{HostUsage, HostView, VmView};

/// Monitor samples kept per host and per VM: 30 control periods (the policies'
/// `HISTORY_LENGTH`) of one minute at one report every 5 s, with room to spare.
pub const SAMPLES_KEPT: usize = 400;

/// One monitor sample of a host's or a VM's CPU use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When the manager received it.
    pub ts_ms: u64,
    /// CPUs' (for a VM: vCPUs') worth of busy time over the monitor's interval.
    pub cpu_busy: f64,
}

/// Whose samples: keys of the sample table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKey<'a> {
    Host(&'a str),
    Vm(&'a str),
}

impl SampleKey<'_> {
    fn encode(self) -> String {
        match self {
            Self::Host(n) => format!("host/{n}"),
            Self::Vm(n) => format!("vm/{n}"),
        }
    }
}

/// Every host's and VM's samples, newest first, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleHistories {
    pub hosts: std::collections::HashMap<String, Vec<Sample>>,
    pub vms: std::collections::HashMap<String, Vec<Sample>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub name: String,
}

/// A host as the inventory stores it (what the API shows is [`HostView`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub site: String,
    /// How the manager reaches the host's libvirtd.
    pub libvirt_uri: String,
    /// How another host's libvirtd reaches this one (peer-to-peer migration destination).
    pub migration_uri: String,
    pub cpus: u32,
    pub memory_kib: u64,
    pub state: HostState,
    pub last_heartbeat_ms: Option<u64>,
    #[serde(default)]
    pub last_report_seq: u64,
    pub usage: Option<HostUsage>,
}

/// A VM as the inventory stores it (what the API shows is [`VmView`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    /// Where it runs (or last ran).
    pub host: String,
    pub violin: Option<String>,
    #[serde(default)]
    pub macs: Vec<String>,
    pub state: DomainState,
    pub vcpus: u32,
    pub max_vcpus: u32,
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    /// vCPUs' worth of CPU use in the last report.
    #[serde(default)]
    pub cpu_busy: f64,
    /// Persistent domain XML, kept to re-instantiate the VM elsewhere if its host fails.
    pub domain_xml: Option<String>,
    /// The CPU cap the manager last set (percent of one CPU); `None`: none set through Viola.
    pub cap_percent: Option<u32>,
    /// A job deadline set with `viola vm deadline`, and the job's progress reports.
    pub deadline: Option<crate::deadlines::JobDeadline>,
    pub updated_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolinRecord {
    pub name: String,
    /// 24-bit virtual network id.
    pub vni: u32,
    pub vms: Vec<String>,
    /// Its IPv4 subnet (`10.1.0.0/24`), for a violin made through the API.
    pub subnet: Option<String>,
    /// The sites whose hosts carry it (a violin made through the API).
    #[serde(default)]
    pub sites: Vec<String>,
    /// Made through the API (the manager owns it and pushes it to the overlays) rather than
    /// listed in the configuration.
    #[serde(default)]
    pub managed: bool,
    /// The addresses handed out to its VMs (never reused while the VM exists).
    #[serde(default)]
    pub members: Vec<MemberRecord>,
    /// The tenant that made it (and owns its VMs); `None`: an administrator's.
    pub tenant: Option<String>,
    /// Its own MTU (`viola violin create --mtu`).
    pub mtu: Option<u16>,
}

/// A VM's place in a violin made through the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub vm: String,
    pub mac: String,
    pub ip: std::net::Ipv4Addr,
    /// The host it was created on (its overlay home until it moves).
    pub host: String,
    /// The depot image it runs from.
    pub image: String,
    /// Its size as made (what its tenant's quotas count).
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
}

/// A create or delete in progress, journaled before the first action so that a manager that
/// stops in the middle can undo (create) or finish (delete) it at its next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOp {
    pub kind: PendingKind,
    pub vm: String,
    pub violin: String,
    pub host: String,
    /// The VM's disk as its host's libvirtd sees it.
    pub disk: String,
    /// The depot staging that lays the disk down (a create, once the depot answered): a
    /// manager that undoes the create after a restart waits for it to end first, so the
    /// depot does not write the disk after the undo removed it.
    pub stage: Option<PendingStage>,
}

/// A staging request a depot accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingStage {
    pub site: String,
    pub stage_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingKind {
    Create,
    Delete,
}

/// One line of the manager's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub ts_ms: u64,
    /// `host_failed`, `host_recovered`, `vm_restarted`, `vm_restart_skipped`,
    /// `vm_restart_failed`, `migration`, ...
    pub kind: String,
    pub subject: String,
    pub detail: serde_json::Value,
}

impl HostRecord {
    /// The host as the API shows it.
    pub fn view(&self) -> HostView {
        HostView {
            name: self.name.clone(),
            site: self.site.clone(),
            cpus: self.cpus,
            memory_kib: self.memory_kib,
            state: self.state,
            last_heartbeat_ms: self.last_heartbeat_ms,
            usage: self.usage.clone(),
        }
    }
}

impl VmRecord {
    /// The VM as the API shows it.
    pub fn view(&self) -> VmView {
        VmView {
            name: self.name.clone(),
            host: self.host.clone(),
            violin: self.violin.clone(),
            macs: self.macs.clone(),
            ip: None,
            state: self.state,
            vcpus: self.vcpus,
            max_vcpus: self.max_vcpus,
            memory_kib: self.memory_kib,
            max_memory_kib: self.max_memory_kib,
            cpu_busy: self.cpu_busy,
            domain_xml: self.domain_xml.clone(),
            updated_ms: self.updated_ms,
        }
    }
}
