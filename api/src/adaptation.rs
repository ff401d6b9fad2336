//! The adaptation manager's policy loop as the API shows it: the decision log and the policy in
//! force. The manager persists [`DecisionRecord`]s; `viola decisions` and `viola policy show`
//! read them.

use serde::{Deserialize, Serialize};

/// What the policy loop does with a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// No loop runs.
    Off,
    /// Decide and record; change nothing.
    #[default]
    Advise,
    /// Decide, record and carry the actions out.
    Act,
}

impl std::fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Advise => "advise",
            Self::Act => "act",
        })
    }
}

/// The policy, mode and parameters in force (`viola policy show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyView {
    pub policy: String,
    pub mode: PolicyMode,
    pub period_s: f64,
    /// Every other parameter, as the manager's `[policy]` table has them (with defaults).
    pub parameters: serde_json::Value,
}

/// The state a decision was made on, in brief.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateBrief {
    pub hosts: usize,
    pub hosts_up: usize,
    pub vms: usize,
    /// VMs the policy could not choose (moving, or in a cool-down after a move).
    pub vms_held: usize,
    /// Hosts whose CPU demand reached their capacity.
    pub hosts_overloaded: usize,
    /// Mean CPU demand / capacity over the hosts that are up.
    pub mean_demand: f64,
}

/// How one action ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ActionOutcome {
    /// Advise mode: recorded, not carried out.
    Advised,
    /// Act mode: ordered, not finished yet.
    Pending,
    /// Carried out; a migration says how long it took and how long the VM was paused.
    Done {
        #[serde(skip_serializing_if = "Option::is_none")]
        moved: Option<MoveFigures>,
    },
    /// The migration was refused or failed and the VM stays where it was.
    RolledBack {
        reason: String,
    },
    /// The migration stopped half way and needs an operator.
    Stuck {
        reason: String,
    },
    Failed {
        error: String,
    },
    /// Not carried out, for the reason given (e.g. the planner found no safe order, the
    /// destination is avoided after a failure, or the action is not supported live).
    Skipped {
        reason: String,
    },
}

impl ActionOutcome {
    /// Carried out, with nothing more to say (a resize).
    pub const DONE: Self = Self::Done { moved: None };

    /// A short label for metrics and tables.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Advised => "advised",
            Self::Pending => "pending",
            Self::Done { .. } => "done",
            Self::RolledBack { .. } => "rolled_back",
            Self::Stuck { .. } => "stuck",
            Self::Failed { .. } => "failed",
            Self::Skipped { .. } => "skipped",
        }
    }
}

/// What a finished migration cost: the destination's completed-job statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveFigures {
    pub time_ms: u64,
    /// How long the VM was paused (libvirt's downtime), when libvirt reported it.
    pub downtime_ms: Option<u64>,
    pub bytes: u64,
}

/// One action of a decision, by names (indices mean nothing outside the state they came from).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionRecord {
    /// `migrate`, `resize`, `suspend`, `resume`, `power_on`, `power_off`.
    pub action: String,
    pub vm: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// What the action sets (a resize's cap and memory), if anything.
    pub detail: Option<String>,
    /// The policy's reason.
    pub reason: String,
    /// Planner stage (act and advise alike; moves of one stage run in parallel).
    pub stage: Option<usize>,
    pub outcome: ActionOutcome,
}

impl ActionRecord {
    /// A move of `vm` from `from` to `to` (no detail: a move sets nothing else).
    pub fn migration(
        vm: Option<String>,
        from: Option<String>,
        to: Option<String>,
        reason: String,
        stage: Option<usize>,
        outcome: ActionOutcome,
    ) -> Self {
        Self {
            action: "migrate".into(),
            vm,
            from,
            to,
            detail: None,
            reason,
            stage,
            outcome,
        }
    }
}

/// One decision of the policy loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub seq: u64,
    pub ts_ms: u64,
    pub policy: String,
    pub mode: PolicyMode,
    pub state: StateBrief,
    pub actions: Vec<ActionRecord>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_done_outcome_reads_back_with_and_without_its_figures() {
        // What decision logs written before the figures existed hold.
        let old: ActionOutcome = serde_json::from_str(r#"{"outcome":"done"}"#).unwrap();
        assert_eq!(old, ActionOutcome::DONE);
        assert_eq!(
            serde_json::to_string(&ActionOutcome::DONE).unwrap(),
            r#"{"outcome":"done"}"#
        );
        let moved = ActionOutcome::Done {
            moved: Some(MoveFigures {
                time_ms: 7210,
                downtime_ms: Some(278),
                bytes: 128_086_830,
            }),
        };
        let text = serde_json::to_string(&moved).unwrap();
        assert_eq!(
            text,
            r#"{"outcome":"done","moved":{"time_ms":7210,"downtime_ms":278,"bytes":128086830}}"#
        );
        assert_eq!(serde_json::from_str::<ActionOutcome>(&text).unwrap(), moved);
        assert_eq!(moved.label(), "done");
    }
}
