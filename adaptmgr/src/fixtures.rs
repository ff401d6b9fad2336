//! Fixtures shared by this crate's unit tests.

use viola_api::adaptation::{ActionOutcome, ActionRecord, DecisionRecord, PolicyMode};

/// A decision of the viola policy in act mode, at `ts_ms`, to move vm1 from a1 to a2 in the
/// first stage (the log numbers it: `seq` 0).
pub fn decision_to_move_vm1(ts_ms: u64, reason: &str, outcome: ActionOutcome) -> DecisionRecord {
    DecisionRecord {
        seq: 0,
        ts_ms,
        policy: "viola".into(),
        mode: PolicyMode::Act,
        state: Default::default(),
        actions: vec![ActionRecord::migration(
            Some("vm1".into()),
            Some("a1".into()),
            Some("a2".into()),
            reason.into(),
            Some(0),
            outcome,
        )],
    }
}
