//! A migration as the API shows it: what was asked ([`MigrationPlan`]), its progress while it
//! runs ([`MigrationStatus`]) and its account when it ends ([`MigrationReport`]). The manager
//! journals the plan; its step machine lives in `viola-adaptmgr`.

use serde::{Deserialize, Serialize};

use crate::domain::{JobProgress, StorageCopy};

/// What a migration is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPlan {
    pub vm: String,
    pub source_uri: String,
    pub dest_uri: String,
    /// The destination as the *source's* libvirtd reaches it for the peer-to-peer migration
    /// (often the same as `dest_uri`; differs when the manager reaches hosts another way).
    pub dest_migration_uri: String,
    /// Whether to stage a missing base image at the destination (then copy only the overlay),
    /// or fall back to a full-disk copy.
    pub stage_base: bool,
    pub timeout_ms: u64,
    /// How the migration stream runs (its fields sit at the plan's top level in JSON).
    #[serde(flatten)]
    pub tuning: MigrationTuning,
}

/// How a live migration's stream runs: what the manager plans and passes on to the source's
/// libvirtd as it is. The default is QEMU's: uncapped, uncompressed, in the clear.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrationTuning {
    /// Bandwidth cap for RAM and disk mirror, MiB/s.
    pub bandwidth_mib_s: Option<u64>,
    /// Longest pause allowed at switchover, ms (QEMU's downtime limit; its default is 300).
    pub max_downtime_ms: Option<u64>,
    /// Compress RAM pages on the wire (zstd level 1 on two multifd channels): a WAN link is
    /// slower than the compression threads, and guest RAM is mostly compressible.
    pub compress: bool,
    /// Encrypt and authenticate the migration stream (RAM, device state and the disk copy)
    /// with QEMU's TLS (`VIR_MIGRATE_TLS`), with the hosts' certificates from the federation CA.
    /// The destination's URI should then be `qemu+tls://…`, so the libvirtds' own connection is
    /// TLS too. Off in plans journaled before it existed.
    pub tls: bool,
    /// The name the destination's libvirt certificate must carry, when the host of the URI the
    /// source reaches it by is not one of its names (libvirt's `tls.destination`); only with
    /// `tls`.
    pub tls_destination: Option<String>,
}

/// How it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Runs at the destination only.
    Migrated { storage: StorageCopy },
    /// Still (or again) runs at the source only; the destination was cleaned up.
    RolledBack { reason: String },
    /// Needs an operator: the state is not one the machine can safely repair.
    Stuck { reason: String },
}

/// One line of the migration's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub action: String,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub result: String,
}

/// Published while a migration runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub step: String,
    pub job: Option<JobProgress>,
    /// While the base is being staged.
    pub staging: Option<StagingProgress>,
}

/// The full account of one migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub plan: MigrationPlan,
    pub outcome: Outcome,
    pub storage: StorageCopy,
    pub records: Vec<StepRecord>,
    /// Destination's completed-job statistics (downtime, elapsed time, bytes) on success.
    pub completed: Option<JobProgress>,
}

/// Progress of a staging, as the migration's status shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagingProgress {
    /// Who stages: `depot b` or `direct copy`.
    pub by: String,
    /// The depot's state (`resolving`, `fetching`, `assembling`, `ready`, ...).
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub deadline_unix_ms: u64,
    pub predicted_ready_unix_ms: Option<u64>,
    /// Whether the depot's planner expects the deadline to hold.
    pub accepted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::{ViolinCreate, VmCreate};

    /// What older peers and journals write lacks the optional fields: absent, an `Option` is
    /// `None` and the stream's tuning is the default.
    #[test]
    fn absent_optional_fields_read_as_none() {
        let plan: MigrationPlan = serde_json::from_str(
            r#"{"vm":"v","source_uri":"s","dest_uri":"d","dest_migration_uri":"d",
                "stage_base":true,"timeout_ms":5}"#,
        )
        .unwrap();
        assert_eq!(plan.tuning, MigrationTuning::default());
        let plan: MigrationPlan = serde_json::from_str(
            r#"{"vm":"v","source_uri":"s","dest_uri":"d","dest_migration_uri":"d",
                "stage_base":true,"timeout_ms":5,"tls":true,"max_downtime_ms":9}"#,
        )
        .unwrap();
        let tuning = MigrationTuning {
            tls: true,
            max_downtime_ms: Some(9),
            ..MigrationTuning::default()
        };
        assert_eq!(plan.tuning, tuning);
        let vm: VmCreate =
            serde_json::from_str(r#"{"name":"n","violin":"v","image":"i"}"#).unwrap();
        assert_eq!((vm.host, vm.count, vm.ssh_key), (None, None, None));
        assert!(serde_json::from_str::<VmCreate>(r#"{"name":"n","violin":"v"}"#).is_err());
        let violin: ViolinCreate = serde_json::from_str(r#"{"name":"n"}"#).unwrap();
        assert_eq!((violin.subnet, violin.mtu), (None, None));
        let status: MigrationStatus = serde_json::from_str(r#"{"step":"s","job":null}"#).unwrap();
        assert_eq!(status.staging, None);
    }
}
