//! Fakes shared by the migration's tests, here and in the lab tests (feature `test-support`):
//! an announcer that records what it is told, a stager for the fake cluster, a connector that
//! counts connections, and the check every rolled back migration must pass.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::driver::{MigrationReport, MigrationRun, StepFailure};
use super::plan::{MigrationPlan, MigrationTuning, Outcome};
use super::stage::{AnnounceError, BaseStager, MoveAnnouncer, MoveNotice, StageError, StagedBase};
use viola_hypervisor::fake::FakeCluster;
use viola_hypervisor::{Connector, DomainState, Hypervisor, HypervisorError, StorageCopy};

/// A migration of vm1 from `source` to `dest` (each reached at that URI) with its base
/// staged, in `timeout_ms`, tuned as QEMU's defaults.
pub fn vm1_plan(source: &str, dest: &str, timeout_ms: u64) -> MigrationPlan {
    MigrationPlan {
        vm: "vm1".into(),
        source_uri: source.into(),
        dest_uri: dest.into(),
        dest_migration_uri: dest.into(),
        stage_base: true,
        timeout_ms,
        tuning: MigrationTuning::default(),
    }
}

/// Records every announcement as `expect VM [MACS]` or `withdraw VM`. Clones share the record.
#[derive(Debug, Clone, Default)]
pub struct RecordingAnnouncer(Arc<Mutex<Vec<String>>>);

impl RecordingAnnouncer {
    /// What it was told, in order.
    pub fn notes(&self) -> Vec<String> {
        self.record().clone()
    }

    pub fn clear(&self) {
        self.record().clear();
    }

    fn record(&self) -> MutexGuard<'_, Vec<String>> {
        // A test that panicked while noting leaves whole lines: keep reading them.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MoveAnnouncer for RecordingAnnouncer {
    async fn expect_move(&self, n: &MoveNotice) -> Result<(), AnnounceError> {
        self.record().push(format!("expect {} {:?}", n.vm, n.macs));
        Ok(())
    }

    async fn withdraw_move(&self, n: &MoveNotice) -> Result<(), AnnounceError> {
        self.record().push(format!("withdraw {}", n.vm));
        Ok(())
    }
}

/// Stages a base by putting it into the fake destination host.
#[derive(Debug, Clone)]
pub struct FakeStager(pub FakeCluster);

impl BaseStager for FakeStager {
    async fn stage(&self, base: &str, _: &str, dest: &str) -> Result<StagedBase, StageError> {
        self.0.add_image(dest, base, 1 << 30, None);
        Ok(StagedBase {
            blake3: "fake".into(),
            bytes: 1 << 30,
            copied: true,
        })
    }
}

/// Counts the connections opened through the connector it wraps.
pub struct CountingConnector {
    inner: Arc<dyn Connector>,
    opened: AtomicUsize,
}

impl CountingConnector {
    pub fn new(inner: Arc<dyn Connector>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            opened: AtomicUsize::new(0),
        })
    }

    /// Connections opened so far (failed attempts included).
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }
}

impl Connector for CountingConnector {
    fn open(&self, uri: &str) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.inner.open(uri)
    }
}

/// Asserts that the migration moved the VM copying only its overlay (its base was at the
/// destination already, or staged there).
#[track_caller]
pub fn assert_migrated_incrementally(report: &MigrationReport) {
    assert_eq!(
        report.outcome,
        Outcome::Migrated {
            storage: StorageCopy::Incremental
        },
        "{:#?}",
        report.records
    );
}

/// What the migration's `StageBase` step recorded as its result.
#[track_caller]
pub fn stage_base_result(report: &MigrationReport) -> &str {
    &report
        .records
        .iter()
        .find(|r| r.action == "StageBase")
        .expect("StageBase recorded")
        .result
}

/// Asserts what a rolled back migration must leave: outcome `RolledBack`, a first failed step
/// that `expected` accepts, the VM running at `source` and nothing of it (domain, disk overlay)
/// at `dest`, and every announcement of the move withdrawn.
#[track_caller]
pub fn assert_rolled_back_clean(
    run: &MigrationRun,
    source: &dyn Hypervisor,
    dest: &dyn Hypervisor,
    announcer: &RecordingAnnouncer,
    expected: impl FnOnce(&StepFailure) -> bool,
) {
    let report = &run.report;
    let vm = report.plan.vm.as_str();
    assert!(
        matches!(report.outcome, Outcome::RolledBack { .. }),
        "{:?}\n{:#?}",
        report.outcome,
        report.records
    );
    let failure = run.first_failure.as_ref().expect("a failed step");
    assert!(
        expected(failure),
        "unexpected failure of {:?}: {}",
        failure.action,
        viola_common::errors::chain(&failure.error)
    );
    let at_source = source.domain(vm).expect("ask the source");
    assert_eq!(
        at_source.map(|d| d.state),
        Some(DomainState::Running),
        "{vm} must run at the source"
    );
    assert_eq!(
        dest.domain(vm).expect("ask the destination"),
        None,
        "domain left at the destination"
    );
    for disk in source.disks(vm).expect("the VM's disks") {
        if !disk.read_only {
            assert!(
                !dest.image_exists(&disk.path).expect("ask the destination"),
                "{} left at the destination",
                disk.path
            );
        }
    }
    let notes = announcer.notes();
    let expect = format!("expect {vm} ");
    if let Some(i) = notes.iter().rposition(|n| n.starts_with(&expect)) {
        assert!(
            notes[i..].contains(&format!("withdraw {vm}")),
            "announcement not withdrawn: {notes:?}"
        );
    }
}
