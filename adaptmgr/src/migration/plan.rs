//! The cross-domain migration as a pure step machine: the driver asks [`MigrationMachine::next`]
//! what to do, does it, and reports with [`MigrationMachine::complete`]; time is passed in.
//!
//! Invariant: whatever fails, the machine ends with the VM running at exactly one place. Before
//! the move, that place is the source; rollback only removes destination state the machine
//! itself created, and only after [`Rollback::Reconcile`] has seen the source copy running. If
//! reconciliation finds the VM only at the destination (a peer-to-peer migration finished
//! although the client saw an error), the migration is reported as done, not rolled back.

use serde::{Deserialize, Serialize};

pub use viola_api::migration::{MigrationPlan, MigrationTuning, Outcome, StepRecord};
use viola_hypervisor::StorageCopy;

/// Forward steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Source VM running, destination reachable with room, no name clash, disk layout known,
    /// whether the base is already at the destination.
    PreCheck,
    /// Put the base image at the destination, verified.
    StageBase,
    /// Create the VM's copy-on-write overlay at the destination, same path, same backing.
    PrecreateOverlay,
    /// Tell the overlay daemons to expect the VM's MACs at the destination.
    AnnounceMove,
    /// `migrate_to_uri3` (with progress, bandwidth cap, timeout that aborts, cancellation).
    Migrate,
    /// Exactly one copy runs, at the destination.
    Verify,
    /// Delete the source's now unused overlay.
    CleanupSource,
}

/// Steps that undo, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rollback {
    /// Find out where the VM runs now.
    Reconcile,
    /// Destroy and undefine a destination domain (an incoming QEMU left behind).
    RemoveDestinationDomain,
    /// Delete the overlay the machine created at the destination.
    RemoveDestinationOverlay,
    /// Tell the overlay daemons the VM stays at the source.
    WithdrawAnnouncement,
}

/// Where the VM was found by [`Rollback::Reconcile`] or [`Step::Verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Copies {
    SourceOnly,
    DestinationOnly,
    /// Running at the source; a (paused or defined) leftover at the destination.
    SourceAndLeftover,
    /// Running at both: must never be "resolved" by destroying blindly.
    BothRunning,
    Neither,
}

/// What the driver learned from a step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    Done,
    PreChecked {
        /// The disk has a backing image (else only a full copy is possible).
        has_backing: bool,
        base_at_destination: bool,
    },
    Found(Copies),
    /// How each missing base got to the destination (depot or direct copy, and why).
    Staged {
        how: Vec<String>,
    },
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Run(Step),
    Undo(Rollback),
    Finished(Outcome),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Forward(Step),
    Undo(Rollback),
    Done(Outcome),
}

/// The migration's state. Serializable so that a manager can journal it after every step and,
/// restarted, finish or roll back what it had started ([`resume_after_restart`]).
///
/// [`resume_after_restart`]: MigrationMachine::resume_after_restart
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationMachine {
    plan: MigrationPlan,
    phase: Phase,
    started_ms: Option<u64>,
    storage: StorageCopy,
    has_backing: bool,
    base_at_destination: bool,
    overlay_created: bool,
    announced: bool,
    migrate_started: bool,
    cancel_requested: bool,
    failure: Option<String>,
    records: Vec<StepRecord>,
}

impl MigrationMachine {
    pub fn new(plan: MigrationPlan) -> Self {
        Self {
            plan,
            phase: Phase::Forward(Step::PreCheck),
            started_ms: None,
            storage: StorageCopy::Full,
            has_backing: false,
            base_at_destination: false,
            overlay_created: false,
            announced: false,
            migrate_started: false,
            cancel_requested: false,
            failure: None,
            records: Vec::new(),
        }
    }

    pub fn plan(&self) -> &MigrationPlan {
        &self.plan
    }

    /// The storage mode chosen after the pre-check.
    pub fn storage(&self) -> StorageCopy {
        self.storage
    }

    pub fn records(&self) -> &[StepRecord] {
        &self.records
    }

