//! The async driver of [`MigrationMachine`]: performs each step against the hypervisors, the
//! stager and the announcer, with progress, a timeout that aborts and cancellation.
//!
//! A migration holds three connections, opened on first use and kept for all its steps: one to
//! each end, and a second one to the source that polls progress and aborts while the first is
//! busy in the blocking migrate call. A connection that fails as a connection is dropped and the
//! next call opens a new one (a destination libvirtd may restart mid-migration).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use viola_api::migration::{MigrationReport, MigrationStatus};

use super::plan::{Action, Copies, MigrationMachine, MigrationPlan, Report, Rollback, Step};
use super::stage::{
    AnnounceError, BaseStager, MoveAnnouncer, MoveNotice, StageError, StageJob, StagingProgress,
};
use viola_common::errors::chain;
use viola_hypervisor::{
    Connector, DiskInfo, DomainState, Host, HypervisorError, JobProgress, MigrationRequest,
};

/// What the driver needs besides the plan.
pub struct MigrationDeps<S, A> {
    pub connector: Arc<dyn Connector>,
    pub stager: S,
    pub announcer: A,
    /// How often progress is polled during the move.
    pub poll_interval: Duration,
    /// How long cleanup keeps trying to reach a destination that went away.
    pub reconnect_timeout: Duration,
}

