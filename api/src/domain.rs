//! Facts about domains and their jobs that cross process boundaries: a monitor reports them,
//! the manager stores and shows them, a migration's status carries them.

use serde::{Deserialize, Serialize};

/// A domain's run state as the manager cares about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    Running,
    Paused,
    ShutOff,
    Crashed,
    Other,
}

/// Counters of one virtual disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCounters {
    pub target: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_requests: u64,
    pub write_requests: u64,
}

/// Counters of one virtual NIC (host-side tap view: `rx` is what the guest sent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicCounters {
    pub tap: String,
    pub mac: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// How the root disk travels with a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageCopy {
    /// Only the top (copy-on-write) layer; the backing chain must already be at the destination
    /// (`VIR_MIGRATE_NON_SHARED_INC`).
    Incremental,
    /// The whole disk, flattened (`VIR_MIGRATE_NON_SHARED_DISK`).
    Full,
}

/// Progress (or final figures) of a migration job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    pub time_elapsed_ms: u64,
    pub data_total: u64,
    pub data_processed: u64,
    pub data_remaining: u64,
    pub disk_total: u64,
    pub disk_processed: u64,
    pub mem_total: u64,
    pub mem_processed: u64,
    /// Only in completed-job statistics.
    pub downtime_ms: Option<u64>,
}

impl JobProgress {
    /// Fraction done in `0.0..=1.0` (data can be re-dirtied, so this can move backwards).
    pub fn fraction(&self) -> f64 {
        if self.data_total == 0 {
            return 0.0;
        }
        (self.data_processed as f64 / self.data_total as f64).clamp(0.0, 1.0)
    }
}