    /// Whether the machine has reached its outcome.
    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }

    /// Continues a journaled machine after the manager that drove it stopped in the middle of
    /// an action, whose result is therefore unknown. Every step is assumed to have had its
    /// effect (the undo steps are idempotent). Once the move may have begun, where the VM runs
    /// decides ([`Rollback::Reconcile`]): only at the destination means the migration is
    /// finished; at the source means it is rolled back. Before that, it is rolled back.
    pub fn resume_after_restart(&mut self, now_ms: u64) {
        if !self.record_current(now_ms, "interrupted: the manager stopped".to_owned()) {
            return;
        }
        self.phase = match self.phase.clone() {
            Phase::Forward(step) => {
                match step {
                    Step::PrecreateOverlay => self.overlay_created = true,
                    Step::AnnounceMove => self.announced = true,
                    Step::Migrate => self.migrate_started = true,
                    _ => {}
                }
                match step {
                    // The VM already runs at the destination only; the source file may remain.
                    Step::CleanupSource => Phase::Forward(Step::CleanupSource),
                    _ => {
                        self.failure = Some(format!("{step:?}: interrupted by a manager restart"));
                        self.first_undo()
                    }
                }
            }
            // Undo steps are idempotent: do the interrupted one again.
            Phase::Undo(r) => Phase::Undo(r),
            Phase::Done(o) => Phase::Done(o),
        };
    }

    /// What to do now; `now_ms` marks the start of that action in the log.
    pub fn next(&mut self, now_ms: u64) -> Action {
        self.started_ms = Some(now_ms);
        match &self.phase {
            Phase::Forward(step) => {
                if *step == Step::Migrate {
                    self.migrate_started = true;
                }
                Action::Run(*step)
            }
            Phase::Undo(r) => Action::Undo(*r),
            Phase::Done(o) => Action::Finished(o.clone()),
        }
    }

    /// Asks the machine to stop: before the migration starts it rolls back after the current
    /// step; during the migration the driver aborts the job (the step then fails).
    pub fn cancel(&mut self) {
        self.cancel_requested = true;
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel_requested
    }

    /// Reports how the action returned by the last [`next`](Self::next) went.
    pub fn complete(&mut self, now_ms: u64, result: Result<Report, String>) {
        let outcome = match &result {
            Ok(r) => format!("ok {r:?}"),
            Err(e) => format!("failed: {e}"),
        };
        if !self.record_current(now_ms, outcome) {
            return;
        }
        self.phase = match (self.phase.clone(), result) {
            (Phase::Forward(step), Ok(report)) => self.after_step(step, report),
            (Phase::Forward(step), Err(reason)) => {
                self.failure = Some(format!("{step:?}: {reason}"));
                if step == Step::Verify {
                    // The migration call succeeded but the copies are not as expected: look
                    // again and decide from what is really there.
                    Phase::Undo(Rollback::Reconcile)
                } else if step == Step::CleanupSource {
                    // The VM runs at the destination; a stale source file is only waste.
                    Phase::Done(Outcome::Migrated {
                        storage: self.storage,
                    })
                } else {
                    self.first_undo()
                }
            }
            (Phase::Undo(r), result) => self.after_undo(r, result),
            (Phase::Done(o), _) => Phase::Done(o),
        };
    }

    /// Logs the current action as ended at `now_ms` with `result`; false once finished.
    fn record_current(&mut self, now_ms: u64, result: String) -> bool {
        let started = self.started_ms.take().unwrap_or(now_ms);
        let action = match &self.phase {
            Phase::Forward(s) => format!("{s:?}"),
            Phase::Undo(r) => format!("undo {r:?}"),
            Phase::Done(_) => return false,
        };
        self.records.push(StepRecord {
            action,
            started_ms: started,
            finished_ms: now_ms,
            result,
        });
        true
    }

    fn first_undo(&self) -> Phase {
        if self.migrate_started {
            Phase::Undo(Rollback::Reconcile)
        } else {
            self.undo_after(None)
        }
    }

    /// The next undo step after `done` that has something to undo.
    fn undo_after(&self, done: Option<Rollback>) -> Phase {
        const ORDER: [Rollback; 3] = [
            Rollback::RemoveDestinationDomain,
            Rollback::RemoveDestinationOverlay,
            Rollback::WithdrawAnnouncement,
        ];
        let from = done
            .and_then(|d| ORDER.iter().position(|r| *r == d))
            .map_or(0, |i| i + 1);
        for r in &ORDER[from..] {
            let needed = match r {
                Rollback::RemoveDestinationDomain => self.migrate_started,
                // With a full copy libvirt creates the destination image itself; the pre-check
                // made sure nothing was at that path before, so whatever is there is ours.
                Rollback::RemoveDestinationOverlay => {
                    self.overlay_created
                        || (self.migrate_started && self.storage == StorageCopy::Full)
                }
                Rollback::WithdrawAnnouncement => self.announced,
                Rollback::Reconcile => false,
            };
            if needed {
                return Phase::Undo(*r);
            }
        }
        Phase::Done(Outcome::RolledBack {
            reason: self
                .failure
                .clone()
                .unwrap_or_else(|| "cancelled".to_owned()),
        })
    }

    fn after_step(&mut self, step: Step, report: Report) -> Phase {
        if let (
            Step::PreCheck,
            Report::PreChecked {
                has_backing,
                base_at_destination,
            },
        ) = (step, &report)
        {
            self.has_backing = *has_backing;
            self.base_at_destination = *base_at_destination;
            self.storage = if *has_backing && (*base_at_destination || self.plan.stage_base) {
                StorageCopy::Incremental
            } else {
                StorageCopy::Full
            };
        }
        match step {
            Step::PrecreateOverlay => self.overlay_created = true,
            Step::AnnounceMove => self.announced = true,
            Step::Verify => {
                return match report {
                    Report::Found(Copies::DestinationOnly) => Phase::Forward(Step::CleanupSource),
                    other => {
                        self.failure = Some(format!("verify found {other:?}"));
                        Phase::Undo(Rollback::Reconcile)
                    }
                };
            }
            _ => {}
        }
        if self.cancel_requested && !matches!(step, Step::Migrate | Step::CleanupSource) {
            self.failure = Some("cancelled".to_owned());
            return self.first_undo();
        }
        match step {
            Step::PreCheck => {
                if self.storage == StorageCopy::Incremental && !self.base_at_destination {
                    Phase::Forward(Step::StageBase)
                } else if self.storage == StorageCopy::Incremental {
                    Phase::Forward(Step::PrecreateOverlay)
                } else {
                    Phase::Forward(Step::AnnounceMove)
                }
            }
            Step::StageBase => Phase::Forward(Step::PrecreateOverlay),
            Step::PrecreateOverlay => Phase::Forward(Step::AnnounceMove),
            Step::AnnounceMove => Phase::Forward(Step::Migrate),
            Step::Migrate => Phase::Forward(Step::Verify),
            Step::Verify => Phase::Forward(Step::CleanupSource),
            Step::CleanupSource => Phase::Done(Outcome::Migrated {
                storage: self.storage,
            }),
        }
    }

    fn after_undo(&mut self, r: Rollback, result: Result<Report, String>) -> Phase {
        match (r, result) {
            (Rollback::Reconcile, Ok(Report::Found(copies))) => match copies {
                Copies::DestinationOnly => {
                    // The move happened after all; nothing to undo at the destination.
                    Phase::Forward(Step::CleanupSource)
                }
                Copies::SourceOnly | Copies::SourceAndLeftover => self.undo_after(None),
                Copies::BothRunning => Phase::Done(Outcome::Stuck {
                    reason: "the VM runs at both source and destination".into(),
                }),
                Copies::Neither => Phase::Done(Outcome::Stuck {
                    reason: "the VM runs nowhere".into(),
                }),
            },
            (Rollback::Reconcile, Ok(other)) => Phase::Done(Outcome::Stuck {
                reason: format!("reconcile reported {other:?}"),
            }),
            (Rollback::Reconcile, Err(e)) => Phase::Done(Outcome::Stuck {
                reason: format!("cannot tell where the VM runs: {e}"),
            }),
            (r, Ok(_)) => self.undo_after(Some(r)),
            (r, Err(e)) => Phase::Done(Outcome::Stuck {
                reason: format!(
                    "{}; cleanup {r:?} failed: {e}",
                    self.failure.clone().unwrap_or_default()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(stage_base: bool) -> MigrationPlan {
        MigrationPlan {
            stage_base,
            ..crate::migration::testing::vm1_plan("a", "b", 60_000)
        }
    }

    /// Drives the machine with scripted results; returns actions seen and the outcome.
    fn run(
        m: &mut MigrationMachine,
        mut respond: impl FnMut(&Action) -> Result<Report, String>,
    ) -> (Vec<Action>, Outcome) {
        let mut seen = Vec::new();
        for t in 0..100 {
            let a = m.next(t * 10);
            if let Action::Finished(o) = a {
                return (seen, o);
            }
            let r = respond(&a);
            seen.push(a);
            m.complete(t * 10 + 5, r);
        }
        panic!("machine did not finish");
    }

    fn ok_path(a: &Action, base_there: bool) -> Result<Report, String> {
        match a {
            Action::Run(Step::PreCheck) => Ok(Report::PreChecked {
                has_backing: true,
                base_at_destination: base_there,
            }),
            Action::Run(Step::Verify) => Ok(Report::Found(Copies::DestinationOnly)),
            _ => Ok(Report::Done),
        }
    }

    #[test]
    fn happy_path_stages_base_then_copies_only_the_overlay() {
        let mut m = MigrationMachine::new(plan(true));
        let (seen, outcome) = run(&mut m, |a| ok_path(a, false));
        assert_eq!(
            seen,
            [
                Step::PreCheck,
                Step::StageBase,
                Step::PrecreateOverlay,
                Step::AnnounceMove,
                Step::Migrate,
                Step::Verify,
                Step::CleanupSource
            ]
            .map(Action::Run)
        );
        assert_eq!(
            outcome,
            Outcome::Migrated {
                storage: StorageCopy::Incremental
            }
        );
        assert_eq!(m.records().len(), 7);
        assert!(m.records().iter().all(|r| r.finished_ms >= r.started_ms));
    }

    #[test]
    fn base_already_there_skips_staging() {
        let mut m = MigrationMachine::new(plan(true));
        let (seen, _) = run(&mut m, |a| ok_path(a, true));
        assert!(!seen.contains(&Action::Run(Step::StageBase)));
        assert!(seen.contains(&Action::Run(Step::PrecreateOverlay)));
    }

    #[test]
    fn no_staging_and_no_base_means_full_copy_without_overlay() {
        let mut m = MigrationMachine::new(plan(false));
        let (seen, outcome) = run(&mut m, |a| ok_path(a, false));
        assert!(!seen.contains(&Action::Run(Step::PrecreateOverlay)));
        assert_eq!(
            outcome,
            Outcome::Migrated {
                storage: StorageCopy::Full
            }
        );
    }

    #[test]
    fn failed_migration_reconciles_then_removes_only_what_it_made() {
        let mut m = MigrationMachine::new(plan(true));
        let (seen, outcome) = run(&mut m, |a| match a {
            Action::Run(Step::Migrate) => Err("Lost connection to destination host".into()),
            Action::Undo(Rollback::Reconcile) => Ok(Report::Found(Copies::SourceAndLeftover)),
            other => ok_path(other, true),
        });
        let undo: Vec<_> = seen
            .iter()
            .filter(|a| matches!(a, Action::Undo(_)))
            .cloned()
            .collect();
        assert_eq!(
            undo,
            [
                Rollback::Reconcile,
                Rollback::RemoveDestinationDomain,
                Rollback::RemoveDestinationOverlay,
                Rollback::WithdrawAnnouncement
            ]
            .map(Action::Undo)
        );
        match outcome {
            Outcome::RolledBack { reason } => {
                assert!(reason.contains("Lost connection"), "{reason}")
            }
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn failure_before_migrate_never_touches_destination_domain() {
        let mut m = MigrationMachine::new(plan(true));
        let (seen, outcome) = run(&mut m, |a| match a {
            Action::Run(Step::AnnounceMove) => Err("overlay control unreachable".into()),
            other => ok_path(other, true),
        });
        assert!(!seen.contains(&Action::Undo(Rollback::RemoveDestinationDomain)));
        assert!(!seen.contains(&Action::Undo(Rollback::WithdrawAnnouncement)));
        assert!(seen.contains(&Action::Undo(Rollback::RemoveDestinationOverlay)));
        assert!(matches!(outcome, Outcome::RolledBack { .. }));
    }

    #[test]
    fn precheck_failure_undoes_nothing() {
        let mut m = MigrationMachine::new(plan(true));
        let (seen, outcome) = run(&mut m, |_| Err("destination has no room".into()));
        assert_eq!(seen, vec![Action::Run(Step::PreCheck)]);
        assert!(matches!(outcome, Outcome::RolledBack { .. }));
    }

    /// Runs a migration whose `step` answers `answer` and whose reconciliation then finds
    /// `found`; checks that the destination's domain was left alone and returns the outcome.
    fn reconciled(step: Step, answer: Result<Report, String>, found: Copies) -> Outcome {
        let mut m = MigrationMachine::new(plan(true));
        let (seen, outcome) = run(&mut m, |a| match a {
            Action::Run(s) if *s == step => answer.clone(),
            Action::Undo(Rollback::Reconcile) => Ok(Report::Found(found)),
            other => ok_path(other, true),
        });
        assert!(!seen.contains(&Action::Undo(Rollback::RemoveDestinationDomain)));
        outcome
    }

    #[test]
    fn client_error_but_vm_at_destination_counts_as_migrated() {
        let outcome = reconciled(
            Step::Migrate,
            Err("client connection reset".into()),
            Copies::DestinationOnly,
        );
        assert!(matches!(outcome, Outcome::Migrated { .. }));
    }

    #[test]
    fn both_running_is_stuck_not_destroyed() {
        let both = Copies::BothRunning;
        let outcome = reconciled(Step::Verify, Ok(Report::Found(both)), both);
        assert!(matches!(outcome, Outcome::Stuck { .. }));
    }

    #[test]
    fn cancel_before_migrate_rolls_back_after_current_step() {
        let mut m = MigrationMachine::new(plan(true));
        let mut cancelled = false;
        let mut steps = Vec::new();
        let mut t = 0;
        let outcome = loop {
            t += 1;
            match m.next(t) {
                Action::Finished(o) => break o,
                a => {
                    if a == Action::Run(Step::PrecreateOverlay) && !cancelled {
                        m.cancel();
                        cancelled = true;
                    }
                    steps.push(a.clone());
                    m.complete(t, ok_path(&a, true));
                }
            }
        };
        assert!(!steps.contains(&Action::Run(Step::Migrate)));
        assert!(steps.contains(&Action::Undo(Rollback::RemoveDestinationOverlay)));
        assert!(matches!(outcome, Outcome::RolledBack { reason } if reason == "cancelled"));
    }

    /// A machine driven along the happy path until it has started `step` (and not finished it).
    fn started_until(step: Step) -> MigrationMachine {
        let mut m = MigrationMachine::new(plan(false));
        let mut t = 0;
        loop {
            let a = m.next(t);
            if a == Action::Run(step) {
                return m;
            }
            m.complete(t + 1, ok_path(&a, true));
            t += 10;
        }
    }

    #[test]
    fn restart_before_the_move_rolls_back_what_may_have_been_made() {
        // The manager dies while creating the overlay.
        let m = started_until(Step::PrecreateOverlay);
        let mut m: MigrationMachine =
            serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        m.resume_after_restart(100);
        let (seen, outcome) = run(&mut m, |_| Ok(Report::Done));
        assert_eq!(seen, vec![Action::Undo(Rollback::RemoveDestinationOverlay)]);
        assert!(matches!(outcome, Outcome::RolledBack { .. }), "{outcome:?}");
    }

    #[test]
    fn restart_during_cleanup_finishes_the_migration() {
        let mut m = started_until(Step::CleanupSource);
        m.resume_after_restart(100);
        let (seen, outcome) = run(&mut m, |_| Ok(Report::Done));
        assert_eq!(seen, vec![Action::Run(Step::CleanupSource)]);
        assert!(matches!(outcome, Outcome::Migrated { .. }), "{outcome:?}");
    }
}
