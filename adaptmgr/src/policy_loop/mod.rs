//! The manager's policy loop: every control period, build the [`ObservedState`] from the
//! inventory ([`crate::observe`]), ask the configured policy, order its moves with
//! [`planning`](crate::policy::planning), record the decision, and in `act` mode carry it out
//! through [`Manager::resize`] and [`Manager::migrate`], the calls the CLI makes.
//!
//! The decision itself ([`LoopCore::plan`]) is pure: time is passed in, the inventory's records
//! are read before it. The async driver ([`PolicyLoop::run`]) only ticks, records and executes.
//! What the loop remembers between periods ([`LoopMemory`]: when each VM last moved, which
//! destinations failed) is rebuilt from the decision log at start, so a restart does not forget
//! a cool-down or a failed destination.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::inventory::{Inventory, InventoryError};
use crate::manager::{Manager, ManagerError, now_ms};
use crate::migration::Outcome;
use crate::observe::observed_state;
use crate::policy::planning::{self, MoveKind, PlanInput};
use crate::policy::{self, ActionKind, ObservedState, Policy};
pub mod config;

pub use config::{PolicyConfig, PolicyConfigError, PolicyMode, ViolaParams};
use viola_api::adaptation::{ActionOutcome, ActionRecord, DecisionRecord, MoveFigures, StateBrief};
use viola_api::manager::{VmMigrate, VmResize};

/// Prometheus metrics of the policy loop.
#[derive(Default)]
pub struct PolicyMetrics {
    /// Decisions by policy (empty ones included).
    pub decisions: Family<Vec<(String, String)>, Counter>,
    /// Actions by policy, action and final outcome.
    pub actions: Family<Vec<(String, String)>, Counter>,
    /// Milliseconds the last period's state building, decision and planning took.
    pub tick_ms: Gauge,
    /// Milliseconds from the last carried-out decision to its first action's call into the
    /// manager (whose first step is to open the host's hypervisor): recording the decision
    /// and ordering the steps.
    pub decision_to_action_ms: Gauge,
}

impl PolicyMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "viola_adaptmgr_policy_decisions",
            "Policy decisions by policy",
            self.decisions.clone(),
        );
        registry.register(
            "viola_adaptmgr_policy_actions",
            "Policy actions by policy, action and outcome",
            self.actions.clone(),
        );
        registry.register(
            "viola_adaptmgr_policy_tick_ms",
            "Time the last control period took to build the state, decide and plan",
            self.tick_ms.clone(),
        );
        registry.register(
            "viola_adaptmgr_policy_decision_to_action_ms",
            "Time from the last carried-out decision to its first action's call into the manager",
            self.decision_to_action_ms.clone(),
        );
    }

    fn count(&self, policy: &str, action: &ActionRecord) {
        if action.outcome == ActionOutcome::Pending {
            return;
        }
        self.actions
            .get_or_create(&vec![
                ("policy".to_owned(), policy.to_owned()),
                ("action".to_owned(), action.action.clone()),
                ("outcome".to_owned(), action.outcome.label().to_owned()),
            ])
            .inc();
    }
}

/// What the loop remembers between periods: when each VM last moved and until when each
/// destination is avoided after a failed move (both by name, in ms since the epoch).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopMemory {
    moved_at_ms: HashMap<String, u64>,
    avoid_until_ms: HashMap<String, u64>,
}

impl LoopMemory {
    /// Rebuilt from the decision log (oldest first).
    pub fn from_log(decisions: &[DecisionRecord], cfg: &PolicyConfig) -> Self {
        let mut m = Self::default();
        for d in decisions {
            for a in &d.actions {
                m.note(a, d.ts_ms, cfg);
            }
        }
        m
    }

