//! Orchestrated cross-domain live migration with the root disk.
//!
//! [`plan`] is the pure step machine (pre-check, stage base, pre-create overlay, announce,
//! migrate, verify, clean up; or reconcile and roll back); [`driver`] performs its steps
//! against the hypervisors; [`stage`] holds what the steps need from outside (base staging,
//! the overlay's move announcements); [`depot_stage`] stages bases through the depots;
//! `testing` (tests and feature `test-support`) holds the fakes their tests share.

pub mod depot_stage;
pub mod driver;
pub mod plan;
pub mod stage;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use depot_stage::{DepotStager, QuicDepotLink};
pub use driver::{
    MigrationDeps, MigrationReport, MigrationRun, MigrationSnapshot, MigrationStatus, StepError,
    StepFailure, resume_migration, run_journaled, run_migration, run_migration_detailed,
};
pub use plan::{MigrationPlan, MigrationTuning, Outcome};
pub use stage::{BaseStager, LocalCopyStager, MoveAnnouncer, MoveNotice};