/// Why a migration step failed. The journal keeps it as text (the whole chain);
/// [`run_migration_detailed`] hands it out typed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("{op} at {uri} failed")]
    Hypervisor {
        op: &'static str,
        uri: String,
        #[source]
        source: HypervisorError,
    },
    #[error("source and destination are the same host")]
    SameHost,
    #[error("{vm} is not defined at the source")]
    NotAtSource { vm: String },
    #[error("{vm} is {state:?} at the source, not running")]
    NotRunning { vm: String, state: DomainState },
    #[error("a domain named {vm} already exists at the destination")]
    NameTaken { vm: String },
    #[error("destination has {free_kib} KiB free, {vm} needs {needed_kib} KiB")]
    NoRoom {
        vm: String,
        free_kib: u64,
        needed_kib: u64,
    },
    #[error("{vm} has no writable file disk to move")]
    NoWritableDisk { vm: String },
    #[error("{path} already exists at the destination; refusing to overwrite it")]
    DiskAtDestination { path: String },
    #[error("{path} has no backing image")]
    NoBackingImage { path: String },
    #[error("staging {base} failed")]
    Staging {
        base: String,
        #[source]
        source: StageError,
    },
    #[error("{base} not staged within {timeout_ms} ms")]
    StagingTimedOut { base: String, timeout_ms: u64 },
    #[error("cancelled while staging {base}")]
    StagingCancelled { base: String },
    #[error("{base} staged but the destination does not see it")]
    StagedBaseMissing { base: String },
    #[error("announcing the move failed")]
    Announce(#[source] AnnounceError),
    #[error("withdrawing the move's announcement failed")]
    Withdraw(#[source] AnnounceError),
    #[error("timed out after {timeout_ms} ms, aborted")]
    MigrationTimedOut {
        timeout_ms: u64,
        #[source]
        source: HypervisorError,
    },
    #[error("cancelled, aborted")]
    MigrationCancelled(#[source] HypervisorError),
    #[error("verify found {found:?} instead of the VM at the destination only")]
    VerifyMismatch { found: Copies },
}

impl StepError {
    /// True when a host could not be reached (connecting failed or the connection broke).
    pub fn is_connection_error(&self) -> bool {
        matches!(self, Self::Hypervisor { source, .. } if source.is_connection_error())
    }
}

/// A failed step and its error.
#[derive(Debug)]
pub struct StepFailure {
    pub action: Action,
    pub error: StepError,
}

/// A finished migration: its report, and the first step that failed with its typed error
/// (the report's records and outcome carry it only as text).
#[derive(Debug)]
pub struct MigrationRun {
    pub report: MigrationReport,
    pub first_failure: Option<StepFailure>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Context {
    disks: Vec<DiskInfo>,
    macs: Vec<String>,
    completed: Option<JobProgress>,
}

/// Where a migration stands, as journaled before every action: enough for a restarted
/// manager to finish or roll it back ([`resume_migration`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationSnapshot {
    machine: MigrationMachine,
    ctx: Context,
}

impl MigrationSnapshot {
    pub fn plan(&self) -> &MigrationPlan {
        self.machine.plan()
    }
}

/// One host as the driver reaches it: connected on first use, the connection kept across
/// steps and dropped after a connection error, so that the next call reconnects.
struct HostLink {
    connector: Arc<dyn Connector>,
    uri: String,
    host: Mutex<Option<Host>>,
}

impl HostLink {
    fn new(connector: &Arc<dyn Connector>, uri: &str) -> Self {
        Self {
            connector: Arc::clone(connector),
            uri: uri.to_owned(),
            host: Mutex::new(None),
        }
    }

    /// The connection, opened now if there is none.
    async fn host(&self) -> Result<Host, StepError> {
        if let Some(host) = self.cached().clone() {
            return Ok(host);
        }
        let host = Host::open(&self.connector, &self.uri)
            .await
            .map_err(self.failed("connect"))?;
        *self.cached() = Some(host.clone());
        Ok(host)
    }

    /// Turns the error of call `op` into a [`StepError`], dropping the connection if it broke.
    fn failed(&self, op: &'static str) -> impl FnOnce(HypervisorError) -> StepError + '_ {
        move |source| {
            if source.is_connection_error() {
                *self.cached() = None;
            }
            StepError::Hypervisor {
                op,
                uri: self.uri.clone(),
                source,
            }
        }
    }

    /// `call` (named `op`) on a host that may be restarting, asked again on errors with two
    /// budgets of `patience`: a restarted libvirtd first refuses connections, then answers badly
    /// for a while as it recovers its domains. The first budget runs until the host answers at
    /// all, the second from then on. Tries are 500 ms apart; a broken connection is reopened.
    async fn patiently<T, F, Fut>(
        &self,
        patience: Duration,
        op: &'static str,
        call: F,
    ) -> Result<T, StepError>
    where
        F: Fn(Host) -> Fut,
        Fut: Future<Output = Result<T, HypervisorError>>,
    {
        let mut deadline = tokio::time::Instant::now() + patience;
        let mut answered = false;
        loop {
            let error = match self.host().await {
                Ok(host) => match call(host).await {
                    Ok(v) => return Ok(v),
                    Err(e) => self.failed(op)(e),
                },
                Err(e) => e,
            };
            let now = tokio::time::Instant::now();
            if !answered && !error.is_connection_error() {
                answered = true;
                deadline = now + patience;
            }
            if now >= deadline {
                return Err(error);
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(500))).await;
        }
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Option<Host>> {
        // Only ever replaced whole: a panic elsewhere cannot leave it half written.
        self.host.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The connections of one migration (see the module docs).
struct Links {
    source: HostLink,
    dest: HostLink,
    /// Polls and aborts the job while `source` is busy migrating: a query on the migrating
    /// connection can stall until the migration ends.
    source_watch: HostLink,
}

impl Links {
    fn new(connector: &Arc<dyn Connector>, plan: &MigrationPlan) -> Self {
        Self {
            source: HostLink::new(connector, &plan.source_uri),
            dest: HostLink::new(connector, &plan.dest_uri),
            source_watch: HostLink::new(connector, &plan.source_uri),
        }
    }
}

/// Runs one migration to its end (success, rollback or stuck) and reports every step.
pub async fn run_migration<S: BaseStager, A: MoveAnnouncer>(
    plan: MigrationPlan,
    deps: &MigrationDeps<S, A>,
    status: &watch::Sender<MigrationStatus>,
    cancel: &CancellationToken,
) -> MigrationReport {
    run_journaled(plan, deps, status, cancel, |_| {}).await
}

/// [`run_migration`], also handing out the first failed step with its typed error.
pub async fn run_migration_detailed<S: BaseStager, A: MoveAnnouncer>(
    plan: MigrationPlan,
    deps: &MigrationDeps<S, A>,
    status: &watch::Sender<MigrationStatus>,
    cancel: &CancellationToken,
) -> MigrationRun {
    let links = Links::new(&deps.connector, &plan);
    drive(fresh(plan), deps, &links, status, cancel, |_| {}).await
}

/// [`run_migration`], handing `journal` a snapshot before every action; the last one it gets
/// is the finished migration's.
pub async fn run_journaled<S: BaseStager, A: MoveAnnouncer>(
    plan: MigrationPlan,
    deps: &MigrationDeps<S, A>,
    status: &watch::Sender<MigrationStatus>,
    cancel: &CancellationToken,
    journal: impl FnMut(&MigrationSnapshot),
) -> MigrationReport {
    let links = Links::new(&deps.connector, &plan);
    drive(fresh(plan), deps, &links, status, cancel, journal)
        .await
        .report
}

fn fresh(plan: MigrationPlan) -> MigrationSnapshot {
    MigrationSnapshot {
        machine: MigrationMachine::new(plan),
        ctx: Context::default(),
    }
}

/// Finishes a migration whose manager stopped in the middle of it, from its last journaled
/// snapshot: a still running migration job at the source is aborted first, then the machine
/// decides from where the VM runs (see [`MigrationMachine::resume_after_restart`]).
pub async fn resume_migration<S: BaseStager, A: MoveAnnouncer>(
    mut snapshot: MigrationSnapshot,
    deps: &MigrationDeps<S, A>,
    status: &watch::Sender<MigrationStatus>,
    journal: impl FnMut(&MigrationSnapshot),
) -> MigrationReport {
    let links = Links::new(&deps.connector, snapshot.machine.plan());
    if !snapshot.machine.is_finished() {
        abort_leftover_job(
            &links.source,
            &snapshot.machine.plan().vm,
            deps.poll_interval,
        )
        .await;
        snapshot.machine.resume_after_restart(now_ms());
    }
    let cancel = CancellationToken::new();
    drive(snapshot, deps, &links, status, &cancel, journal)
        .await
        .report
}

/// Aborts a migration job of `vm` still running at the source (peer-to-peer jobs outlive the
/// client that started them) and waits, bounded, until the job has gone.
async fn abort_leftover_job(source: &HostLink, vm: &str, poll_interval: Duration) {
    let Ok(src) = source.host().await else {
        return;
    };
    if !matches!(src.job_progress(vm).await, Ok(Some(_))) {
        return;
    }
    tracing::warn!(
        vm,
        "aborting the migration job left by the previous manager"
    );
    let _ = src.abort_job(vm).await;
    for _ in 0..60 {
        tokio::time::sleep(poll_interval.min(Duration::from_millis(500))).await;
        if !matches!(src.job_progress(vm).await, Ok(Some(_))) {
            return;
        }
    }
}

async fn drive<S: BaseStager, A: MoveAnnouncer>(
    mut snap: MigrationSnapshot,
    deps: &MigrationDeps<S, A>,
    links: &Links,
    status: &watch::Sender<MigrationStatus>,
    cancel: &CancellationToken,
    mut journal: impl FnMut(&MigrationSnapshot),
) -> MigrationRun {
    let plan = snap.machine.plan().clone();
    let steps = StepRunner {
        deps,
        links,
        status,
        cancel,
    };
    let mut first_failure = None;
    loop {
        if cancel.is_cancelled() && !snap.machine.is_cancelled() {
            snap.machine.cancel();
        }
        let action = snap.machine.next(now_ms());
        tracing::info!(vm = %plan.vm, ?action, "migration step");
        status.send_replace(MigrationStatus {
            step: format!("{action:?}"),
            ..MigrationStatus::default()
        });
        journal(&snap);
        let MigrationSnapshot { machine, ctx } = &mut snap;
        let result = match &action {
            Action::Finished(outcome) => {
                let report = MigrationReport {
                    storage: machine.storage(),
                    records: machine.records().to_vec(),
                    completed: ctx.completed.take(),
                    plan,
                    outcome: outcome.clone(),
                };
                return MigrationRun {
                    report,
                    first_failure,
                };
            }
            Action::Run(step) => steps.run(*step, machine, ctx).await,
            Action::Undo(r) => steps.undo(*r, machine, ctx).await,
        };
        // The journal keeps the error as text, with its whole chain.
        let result = result.map_err(|error| {
            let text = chain(&error);
            tracing::warn!(vm = %plan.vm, error = %text, "migration step failed");
            first_failure.get_or_insert(StepFailure { action, error });
            text
        });
        machine.complete(now_ms(), result);
    }
}

/// What the steps work with besides the machine and its context.
struct StepRunner<'a, S, A> {
    deps: &'a MigrationDeps<S, A>,
    links: &'a Links,
    status: &'a watch::Sender<MigrationStatus>,
    cancel: &'a CancellationToken,
}

impl<S: BaseStager, A: MoveAnnouncer> StepRunner<'_, S, A> {
    async fn run(
        &self,
        step: Step,
        machine: &MigrationMachine,
        ctx: &mut Context,
    ) -> Result<Report, StepError> {
        let plan = machine.plan();
        match step {
            Step::PreCheck => pre_check(plan, self.links, ctx).await,
            Step::StageBase => self.stage_bases(plan, ctx).await,
            Step::PrecreateOverlay => {
                let (src, dst) = (&self.links.source, &self.links.dest);
                let (s, d) = (src.host().await?, dst.host().await?);
                for disk in &ctx.disks {
                    let Some((base, fmt)) = &disk.backing else {
                        return Err(StepError::NoBackingImage {
                            path: disk.path.clone(),
                        });
                    };
                    let capacity = s
                        .image_capacity(&disk.path)
                        .await
                        .map_err(src.failed("image_capacity"))?;
                    d.create_overlay(&disk.path, base, fmt, capacity)
                        .await
                        .map_err(dst.failed("create_overlay"))?;
                }
                Ok(Report::Done)
            }
            Step::AnnounceMove => {
                self.deps
                    .announcer
                    .expect_move(&notice(plan, ctx))
                    .await
                    .map_err(StepError::Announce)?;
                Ok(Report::Done)
            }
            Step::Migrate => self.migrate(machine, ctx).await,
            Step::Verify => {
                let found = find_copies(self.links, plan, Duration::ZERO).await?;
                if found != Copies::DestinationOnly {
                    return Err(StepError::VerifyMismatch { found });
                }
                // Only for the report: a destination that cannot tell is no failure.
                if let Ok(d) = self.links.dest.host().await {
                    ctx.completed = d.completed_job(&plan.vm).await.ok().flatten();
                }
                Ok(Report::Found(found))
            }
            Step::CleanupSource => {
                delete_disks(&self.links.source, &ctx.disks, Duration::ZERO).await
            }
        }
    }

    async fn undo(
        &self,
        r: Rollback,
        machine: &MigrationMachine,
        ctx: &Context,
    ) -> Result<Report, StepError> {
        let plan = machine.plan();
        let patience = self.deps.reconnect_timeout;
        match r {
            Rollback::Reconcile => find_copies(self.links, plan, patience)
                .await
                .map(Report::Found),
            Rollback::RemoveDestinationDomain => {
                remove_destination_domain(&self.links.dest, &plan.vm, patience).await
            }
            Rollback::RemoveDestinationOverlay => {
                delete_disks(&self.links.dest, &ctx.disks, patience).await
            }
            Rollback::WithdrawAnnouncement => {
                self.deps
                    .announcer
                    .withdraw_move(&notice(plan, ctx))
                    .await
                    .map_err(StepError::Withdraw)?;
                Ok(Report::Done)
            }
        }
    }

    /// Puts every base the destination lacks there, through the stager.
    async fn stage_bases(&self, plan: &MigrationPlan, ctx: &Context) -> Result<Report, StepError> {
        let (src, dst) = (&self.links.source, &self.links.dest);
        let d = dst.host().await?;
        let domain_xml = src
            .host()
            .await?
            .domain_xml(&plan.vm)
            .await
            .map_err(src.failed("domain_xml"))?;
        // Staging gets the migration's timeout as its deadline; cancellation stops waiting.
        let deadline_unix_ms = now_ms() + plan.timeout_ms;
        let progress = |p: StagingProgress| {
            self.status.send_replace(MigrationStatus {
                step: "StageBase".into(),
                job: None,
                staging: Some(p),
            });
        };
        let mut how = Vec::new();
        for disk in &ctx.disks {
            let Some((base, _)) = &disk.backing else {
                continue;
            };
            if d.image_exists(base)
                .await
                .map_err(dst.failed("image_exists"))?
            {
                how.push(format!("{base}: already at the destination"));
                continue;
            }
            let job = StageJob {
                vm: &plan.vm,
                base_path: base,
                source_uri: &plan.source_uri,
                dest_uri: &plan.dest_uri,
                domain_xml: &domain_xml,
                deadline_unix_ms,
                progress: &progress,
            };
            // The stager reports lateness itself (with its progress); this only catches one that
            // does not honour the deadline.
            let backstop = Duration::from_millis(plan.timeout_ms) + Duration::from_secs(2);
            let staged = tokio::select! {
                r = self.deps.stager.stage_for_vm(&job) => r.map_err(|source| StepError::Staging {
                    base: base.clone(),
                    source,
                })?,
                () = tokio::time::sleep(backstop) => {
                    return Err(StepError::StagingTimedOut {
                        base: base.clone(),
                        timeout_ms: plan.timeout_ms,
                    });
                }
                () = self.cancel.cancelled() => {
                    return Err(StepError::StagingCancelled { base: base.clone() });
                }
            };
            tracing::info!(base = %base, how = %staged, "base staged");
            if !d
                .image_exists(base)
                .await
                .map_err(dst.failed("image_exists"))?
            {
                return Err(StepError::StagedBaseMissing { base: base.clone() });
            }
            how.push(format!("{base}: {staged}"));
        }
        Ok(Report::Staged { how })
    }

    async fn migrate(
        &self,
        machine: &MigrationMachine,
        ctx: &Context,
    ) -> Result<Report, StepError> {
        let plan = machine.plan();
        let vm = plan.vm.as_str();
        let mover = self.links.source.host().await?;
        let watcher = self.links.source_watch.host().await?;
        let req = MigrationRequest {
            dest_uri: plan.dest_migration_uri.clone(),
            disks: ctx.disks.iter().map(|d| d.target.clone()).collect(),
            storage: machine.storage(),
            migrate_uri: None,
            tuning: plan.tuning.clone(),
        };
        // Runs on the blocking pool from its first poll; awaited to its end on every path.
        let migration = mover.migrate(vm, req);
        tokio::pin!(migration);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(plan.timeout_ms);
        let mut poll = tokio::time::interval(self.deps.poll_interval);
        let mut aborted: Option<AbortReason> = None;
        loop {
            tokio::select! {
                result = &mut migration => {
                    let Err(source) = result else {
                        return Ok(Report::Done);
                    };
                    return Err(match aborted {
                        Some(AbortReason::TimedOut) => StepError::MigrationTimedOut {
                            timeout_ms: plan.timeout_ms,
                            source,
                        },
                        Some(AbortReason::Cancelled) => StepError::MigrationCancelled(source),
                        None => self.links.source.failed("migrate")(source),
                    });
                }
                _ = poll.tick() => {
                    if aborted.is_some() {
                        // Aborting can fail while the job is still being set up; keep asking.
                        abort(&watcher, vm).await;
                        continue;
                    }
                    let job = tokio::time::timeout(Duration::from_secs(2), watcher.job_progress(vm)).await;
                    if let Ok(Ok(job)) = job {
                        self.status.send_replace(MigrationStatus { step: "Migrate".into(), job, staging: None });
                    }
                }
                _ = tokio::time::sleep_until(deadline), if aborted.is_none() => {
                    aborted = Some(AbortReason::TimedOut);
                    abort(&watcher, vm).await;
                }
                _ = self.cancel.cancelled(), if aborted.is_none() => {
                    aborted = Some(AbortReason::Cancelled);
                    abort(&watcher, vm).await;
                }
            }
        }
    }
}

/// Source VM running, destination with room and without anything of the VM; learns the disks
/// and MACs.
async fn pre_check(
    plan: &MigrationPlan,
    links: &Links,
    ctx: &mut Context,
) -> Result<Report, StepError> {
    if plan.source_uri == plan.dest_uri {
        return Err(StepError::SameHost);
    }
    let vm = plan.vm.as_str();
    let (src, dst) = (&links.source, &links.dest);
    let (s, d) = (src.host().await?, dst.host().await?);
    let summary = s
        .domain(vm)
        .await
        .map_err(src.failed("domain"))?
        .ok_or_else(|| StepError::NotAtSource { vm: vm.to_owned() })?;
    if summary.state != DomainState::Running {
        return Err(StepError::NotRunning {
            vm: vm.to_owned(),
            state: summary.state,
        });
    }
    if d.domain(vm).await.map_err(dst.failed("domain"))?.is_some() {
        return Err(StepError::NameTaken { vm: vm.to_owned() });
    }
    let host = d.host_info().await.map_err(dst.failed("host_info"))?;
    if host.free_memory_kib < summary.memory_kib {
        return Err(StepError::NoRoom {
            vm: vm.to_owned(),
            free_kib: host.free_memory_kib,
            needed_kib: summary.memory_kib,
        });
    }
    let disks: Vec<DiskInfo> = s
        .disks(vm)
        .await
        .map_err(src.failed("disks"))?
        .into_iter()
        .filter(|disk| !disk.read_only)
        .collect();
    if disks.is_empty() {
        return Err(StepError::NoWritableDisk { vm: vm.to_owned() });
    }
    ctx.macs = s
        .nics(vm)
        .await
        .map_err(src.failed("nics"))?
        .into_iter()
        .map(|n| n.mac)
        .collect();
    let mut base_at_destination = true;
    for disk in &disks {
        if d.image_exists(&disk.path)
            .await
            .map_err(dst.failed("image_exists"))?
        {
            return Err(StepError::DiskAtDestination {
                path: disk.path.clone(),
            });
        }
        if let Some((base, _)) = &disk.backing {
            base_at_destination &= d
                .image_exists(base)
                .await
                .map_err(dst.failed("image_exists"))?;
        }
    }
    let has_backing = disks.iter().all(|disk| disk.backing.is_some());
    ctx.disks = disks;
    Ok(Report::PreChecked {
        has_backing,
        base_at_destination: has_backing && base_at_destination,
    })
}

/// Deletes the VM's disk overlays at one host (idempotent), each asked again until `patience`.
async fn delete_disks(
    link: &HostLink,
    disks: &[DiskInfo],
    patience: Duration,
) -> Result<Report, StepError> {
    for disk in disks {
        let path = disk.path.as_str();
        link.patiently(patience, "delete_image", |h| async move {
            h.delete_image(path).await
        })
        .await?;
    }
    Ok(Report::Done)
}

fn notice(plan: &MigrationPlan, ctx: &Context) -> MoveNotice {
    MoveNotice {
        vm: plan.vm.clone(),
        macs: ctx.macs.clone(),
        source_uri: plan.source_uri.clone(),
        dest_uri: plan.dest_uri.clone(),
    }
}

/// Why the driver aborted the migration job.
#[derive(Debug, Clone, Copy)]
enum AbortReason {
    TimedOut,
    Cancelled,
}

async fn abort(watcher: &Host, vm: &str) {
    match tokio::time::timeout(Duration::from_secs(5), watcher.abort_job(vm)).await {
        Ok(Ok(())) => tracing::info!(vm, "migration job aborted"),
        Ok(Err(e)) => tracing::warn!(vm, error = %chain(&e), "abort failed; retrying"),
        Err(_) => tracing::warn!(vm, "abort timed out; retrying"),
    }
}

/// Where the VM is now. `patience` is how long to wait for an unreachable destination.
async fn find_copies(
    links: &Links,
    plan: &MigrationPlan,
    patience: Duration,
) -> Result<Copies, StepError> {
    let vm = plan.vm.as_str();
    let src = &links.source;
    let at_source = src
        .host()
        .await?
        .domain(vm)
        .await
        .map_err(src.failed("domain"))?;
    let source_running = at_source
        .as_ref()
        .is_some_and(|d| d.state == DomainState::Running);
    let at_dest = match links
        .dest
        .patiently(patience, "domain", |h| async move { h.domain(vm).await })
        .await
    {
        Ok(found) => Some(found),
        // Unreachable: it cannot run a copy we could see; leftovers are handled by cleanup.
        Err(e) if e.is_connection_error() => None,
        Err(e) => return Err(e),
    };
    let dest_running = at_dest
        .as_ref()
        .and_then(Option::as_ref)
        .is_some_and(|d| d.state == DomainState::Running);
    let dest_leftover = !matches!(at_dest, Some(None));
    Ok(match (source_running, dest_running) {
        (true, true) => Copies::BothRunning,
        (true, false) if dest_leftover => Copies::SourceAndLeftover,
        (true, false) => Copies::SourceOnly,
        (false, true) => Copies::DestinationOnly,
        (false, false) => Copies::Neither,
    })
}

/// Destroys and undefines what is left of `vm` at the destination (an incoming QEMU).
async fn remove_destination_domain(
    dst: &HostLink,
    vm: &str,
    patience: Duration,
) -> Result<Report, StepError> {
    let Some(found) = dst
        .patiently(patience, "domain", |h| async move { h.domain(vm).await })
        .await?
    else {
        return Ok(Report::Done);
    };
    let d = dst.host().await?;
    if matches!(found.state, DomainState::Running | DomainState::Paused) {
        match d.destroy(vm).await {
            Ok(()) => {}
            Err(e) if e.is_no_such_domain() => return Ok(Report::Done),
            Err(e) => return Err(dst.failed("destroy")(e)),
        }
    }
    if let Some(left) = d.domain(vm).await.map_err(dst.failed("domain"))?
        && left.persistent
    {
        d.undefine(vm).await.map_err(dst.failed("undefine"))?;
    }
    Ok(Report::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::testing::{
        CountingConnector, FakeStager, RecordingAnnouncer, assert_migrated_incrementally,
        assert_rolled_back_clean, vm1_plan,
    };
    use crate::migration::{MigrationTuning, Outcome};
    use viola_hypervisor::fake::{FakeCluster, FakeHypervisor, Faults, sample_domain_xml};
    use viola_hypervisor::{Hypervisor, StorageCopy};

    const A: &str = "fake://a1";
    const B: &str = "fake://b1";
    const BASE: &str = "/img/base.qcow2";
    const OVERLAY: &str = "/img/vm1.qcow2";

    type Deps = MigrationDeps<FakeStager, RecordingAnnouncer>;

    /// vm1 runs at a1 over an overlay on `BASE`; b1 has nothing.
    struct Lab {
        cluster: FakeCluster,
        deps: Deps,
        announcer: RecordingAnnouncer,
    }

    impl Lab {
        fn new() -> Self {
            let cluster = FakeCluster::new();
            let a = cluster.host(A);
            cluster.host(B);
            cluster.add_image(A, BASE, 1 << 30, None);
            cluster.add_image(A, OVERLAY, 1 << 30, Some(BASE));
            a.define(&sample_domain_xml(
                "vm1",
                OVERLAY,
                BASE,
                "52:54:00:00:00:01",
            ))
            .unwrap();
            a.start("vm1").unwrap();
            let announcer = RecordingAnnouncer::default();
            let deps = MigrationDeps {
                connector: Arc::new(cluster.clone()),
                stager: FakeStager(cluster.clone()),
                announcer: announcer.clone(),
                poll_interval: Duration::from_millis(5),
                reconnect_timeout: Duration::from_millis(50),
            };
            Self {
                cluster,
                deps,
                announcer,
            }
        }

        fn host(&self, uri: &str) -> FakeHypervisor {
            self.cluster.host(uri)
        }

        async fn run(&self, plan: MigrationPlan, cancel: &CancellationToken) -> MigrationRun {
            let (tx, _rx) = watch::channel(MigrationStatus::default());
            run_migration_detailed(plan, &self.deps, &tx, cancel).await
        }

        #[track_caller]
        fn assert_rolled_back_clean(
            &self,
            run: &MigrationRun,
            expected: impl FnOnce(&StepFailure) -> bool,
        ) {
            assert_rolled_back_clean(run, &self.host(A), &self.host(B), &self.announcer, expected);
        }
    }

    fn plan(timeout_ms: u64) -> MigrationPlan {
        let mut plan = vm1_plan(A, B, timeout_ms);
        plan.tuning.bandwidth_mib_s = Some(50);
        plan
    }

    fn slow_migrations(cluster: &FakeCluster) {
        cluster.set_faults(Faults {
            migration_duration: Duration::from_secs(30),
            ..Faults::default()
        });
    }

    #[tokio::test]
    async fn moves_the_vm_with_staged_base_and_cleans_the_source() {
        let lab = Lab::new();
        let run = lab.run(plan(10_000), &CancellationToken::new()).await;
        let report = run.report;
        assert_migrated_incrementally(&report);
        assert!(run.first_failure.is_none());
        let cluster = &lab.cluster;
        assert_eq!(cluster.hosts_running("vm1"), vec![B.to_string()]);
        assert!(cluster.has_image(B, BASE) && cluster.has_image(B, OVERLAY));
        assert!(!cluster.has_image(A, OVERLAY), "source overlay left behind");
        assert!(cluster.has_image(A, BASE), "shared base must stay");
        assert_eq!(
            lab.announcer.notes(),
            vec!["expect vm1 [\"52:54:00:00:00:01\"]".to_string()]
        );
        assert!(report.completed.is_some_and(|c| c.downtime_ms.is_some()));
    }

    #[tokio::test]
    async fn the_plan_s_tls_reaches_the_hypervisor() {
        let lab = Lab::new();
        let tls_plan = MigrationPlan {
            tuning: MigrationTuning {
                tls: true,
                tls_destination: Some("b1.b.libvirt.viola".into()),
                ..MigrationTuning::default()
            },
            ..plan(10_000)
        };
        let run = lab.run(tls_plan, &CancellationToken::new()).await;
        assert!(matches!(run.report.outcome, Outcome::Migrated { .. }));
        let asked = lab.cluster.migration_requests();
        assert_eq!(asked.len(), 1);
        assert!(asked[0].tuning.tls);
        assert_eq!(
            asked[0].tuning.tls_destination.as_deref(),
            Some("b1.b.libvirt.viola")
        );
    }

    /// A normal migration opens 3 connections: one to each end, kept for every step, and
    /// the source's second one that polls progress while the first migrates.
    #[tokio::test]
    async fn a_migration_opens_each_connection_once() {
        let mut lab = Lab::new();
        let counting = CountingConnector::new(Arc::new(lab.cluster.clone()));
        lab.deps.connector = counting.clone();
        let run = lab.run(plan(10_000), &CancellationToken::new()).await;
        assert!(matches!(run.report.outcome, Outcome::Migrated { .. }));
        assert_eq!(counting.opened(), 3);
    }

    #[tokio::test]
    async fn destination_dying_mid_move_leaves_vm_at_source_and_destination_clean() {
        destination_dies_mid_move(0).await;
    }

    #[tokio::test]
    async fn a_restarted_destination_still_recovering_its_domains_is_asked_again() {
        destination_dies_mid_move(1).await;
    }

    /// The destination dies half way and comes back; its first `failing_queries` domain
    /// queries then fail.
    async fn destination_dies_mid_move(failing_queries: u32) {
        let lab = Lab::new();
        lab.cluster.set_faults(Faults {
            destination_dies: true,
            migration_duration: Duration::from_millis(40),
            ..Faults::default()
        });
        // The destination's libvirtd comes back shortly (as a supervisor would restart it).
        let c2 = lab.cluster.clone();
        let revive = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if !c2.has_domain(B, "vm1") {
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                c2.fail_domain_queries(B, failing_queries);
                c2.set_host_up(B, true);
                return;
            }
        });
        let run = lab.run(plan(10_000), &CancellationToken::new()).await;
        revive.await.unwrap();
        lab.assert_rolled_back_clean(&run, |f| {
            f.action == Action::Run(Step::Migrate)
                && matches!(f.error, StepError::Hypervisor { op: "migrate", .. })
        });
    }

    #[tokio::test]
    async fn timeout_aborts_and_rolls_back() {
        let lab = Lab::new();
        slow_migrations(&lab.cluster);
        let run = lab.run(plan(60), &CancellationToken::new()).await;
        lab.assert_rolled_back_clean(&run, |f| {
            matches!(f.error, StepError::MigrationTimedOut { timeout_ms: 60, .. })
        });
    }

    #[tokio::test]
    async fn cancellation_during_move_aborts() {
        let lab = Lab::new();
        slow_migrations(&lab.cluster);
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.cancel();
        });
        let run = lab.run(plan(60_000), &cancel).await;
        lab.assert_rolled_back_clean(&run, |f| {
            matches!(f.error, StepError::MigrationCancelled(_))
        });
    }

    #[tokio::test]
    async fn name_clash_at_destination_is_refused_before_anything_happens() {
        let lab = Lab::new();
        lab.host(B)
            .define(&sample_domain_xml(
                "vm1",
                "/other.qcow2",
                BASE,
                "52:54:00:00:00:09",
            ))
            .unwrap();
        let run = lab.run(plan(10_000), &CancellationToken::new()).await;
        assert!(matches!(run.report.outcome, Outcome::RolledBack { .. }));
        assert!(matches!(
            run.first_failure,
            Some(StepFailure {
                action: Action::Run(Step::PreCheck),
                error: StepError::NameTaken { .. },
            })
        ));
        assert_eq!(run.report.records.len(), 1);
        assert!(lab.announcer.notes().is_empty());
        assert!(
            lab.cluster.has_domain(B, "vm1"),
            "must not touch a domain it did not make"
        );
    }

    #[tokio::test]
    async fn an_unreachable_destination_fails_the_pre_check() {
        let lab = Lab::new();
        lab.cluster.set_host_up(B, false);
        let run = lab.run(plan(10_000), &CancellationToken::new()).await;
        assert!(
            matches!(&run.first_failure, Some(f)
                if f.action == Action::Run(Step::PreCheck) && f.error.is_connection_error()),
            "{:?}",
            run.first_failure
        );
        assert_eq!(lab.cluster.hosts_running("vm1"), vec![A.to_string()]);
    }

    #[tokio::test]
    async fn without_staging_a_missing_base_means_full_copy() {
        let lab = Lab::new();
        let mut p = plan(10_000);
        p.stage_base = false;
        let report = lab.run(p, &CancellationToken::new()).await.report;
        assert_eq!(
            report.outcome,
            Outcome::Migrated {
                storage: StorageCopy::Full
            }
        );
        assert!(!lab.cluster.has_image(B, BASE));
    }

    impl Lab {
        /// Runs a migration journaling every snapshot, hands its report to `meanwhile` (which
        /// leaves the lab as a manager dying during the move would), and resumes as a restarted
        /// manager from the snapshot journaled just before the move, passed through JSON as the
        /// inventory stores it.
        async fn restart_during_move(
            &self,
            meanwhile: impl FnOnce(&MigrationReport),
        ) -> MigrationReport {
            let (tx, _rx) = watch::channel(MigrationStatus::default());
            let mut at_move = None;
            let first = run_journaled(
                plan(10_000),
                &self.deps,
                &tx,
                &CancellationToken::new(),
                |s| {
                    if s.machine.clone().next(0) == Action::Run(Step::Migrate) {
                        at_move = Some(serde_json::to_string(s).unwrap());
                    }
                },
            )
            .await;
            let snap = serde_json::from_str(&at_move.expect("a snapshot before the move")).unwrap();
            meanwhile(&first);
            resume_migration(snap, &self.deps, &tx, |_| {}).await
        }
    }

    #[tokio::test]
    async fn manager_restarted_during_a_move_that_finished_completes_it() {
        let lab = Lab::new();
        let report = lab
            .restart_during_move(|first| {
                assert!(matches!(first.outcome, Outcome::Migrated { .. }));
                // The manager died after libvirt moved the VM, before it cleaned up the source.
                lab.cluster.add_image(A, OVERLAY, 1 << 30, Some(BASE));
            })
            .await;
        let Lab {
            cluster, announcer, ..
        } = lab;
        assert_migrated_incrementally(&report);
        assert!(
            report
                .records
                .iter()
                .any(|r| r.action == "Migrate" && r.result.starts_with("interrupted")),
            "{:#?}",
            report.records
        );
        assert_eq!(cluster.hosts_running("vm1"), vec![B.to_string()]);
        assert!(!cluster.has_image(A, OVERLAY), "source overlay left behind");
        assert!(cluster.has_image(B, OVERLAY));
        assert!(
            !announcer.notes().iter().any(|l| l.starts_with("withdraw")),
            "a finished move must not be withdrawn"
        );
    }

    #[tokio::test]
    async fn manager_restarted_during_a_move_that_did_not_happen_rolls_it_back() {
        let lab = Lab::new();
        lab.cluster.set_faults(Faults {
            refuse_migration: Some("refused".into()),
            ..Faults::default()
        });
        let report = lab
            .restart_during_move(|first| {
                assert!(matches!(first.outcome, Outcome::RolledBack { .. }));
                lab.cluster.set_faults(Faults::default());
                // The manager died during the move: the overlay it pre-created is still at
                // the destination and the VM still runs at the source.
                lab.cluster.add_image(B, OVERLAY, 1 << 30, Some(BASE));
                lab.announcer.clear();
            })
            .await;
        let Lab {
            cluster, announcer, ..
        } = lab;
        assert!(
            matches!(report.outcome, Outcome::RolledBack { .. }),
            "{:#?}",
            report.records
        );
        assert_eq!(cluster.hosts_running("vm1"), vec![A.to_string()]);
        assert!(cluster.has_image(A, OVERLAY), "the source's disk must stay");
        assert!(
            !cluster.has_image(B, OVERLAY),
            "pre-created overlay left behind"
        );
        assert_eq!(announcer.notes(), vec!["withdraw vm1".to_string()]);
    }
}