    /// Takes an ended action into account.
    pub fn note(&mut self, action: &ActionRecord, ts_ms: u64, cfg: &PolicyConfig) {
        if action.action != "migrate" {
            return;
        }
        match &action.outcome {
            ActionOutcome::Done { .. } => {
                if let Some(vm) = &action.vm {
                    self.moved_at_ms.insert(vm.clone(), ts_ms);
                }
            }
            ActionOutcome::RolledBack { .. }
            | ActionOutcome::Stuck { .. }
            | ActionOutcome::Failed { .. } => {
                if let Some(to) = &action.to {
                    let until = ts_ms + (cfg.avoid_failed_s * 1000.0) as u64;
                    self.avoid_until_ms.insert(to.clone(), until);
                }
            }
            _ => {}
        }
    }

    fn cooling_down(&self, now_ms: u64, cfg: &PolicyConfig) -> impl Iterator<Item = &String> {
        let cooldown_ms = (cfg.cooldown_s * 1000.0) as u64;
        self.moved_at_ms
            .iter()
            .filter(move |(_, at)| now_ms < at.saturating_add(cooldown_ms))
            .map(|(vm, _)| vm)
    }

    fn avoided_until(&self, host: &str, now_ms: u64) -> Option<u64> {
        self.avoid_until_ms
            .get(host)
            .copied()
            .filter(|&until| now_ms < until)
    }
}

/// One thing to carry out in `act` mode; `action` indexes the decision record's actions.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Resize {
        action: usize,
        req: VmResize,
    },
    Migrate {
        action: usize,
        stage: usize,
        req: VmMigrate,
    },
}

/// A period's decision, recorded form and ordered steps.
#[derive(Debug, Clone, PartialEq)]
pub struct TickPlan {
    /// `seq` is 0 until the inventory records it.
    pub record: DecisionRecord,
    /// Resizes first, then the migrations stage by stage.
    pub steps: Vec<Step>,
}

/// The policy with its configuration and memory: everything a period's decision needs.
pub struct LoopCore {
    pub cfg: PolicyConfig,
    policy: Box<dyn Policy>,
    pub memory: LoopMemory,
}

impl LoopCore {
    pub fn new(cfg: PolicyConfig) -> Result<Self, PolicyConfigError> {
        Ok(Self {
            policy: cfg.build()?,
            cfg,
            memory: LoopMemory::default(),
        })
    }

    /// With a policy of the caller's (tests, tools); `cfg.name` is then only a label.
    pub fn with_policy(cfg: PolicyConfig, policy: Box<dyn Policy>) -> Self {
        Self {
            cfg,
            policy,
            memory: LoopMemory::default(),
        }
    }

    /// The whole period's work before anything is done: read the inventory, build the state
    /// (`moving`: VMs whose migration runs now), decide and plan.
    pub fn plan_from_inventory(
        &mut self,
        inventory: &Inventory,
        moving: &BTreeSet<String>,
        now_ms: u64,
    ) -> Result<TickPlan, InventoryError> {
        let hosts = inventory.hosts()?;
        let vms = inventory.vms()?;
        let violins = inventory.violins()?;
        let samples = inventory.sample_histories()?;
        let mut held = moving.clone();
        held.extend(self.memory.cooling_down(now_ms, &self.cfg).cloned());
        let state = observed_state(
            &hosts,
            &vms,
            &violins,
            &samples,
            &held,
            now_ms,
            &self.cfg.observe_params(),
        );
        Ok(self.plan(&state, now_ms))
    }

