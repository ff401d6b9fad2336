//! What the manager's dashboard serves as JSON (`/api/v1/…` over HTTPS with a client
//! certificate): the records the CLI reads, gathered for one page and filtered by who asks
//! (an administrator sees everything; a tenant's user only its own violins and VMs, and none of
//! the hosts, decisions or other tenants' migrations), plus the history the plots draw.

use serde::{Deserialize, Serialize};

use crate::adaptation::{DecisionRecord, PolicyView};
use crate::manager::{HostView, ViolinView, VmView};
use crate::migration::MigrationStatus;

/// Everything the dashboard's page shows but the plots (`GET /api/v1/overview`, and each
/// `overview` event of `GET /api/v1/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    pub generated_ms: u64,
    pub viewer: Viewer,
    /// Sites with their hosts (administrators only; empty for a tenant).
    pub sites: Vec<SiteOverview>,
    /// Pairs of sites and what Viola saw crossing between them (administrators only).
    pub links: Vec<LinkView>,
    pub violins: Vec<ViolinView>,
    /// The VMs the viewer may see (their domain XML left out).
    pub vms: Vec<VmView>,
    pub migrations_in_flight: Vec<MigrationInFlight>,
    /// The last finished migrations, newest first.
    pub migrations_recent: Vec<MigrationDone>,
    /// The policy loop's last decisions, newest first (administrators only).
    pub decisions: Vec<DecisionRecord>,
    /// The policy in force (administrators only).
    pub policy: Option<PolicyView>,
}

/// Who the page is for, as the client certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Viewer {
    /// The certificate's identity (`viola://ROLE/SITE/HOST`).
    pub identity: String,
    /// `None`: an administrator.
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteOverview {
    pub name: String,
    pub hosts: Vec<HostView>,
}

/// The WAN link between two sites as Viola observed it: the migrations that crossed it and the
/// goodput of the last one (the manager does not probe links itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    pub a: String,
    pub b: String,
    pub migrations: u32,
    /// Bytes over time of the last finished migration across it, Mbit/s.
    pub last_goodput_mbit_s: Option<f64>,
    pub last_ms: Option<u64>,
}

/// A migration that runs now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInFlight {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub started_ms: u64,
    /// Its latest progress (step, job figures, staging).
    pub status: MigrationStatus,
}

/// A finished migration, from the manager's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationDone {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub started_ms: u64,
    pub finished_ms: u64,
    /// `migrated`, `rolled_back` or `stuck`.
    pub outcome: String,
    /// Why it rolled back or is stuck.
    pub reason: Option<String>,
    pub downtime_ms: Option<u64>,
    pub bytes: Option<u64>,
    /// The policy decision that ordered it (its `seq`), if one did.
    pub decision: Option<u64>,
}

/// Series of the history the plots draw (`GET /api/v1/history?series=PREFIX&range=hour|day`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    /// `hour`: every sample of the last hour; `day`: one-minute means over the last 24 hours.
    pub range: String,
    pub series: Vec<Series>,
    /// Where each VM the viewer may see ran over the range (oldest first).
    pub placements: Vec<Placement>,
    /// Migrations of those VMs finished per hour over the last 24 hours: `[hour start (unix
    /// ms), count]`, oldest first, hours without one included.
    pub migrations_per_hour: Vec<(u64, u32)>,
}

/// One plotted quantity. Names: `host/H/cpu` (CPUs busy), `host/H/cpu_capacity`,
/// `host/H/mem_used_mib`, `host/H/net/IFACE/rx_mbit_s` and `…/tx_mbit_s` (violin bridges
/// `vioN` and the underlay), `vm/V/cpu` (vCPUs busy), `vm/V/mem_mib`, `fed/migrations`
/// (migrations finished per minute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    /// `[unix ms, value]`, oldest first.
    pub points: Vec<(u64, f64)>,
}

/// From `since_ms` on, `vm` ran at `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub vm: String,
    pub host: String,
    pub since_ms: u64,
}