    /// Decides on `state` and orders the actions (pure: `now_ms` is the state's time).
    pub fn plan(&mut self, state: &ObservedState, now_ms: u64) -> TickPlan {
        let decision = self.policy.decide(state);
        let act = self.cfg.mode == PolicyMode::Act;
        let ready = if act {
            ActionOutcome::Pending
        } else {
            ActionOutcome::Advised
        };
        let host_name = |h: usize| state.hosts.get(h).map(|x| x.name.clone());
        let vm_name = |v: usize| state.vms.get(v).map(|x| x.name.clone());
        let mut actions = Vec::new();
        let mut resizes = Vec::new();
        // (action index, vm, from, to) of the migrations that may go ahead.
        let mut moves: Vec<(usize, usize, usize, usize)> = Vec::new();
        for a in decision.actions {
            let index = actions.len();
            let skip = |reason: String| ActionOutcome::Skipped { reason };
            let record = match a.kind {
                ActionKind::Migrate { vm, from, to } => {
                    let outcome = match (state.vms.get(vm), state.hosts.get(to)) {
                        (None, _) | (_, None) => skip("no such VM or host in the state".into()),
                        (Some(v), _) if v.in_migration => {
                            skip("the VM is moving or in its cool-down after a move".into())
                        }
                        (Some(v), _) if v.host != Some(from) => {
                            skip("the VM is not on the source host".into())
                        }
                        (_, Some(h)) if !h.powered_on => skip("the destination is not up".into()),
                        (_, Some(h)) if self.memory.avoided_until(&h.name, now_ms).is_some() => {
                            skip(format!(
                                "a move to {} failed recently: avoided for {} s",
                                h.name, self.cfg.avoid_failed_s
                            ))
                        }
                        _ if moves.iter().any(|m| m.1 == vm) => {
                            skip("the VM is already moved by this decision".into())
                        }
                        _ => {
                            moves.push((index, vm, from, to));
                            ready.clone()
                        }
                    };
                    ActionRecord::migration(
                        vm_name(vm),
                        host_name(from),
                        host_name(to),
                        a.reason,
                        None,
                        outcome,
                    )
                }
                ActionKind::Resize {
                    vm,
                    cpu_mips,
                    ram_mb,
                } => {
                    let cap_percent =
                        cpu_mips.map(|m| (m / self.cfg.pe_mips * 100.0).round() as u32);
                    let memory_mib = ram_mb.map(|m| m.round() as u64);
                    // What changes; the rest stays as it is.
                    let detail = [
                        cap_percent.map(|c| format!("cap {c} %")),
                        memory_mib.map(|m| format!("memory {m} MiB")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(", ");
                    let outcome = match state.vms.get(vm) {
                        Some(v) if v.in_migration => {
                            skip("the VM is moving or in its cool-down after a move".into())
                        }
                        Some(v) if cap_percent.is_some() || memory_mib.is_some() => {
                            resizes.push(Step::Resize {
                                action: index,
                                req: VmResize {
                                    vm: v.name.clone(),
                                    vcpus: None,
                                    memory_mib,
                                    cap_percent,
                                    shares: None,
                                },
                            });
                            ready.clone()
                        }
                        Some(_) => skip("nothing to change".into()),
                        None => skip("no such VM in the state".into()),
                    };
                    ActionRecord {
                        action: "resize".into(),
                        vm: vm_name(vm),
                        from: None,
                        to: None,
                        detail: Some(detail),
                        reason: a.reason,
                        stage: None,
                        outcome,
                    }
                }
                ActionKind::Suspend { vm } => unsupported("suspend", vm_name(vm), None, a.reason),
                ActionKind::Resume { vm, host } => {
                    unsupported("resume", vm_name(vm), host_name(host), a.reason)
                }
                ActionKind::PowerOn { host } => {
                    unsupported("power_on", None, host_name(host), a.reason)
                }
                ActionKind::PowerOff { host } => {
                    unsupported("power_off", None, host_name(host), a.reason)
                }
            };
            actions.push(record);
        }
        let migrations = self.order_moves(state, &moves, &mut actions, ready);
        let record = DecisionRecord {
            seq: 0,
            ts_ms: now_ms,
            policy: self.policy.name(),
            mode: self.cfg.mode,
            state: brief(state),
            actions,
        };
        let mut steps = resizes;
        steps.extend(migrations);
        TickPlan { record, steps }
    }

    /// Orders the accepted migrations with the planner (memory is the capacity that must never
    /// be exceeded; a moving VM counts at both ends) and returns them stage by stage. Moves the
    /// planner cannot order safely are skipped; temporary moves it adds are appended as actions.
    fn order_moves(
        &self,
        state: &ObservedState,
        moves: &[(usize, usize, usize, usize)],
        actions: &mut Vec<ActionRecord>,
        ready: ActionOutcome,
    ) -> Vec<Step> {
        if moves.is_empty() {
            return Vec::new();
        }
        let moving: BTreeSet<usize> = moves.iter().map(|m| m.1).collect();
        // Only the moving VMs are planned; what stays takes its memory off its host's capacity.
        let capacity: Vec<f64> = state
            .hosts
            .iter()
            .map(|h| {
                let staying: f64 = h
                    .vms
                    .iter()
                    .filter(|v| !moving.contains(v))
                    .map(|&v| state.vms[v].ram_reserved_mb)
                    .sum();
                h.ram_mb - staying
            })
            .collect();
        let input = PlanInput {
            capacity,
            size: moves
                .iter()
                .map(|m| state.vms[m.1].ram_reserved_mb)
                .collect(),
            current: moves.iter().map(|m| Some(m.2)).collect(),
            target: moves.iter().map(|m| Some(m.3)).collect(),
            max_parallel: self.cfg.max_parallel.max(1),
        };
        let skip_all = |actions: &mut Vec<ActionRecord>, reason: String| {
            for m in moves {
                actions[m.0].outcome = ActionOutcome::Skipped {
                    reason: reason.clone(),
                };
            }
        };
        let plan = match planning::plan(&input) {
            Ok(p) if p.stop_and_copy() > 0 => {
                skip_all(
                    actions,
                    "no order without a stop-and-copy move, which the live manager does not make"
                        .into(),
                );
                return Vec::new();
            }
            Ok(p) => p,
            Err(e) => {
                skip_all(actions, format!("no capacity-safe order of the moves: {e}"));
                return Vec::new();
            }
        };
        let mut steps = Vec::new();
        for (stage, stage_moves) in plan.stages.iter().enumerate() {
            for mv in stage_moves {
                let (original, vm, _, _) = moves[mv.vm];
                let (Some(from), Some(to)) = (mv.from, mv.to) else {
                    continue; // stop-and-copy halves were refused above
                };
                let index = if mv.kind == MoveKind::Temporary {
                    actions.push(ActionRecord::migration(
                        Some(state.vms[vm].name.clone()),
                        Some(state.hosts[from].name.clone()),
                        Some(state.hosts[to].name.clone()),
                        format!(
                            "temporary placement to break a cycle of moves (then on to {})",
                            actions[original].to.clone().unwrap_or_default()
                        ),
                        Some(stage),
                        ready.clone(),
                    ));
                    actions.len() - 1
                } else {
                    actions[original].stage = Some(stage);
                    original
                };
                steps.push(Step::Migrate {
                    action: index,
                    stage,
                    req: VmMigrate {
                        vm: state.vms[vm].name.clone(),
                        to_host: state.hosts[to].name.clone(),
                        bandwidth_mib_s: None,
                        // As the CLI does by default: the base goes through the destination
                        // site's depot (or is found there) and only the overlay is copied.
                        stage_base: true,
                        timeout_s: None,
                    },
                });
            }
        }
        steps
    }
}

/// An action the live manager records but does not carry out.
fn unsupported(
    action: &str,
    vm: Option<String>,
    to: Option<String>,
    reason: String,
) -> ActionRecord {
    ActionRecord {
        action: action.into(),
        vm,
        from: None,
        to,
        detail: None,
        reason,
        stage: None,
        outcome: ActionOutcome::Skipped {
            reason: "not carried out by the live manager yet".into(),
        },
    }
}

/// The state in brief, for the decision log.
pub fn brief(state: &ObservedState) -> StateBrief {
    let up: Vec<_> = state.hosts.iter().filter(|h| h.powered_on).collect();
    let demand =
        |h: &policy::HostObs| -> f64 { h.vms.iter().map(|&v| state.vms[v].requested_mips).sum() };
    StateBrief {
        hosts: state.hosts.len(),
        hosts_up: up.len(),
        vms: state.vms.len(),
        vms_held: state.vms.iter().filter(|v| v.in_migration).count(),
        hosts_overloaded: state
            .hosts
            .iter()
            .filter(|h| h.total_mips() > 0.0 && demand(h) >= h.total_mips())
            .count(),
        mean_demand: if up.is_empty() {
            0.0
        } else {
            up.iter()
                .map(|h| demand(h) / h.total_mips().max(f64::MIN_POSITIVE))
                .sum::<f64>()
                / up.len() as f64
        },
    }
}

/// Why a period's work failed.
#[derive(Debug, thiserror::Error)]
pub enum TickError {
    #[error("inventory")]
    Inventory(#[from] InventoryError),
    #[error("the planning task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// The supervised loop: a [`LoopCore`] and the manager it acts through.
pub struct PolicyLoop {
    core: Arc<Mutex<LoopCore>>,
    metrics: Arc<PolicyMetrics>,
}

impl PolicyLoop {
    /// Builds the loop and recovers its memory from the inventory's decision log.
    pub fn new(
        cfg: PolicyConfig,
        inventory: &Inventory,
        metrics: Arc<PolicyMetrics>,
    ) -> Result<Self, PolicyLoopError> {
        let mut core = LoopCore::new(cfg)?;
        let log = inventory.decisions_after(0, usize::MAX)?;
        core.memory = LoopMemory::from_log(&log, &core.cfg);
        Ok(Self {
            core: Arc::new(Mutex::new(core)),
            metrics,
        })
    }

    fn core(&self) -> std::sync::MutexGuard<'_, LoopCore> {
        // Nothing is left half-updated under this lock: a panic in `decide` loses that period.
        self.core.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a period every `period_s` until `token` is cancelled (an `off` loop returns at
    /// once). A migration under way when `token` is cancelled is cancelled (and rolled back).
    pub async fn run(self, manager: Arc<Manager>, token: CancellationToken) {
        let (mode, period_s) = {
            let core = self.core();
            (core.cfg.mode, core.cfg.period_s)
        };
        if mode == PolicyMode::Off {
            return;
        }
        let period = Duration::from_secs_f64(period_s);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = token.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = self.tick(&manager, now_ms(), &token).await {
                        tracing::warn!(error = %viola_common::errors::chain(&e), "policy period failed");
                    }
                }
            }
        }
    }

    /// One period at `now_ms`: decide, record and (in `act` mode) carry out. Returns the
    /// decision as recorded at the end, or `None` when the policy had nothing to do.
    pub async fn tick(
        &self,
        manager: &Manager,
        now_ms: u64,
        token: &CancellationToken,
    ) -> Result<Option<DecisionRecord>, TickError> {
        let started = std::time::Instant::now();
        let moving = manager.migrating_vms();
        let core = Arc::clone(&self.core);
        let inventory = Arc::clone(&manager.inventory);
        // Reading 10,000 records and deciding takes milliseconds: off the async threads.
        let plan = tokio::task::spawn_blocking(move || {
            core.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .plan_from_inventory(&inventory, &moving, now_ms)
        })
        .await
        .map_err(TickError::Join)??;
        let decided = std::time::Instant::now();
        self.metrics
            .tick_ms
            .set(started.elapsed().as_millis() as i64);
        let policy = plan.record.policy.clone();
        self.metrics
            .decisions
            .get_or_create(&vec![("policy".to_owned(), policy.clone())])
            .inc();
        if plan.record.actions.is_empty() {
            return Ok(None);
        }
        let mut record = plan.record;
        record.seq = manager.inventory.record_decision(&record)?;
        for a in &record.actions {
            self.metrics.count(&policy, a);
            tracing::info!(seq = record.seq, action = %a.action, vm = ?a.vm, from = ?a.from, to = ?a.to,
                outcome = a.outcome.label(), reason = %a.reason, "policy decision");
        }
        if record.mode == PolicyMode::Act {
            self.execute(manager, &mut record, plan.steps, decided, token)
                .await?;
        }
        Ok(Some(record))
    }

    async fn execute(
        &self,
        manager: &Manager,
        record: &mut DecisionRecord,
        steps: Vec<Step>,
        decided: std::time::Instant,
        token: &CancellationToken,
    ) -> Result<(), TickError> {
        let mut first_action = Some(decided);
        let mut acting = || {
            if let Some(at) = first_action.take() {
                self.metrics
                    .decision_to_action_ms
                    .set(at.elapsed().as_millis() as i64);
            }
        };
        let mut stages: BTreeMap<usize, Vec<(usize, VmMigrate)>> = BTreeMap::new();
        for step in steps {
            match step {
                Step::Resize { action, req } => {
                    acting();
                    let outcome = match manager.resize(req).await {
                        Ok(()) => ActionOutcome::DONE,
                        Err(e) => ActionOutcome::Failed {
                            error: viola_common::errors::chain(&e),
                        },
                    };
                    self.settle(manager, record, action, outcome)?;
                }
                Step::Migrate { action, stage, req } => {
                    stages.entry(stage).or_default().push((action, req));
                }
            }
        }
        let mut halted: Option<&str> = None;
        for (_, stage) in stages {
            if token.is_cancelled() {
                halted = Some("the manager is shutting down");
            }
            if let Some(reason) = halted {
                for (action, _) in stage {
                    let outcome = ActionOutcome::Skipped {
                        reason: reason.to_owned(),
                    };
                    self.settle(manager, record, action, outcome)?;
                }
                continue;
            }
            // A stage's moves run side by side (at most `max_parallel`, by the planner); no
            // task is spawned, so none outlives a cancelled loop.
            acting();
            let runs = stage.into_iter().map(|(action, req)| async move {
                // Nobody watches a policy migration's progress frames.
                let (progress, _unwatched) = mpsc::channel(1);
                let result = manager.migrate(req, progress, token.child_token()).await;
                (action, migration_outcome(&result))
            });
            for (action, outcome) in futures::future::join_all(runs).await {
                if !matches!(outcome, ActionOutcome::Done { .. }) {
                    // Later stages counted on the room this move would have made.
                    halted = Some("an earlier move of this decision did not happen");
                }
                self.settle(manager, record, action, outcome)?;
            }
        }
        Ok(())
    }

    /// Records how an action ended: decision log, memory, metrics.
    fn settle(
        &self,
        manager: &Manager,
        record: &mut DecisionRecord,
        action: usize,
        outcome: ActionOutcome,
    ) -> Result<(), TickError> {
        manager
            .inventory
            .set_action_outcome(record.seq, action, outcome.clone())?;
        let a = &mut record.actions[action];
        a.outcome = outcome;
        {
            let mut core = self.core();
            let cfg = core.cfg.clone();
            // Cool-downs and avoidance count from the decision: a move takes seconds, they
            // last minutes, and the decision's time is what a restarted loop reads back.
            core.memory.note(a, record.ts_ms, &cfg);
        }
        self.metrics.count(&record.policy, a);
        tracing::info!(seq = record.seq, action = %a.action, vm = ?a.vm, to = ?a.to,
            outcome = ?a.outcome, "policy action ended");
        Ok(())
    }
}

/// How a migration ended, as the decision log says it (the policy loop's and the guests').
pub(crate) fn migration_outcome(
    result: &Result<crate::migration::MigrationReport, ManagerError>,
) -> ActionOutcome {
    match result {
        Ok(report) => match &report.outcome {
            Outcome::Migrated { .. } => ActionOutcome::Done {
                moved: report.completed.as_ref().map(|c| MoveFigures {
                    time_ms: c.time_elapsed_ms,
                    downtime_ms: c.downtime_ms,
                    bytes: c.data_processed,
                }),
            },
            Outcome::RolledBack { reason } => ActionOutcome::RolledBack {
                reason: reason.clone(),
            },
            Outcome::Stuck { reason } => ActionOutcome::Stuck {
                reason: reason.clone(),
            },
        },
        Err(e) => ActionOutcome::Failed {
            error: viola_common::errors::chain(e),
        },
    }
}

/// Why the policy loop cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoopError {
    #[error("policy configuration")]
    Config(#[from] PolicyConfigError),
    #[error("cannot read the decision log")]
    Inventory(#[from] InventoryError),
}

#[cfg(test)]
mod tests;
