//! The async driver of [`MigrationMachine`]: performs each step against the hypervisors, the
//! stager and the announcer, with progress, a timeout that aborts and cancellation.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use viola_api::migration::{MigrationReport, MigrationStatus};

use super::plan::{Action, Copies, MigrationMachine, MigrationPlan, Report, Rollback, Step};
use super::stage::{BaseStager, MoveAnnouncer, MoveNotice, StageJob, StagingProgress};
use viola_hypervisor::{
    Connector, DiskInfo, DomainState, DomainSummary, Hypervisor, HypervisorError, JobProgress,
    MigrationRequest, blocking,
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

/// Runs one migration to its end (success, rollback or stuck) and reports every step.
pub async fn run_migration<S: BaseStager, A: MoveAnnouncer>(
    plan: MigrationPlan,
    deps: &MigrationDeps<S, A>,
    status: &watch::Sender<MigrationStatus>,
    cancel: &CancellationToken,
) -> MigrationReport {
    run_journaled(plan, deps, status, cancel, |_| {}).await
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
    let snapshot = MigrationSnapshot {
        machine: MigrationMachine::new(plan),
        ctx: Context::default(),
    };
    drive(snapshot, deps, status, cancel, journal).await
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
    if !snapshot.machine.is_finished() {
        abort_leftover_job(deps, snapshot.machine.plan()).await;
        snapshot.machine.resume_after_restart(now_ms());
    }
    drive(snapshot, deps, status, &CancellationToken::new(), journal).await
}

/// Aborts a migration job of the plan's VM still running at the source (peer-to-peer jobs
/// outlive the client that started them) and waits, bounded, until the job has gone.
async fn abort_leftover_job<S, A>(deps: &MigrationDeps<S, A>, plan: &MigrationPlan) {
    let Ok(src) = open(&deps.connector, &plan.source_uri).await else {
        return;
    };
    let v = plan.vm.clone();
    if !matches!(
        blocking(&src, move |h| h.job_progress(&v)).await,
        Ok(Some(_))
    ) {
        return;
    }
    tracing::warn!(vm = %plan.vm, "aborting the migration job left by the previous manager");
    let v = plan.vm.clone();
    let _ = blocking(&src, move |h| h.abort_job(&v)).await;
    for _ in 0..60 {
        tokio::time::sleep(deps.poll_interval.min(Duration::from_millis(500))).await;
        let v = plan.vm.clone();
        if !matches!(
            blocking(&src, move |h| h.job_progress(&v)).await,
            Ok(Some(_))
        ) {
            return;
        }
    }
}

async fn drive<S: BaseStager, A: MoveAnnouncer>(
    mut snap: MigrationSnapshot,
    deps: &MigrationDeps<S, A>,
    status: &watch::Sender<MigrationStatus>,
    cancel: &CancellationToken,
    mut journal: impl FnMut(&MigrationSnapshot),
) -> MigrationReport {
    let plan = snap.machine.plan().clone();
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
        let result = match action {
            Action::Finished(outcome) => {
                return MigrationReport {
                    storage: machine.storage(),
                    records: machine.records().to_vec(),
                    completed: ctx.completed.take(),
                    plan,
                    outcome,
                };
            }
            Action::Run(step) => run_step(step, machine, deps, ctx, status, cancel).await,
            Action::Undo(r) => undo_step(r, machine, deps, ctx).await,
        };
        if let Err(e) = &result {
            tracing::warn!(vm = %plan.vm, error = %e, "migration step failed");
        }
        machine.complete(now_ms(), result);
    }
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    viola_common::errors::chain(err)
}

async fn open(
    deps_connector: &Arc<dyn Connector>,
    uri: &str,
) -> Result<Arc<dyn Hypervisor>, String> {
    let c = Arc::clone(deps_connector);
    let uri = uri.to_owned();
    tokio::task::spawn_blocking(move || c.open(&uri))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| chain(&e))
}

/// Calls `attempt` until it succeeds or `timeout` has passed (then its last error), pausing
/// 500 ms between tries: a libvirtd that was just restarted refuses connections, and then fails
/// questions for a moment while it recovers its domains.
async fn retry_until<T, F, Fut>(timeout: Duration, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => {
                let left = deadline - tokio::time::Instant::now();
                tokio::time::sleep(left.min(Duration::from_millis(500))).await;
            }
        }
    }
}

/// Keeps trying to open `uri` for `timeout` (a destination libvirtd may be restarting).
async fn open_patiently(
    connector: &Arc<dyn Connector>,
    uri: &str,
    timeout: Duration,
) -> Result<Arc<dyn Hypervisor>, String> {
    retry_until(timeout, || open(connector, uri)).await
}

/// The VM's domain at a host that may have just restarted (for example one still cleaning up
/// a half-made incoming migration), asked again on errors until `timeout`.
async fn domain_patiently(
    hv: &Arc<dyn Hypervisor>,
    vm: &str,
    timeout: Duration,
) -> Result<Option<DomainSummary>, String> {
    retry_until(timeout, || {
        let v = vm.to_owned();
        async move { blocking(hv, move |h| h.domain(&v)).await.map_err(hv_err) }
    })
    .await
}

fn hv_err(e: HypervisorError) -> String {
    chain(&e)
}

async fn run_step<S: BaseStager, A: MoveAnnouncer>(
    step: Step,
    machine: &MigrationMachine,
    deps: &MigrationDeps<S, A>,
    ctx: &mut Context,
    status: &watch::Sender<MigrationStatus>,
    cancel: &CancellationToken,
) -> Result<Report, String> {
    let plan = machine.plan();
    let vm = plan.vm.clone();
    match step {
        Step::PreCheck => {
            if plan.source_uri == plan.dest_uri {
                return Err("source and destination are the same host".into());
            }
            let src = open(&deps.connector, &plan.source_uri).await?;
            let dst = open(&deps.connector, &plan.dest_uri).await?;
            let v = vm.clone();
            let summary = blocking(&src, move |h| h.domain(&v))
                .await
                .map_err(hv_err)?
                .ok_or_else(|| format!("{vm} is not defined at the source"))?;
            if summary.state != DomainState::Running {
                return Err(format!(
                    "{vm} is {:?} at the source, not running",
                    summary.state
                ));
            }
            let v = vm.clone();
            if blocking(&dst, move |h| h.domain(&v))
                .await
                .map_err(hv_err)?
                .is_some()
            {
                return Err(format!(
                    "a domain named {vm} already exists at the destination"
                ));
            }
            let host = blocking(&dst, |h| h.host_info()).await.map_err(hv_err)?;
            if host.free_memory_kib < summary.memory_kib {
                return Err(format!(
                    "destination has {} KiB free, {vm} needs {} KiB",
                    host.free_memory_kib, summary.memory_kib
                ));
            }
            let v = vm.clone();
            let disks: Vec<DiskInfo> = blocking(&src, move |h| h.disks(&v))
                .await
                .map_err(hv_err)?
                .into_iter()
                .filter(|d| !d.read_only)
                .collect();
            if disks.is_empty() {
                return Err(format!("{vm} has no writable file disk to move"));
            }
            let v = vm.clone();
            ctx.macs = blocking(&src, move |h| h.nics(&v))
                .await
                .map_err(hv_err)?
                .into_iter()
                .map(|n| n.mac)
                .collect();
            let mut base_at_destination = true;
            for d in &disks {
                let path = d.path.clone();
                if blocking(&dst, move |h| h.image_exists(&path))
                    .await
                    .map_err(hv_err)?
                {
                    return Err(format!(
                        "{} already exists at the destination; refusing to overwrite it",
                        d.path
                    ));
                }
                if let Some((base, _)) = &d.backing {
                    let base = base.clone();
                    base_at_destination &= blocking(&dst, move |h| h.image_exists(&base))
                        .await
                        .map_err(hv_err)?;
                }
            }
            let has_backing = disks.iter().all(|d| d.backing.is_some());
            ctx.disks = disks;
            Ok(Report::PreChecked {
                has_backing,
                base_at_destination: has_backing && base_at_destination,
            })
        }
        Step::StageBase => {
            let src = open(&deps.connector, &plan.source_uri).await?;
            let dst = open(&deps.connector, &plan.dest_uri).await?;
            let v = vm.clone();
            let domain_xml = blocking(&src, move |h| h.domain_xml(&v))
                .await
                .map_err(hv_err)?;
            // Staging gets the migration's timeout as its deadline; cancellation stops waiting.
            let deadline_unix_ms = now_ms() + plan.timeout_ms;
            let progress = |p: StagingProgress| {
                status.send_replace(MigrationStatus {
                    step: "StageBase".into(),
                    job: None,
                    staging: Some(p),
                });
            };
            let mut how = Vec::new();
            for d in &ctx.disks {
                let Some((base, _)) = &d.backing else {
                    continue;
                };
                let b = base.clone();
                if blocking(&dst, move |h| h.image_exists(&b))
                    .await
                    .map_err(hv_err)?
                {
                    how.push(format!("{base}: already at the destination"));
                    continue;
                }
                let job = StageJob {
                    vm: &vm,
                    base_path: base,
                    source_uri: &plan.source_uri,
                    dest_uri: &plan.dest_uri,
                    domain_xml: &domain_xml,
                    deadline_unix_ms,
                    progress: &progress,
                };
                // The stager reports lateness itself (with its progress); this only catches one
                // that does not honour the deadline.
                let backstop = Duration::from_millis(plan.timeout_ms) + Duration::from_secs(2);
                let staged = tokio::select! {
                    r = deps.stager.stage_for_vm(&job) => r.map_err(|e| chain(&e))?,
                    () = tokio::time::sleep(backstop) => {
                        return Err(format!("{base} not staged within {} ms", plan.timeout_ms));
                    }
                    () = cancel.cancelled() => return Err("cancelled while staging".into()),
                };
                tracing::info!(base = %base, how = %staged, "base staged");
                let b = base.clone();
                if !blocking(&dst, move |h| h.image_exists(&b))
                    .await
                    .map_err(hv_err)?
                {
                    return Err(format!("{base} staged but the destination does not see it"));
                }
                how.push(format!("{base}: {staged}"));
            }
            Ok(Report::Staged { how })
        }
        Step::PrecreateOverlay => {
            let src = open(&deps.connector, &plan.source_uri).await?;
            let dst = open(&deps.connector, &plan.dest_uri).await?;
            for d in &ctx.disks {
                let Some((base, fmt)) = d.backing.clone() else {
                    return Err(format!("{} has no backing image", d.path));
                };
                let path = d.path.clone();
                let capacity = blocking(&src, move |h| h.image_capacity(&path))
                    .await
                    .map_err(hv_err)?;
                let path = d.path.clone();
                blocking(&dst, move |h| {
                    h.create_overlay(&path, &base, &fmt, capacity)
                })
                .await
                .map_err(hv_err)?;
            }
            Ok(Report::Done)
        }
        Step::AnnounceMove => {
            let notice = notice(plan, ctx);
            deps.announcer
                .expect_move(&notice)
                .await
                .map_err(|e| chain(&e))?;
            Ok(Report::Done)
        }
        Step::Migrate => migrate(machine, deps, ctx, status, cancel).await,
        Step::Verify => {
            let copies = find_copies(deps, plan, Duration::ZERO).await?;
            if copies == Copies::DestinationOnly {
                let dst = open(&deps.connector, &plan.dest_uri).await?;
                let v = vm.clone();
                ctx.completed = blocking(&dst, move |h| h.completed_job(&v))
                    .await
                    .ok()
                    .flatten();
            }
            Ok(Report::Found(copies))
        }
        Step::CleanupSource => {
            let src = open(&deps.connector, &plan.source_uri).await?;
            for d in &ctx.disks {
                let path = d.path.clone();
                blocking(&src, move |h| h.delete_image(&path))
                    .await
                    .map_err(hv_err)?;
            }
            Ok(Report::Done)
        }
    }
}

fn notice(plan: &MigrationPlan, ctx: &Context) -> MoveNotice {
    MoveNotice {
        vm: plan.vm.clone(),
        macs: ctx.macs.clone(),
        source_uri: plan.source_uri.clone(),
        dest_uri: plan.dest_uri.clone(),
    }
}

async fn migrate<S: BaseStager, A: MoveAnnouncer>(
    machine: &MigrationMachine,
    deps: &MigrationDeps<S, A>,
    ctx: &Context,
    status: &watch::Sender<MigrationStatus>,
    cancel: &CancellationToken,
) -> Result<Report, String> {
    let plan = machine.plan();
    // Separate connections for the blocking migrate call and for polling/aborting: a query on
    // the migrating connection can stall until the migration ends.
    let mover = open(&deps.connector, &plan.source_uri).await?;
    let watcher = open(&deps.connector, &plan.source_uri).await?;
    let req = MigrationRequest {
        dest_uri: plan.dest_migration_uri.clone(),
        disks: ctx.disks.iter().map(|d| d.target.clone()).collect(),
        storage: machine.storage(),
        bandwidth_mib_s: plan.bandwidth_mib_s,
        migrate_uri: None,
        max_downtime_ms: plan.max_downtime_ms,
        compress: plan.compress,
    };
    let vm = plan.vm.clone();
    let mut task = tokio::task::spawn_blocking(move || mover.migrate(&vm, &req));
    let deadline = tokio::time::Instant::now() + Duration::from_millis(plan.timeout_ms);
    let mut poll = tokio::time::interval(deps.poll_interval);
    let mut abort_reason: Option<String> = None;
    loop {
        tokio::select! {
            joined = &mut task => {
                let result = joined.map_err(|e| e.to_string())?;
                return match (result, abort_reason) {
                    (Ok(()), _) => Ok(Report::Done),
                    (Err(e), Some(reason)) => Err(format!("{reason}: {}", hv_err(e))),
                    (Err(e), None) => Err(hv_err(e)),
                };
            }
            _ = poll.tick() => {
                if abort_reason.is_some() {
                    // Aborting can fail while the job is still being set up; keep asking.
                    abort(&watcher, &plan.vm).await;
                    continue;
                }
                let v = plan.vm.clone();
                let job = tokio::time::timeout(
                    Duration::from_secs(2),
                    blocking(&watcher, move |h| h.job_progress(&v)),
                ).await;
                if let Ok(Ok(job)) = job {
                    status.send_replace(MigrationStatus { step: "Migrate".into(), job, staging: None });
                }
            }
            _ = tokio::time::sleep_until(deadline), if abort_reason.is_none() => {
                abort_reason = Some(format!("timed out after {} ms, aborted", plan.timeout_ms));
                abort(&watcher, &plan.vm).await;
            }
            _ = cancel.cancelled(), if abort_reason.is_none() => {
                abort_reason = Some("cancelled, aborted".into());
                abort(&watcher, &plan.vm).await;
            }
        }
    }
}

async fn abort(watcher: &Arc<dyn Hypervisor>, vm: &str) {
    let v = vm.to_owned();
    match tokio::time::timeout(
        Duration::from_secs(5),
        blocking(watcher, move |h| h.abort_job(&v)),
    )
    .await
    {
        Ok(Ok(())) => tracing::info!(vm, "migration job aborted"),
        Ok(Err(e)) => tracing::warn!(vm, error = %hv_err(e), "abort failed; retrying"),
        Err(_) => tracing::warn!(vm, "abort timed out; retrying"),
    }
}

/// Where the VM is now. `patience` is how long to wait for an unreachable destination.
async fn find_copies<S, A>(
    deps: &MigrationDeps<S, A>,
    plan: &MigrationPlan,
    patience: Duration,
) -> Result<Copies, String> {
    let src = open(&deps.connector, &plan.source_uri).await?;
    let v = plan.vm.clone();
    let at_source = blocking(&src, move |h| h.domain(&v))
        .await
        .map_err(hv_err)?;
    let source_running = at_source
        .as_ref()
        .is_some_and(|d| d.state == DomainState::Running);
    let at_dest = match open_patiently(&deps.connector, &plan.dest_uri, patience).await {
        Ok(dst) => Some(domain_patiently(&dst, &plan.vm, patience).await?),
        // Unreachable: it cannot run a copy we could see; leftovers are handled by cleanup.
        Err(_) => None,
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

async fn undo_step<S: BaseStager, A: MoveAnnouncer>(
    r: Rollback,
    machine: &MigrationMachine,
    deps: &MigrationDeps<S, A>,
    ctx: &Context,
) -> Result<Report, String> {
    let plan = machine.plan();
    match r {
        Rollback::Reconcile => find_copies(deps, plan, deps.reconnect_timeout)
            .await
            .map(Report::Found),
        Rollback::RemoveDestinationDomain => {
            let dst = open_patiently(&deps.connector, &plan.dest_uri, deps.reconnect_timeout)
                .await
                .map_err(|e| format!("destination unreachable, leftovers may remain: {e}"))?;
            let v = plan.vm.clone();
            let Some(found) = blocking(&dst, move |h| h.domain(&v))
                .await
                .map_err(hv_err)?
            else {
                return Ok(Report::Done);
            };
            if matches!(found.state, DomainState::Running | DomainState::Paused) {
                let v = plan.vm.clone();
                match blocking(&dst, move |h| h.destroy(&v)).await {
                    Ok(()) => {}
                    Err(e) if e.is_no_such_domain() => return Ok(Report::Done),
                    Err(e) => return Err(hv_err(e)),
                }
            }
            let v = plan.vm.clone();
            match blocking(&dst, move |h| h.domain(&v))
                .await
                .map_err(hv_err)?
            {
                Some(d) if d.persistent => {
                    let v = plan.vm.clone();
                    blocking(&dst, move |h| h.undefine(&v))
                        .await
                        .map_err(hv_err)?;
                }
                _ => {}
            }
            Ok(Report::Done)
        }
        Rollback::RemoveDestinationOverlay => {
            let dst = open_patiently(&deps.connector, &plan.dest_uri, deps.reconnect_timeout)
                .await
                .map_err(|e| format!("destination unreachable, overlay may remain: {e}"))?;
            for d in &ctx.disks {
                let path = d.path.clone();
                blocking(&dst, move |h| h.delete_image(&path))
                    .await
                    .map_err(hv_err)?;
            }
            Ok(Report::Done)
        }
        Rollback::WithdrawAnnouncement => {
            deps.announcer
                .withdraw_move(&notice(plan, ctx))
                .await
                .map_err(|e| chain(&e))?;
            Ok(Report::Done)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::migration::Outcome;
    use crate::migration::stage::{AnnounceError, StageError, StagedBase};
    use viola_hypervisor::StorageCopy;
    use viola_hypervisor::fake::{FakeCluster, Faults, sample_domain_xml};

    const A: &str = "fake://a1";
    const B: &str = "fake://b1";
    const BASE: &str = "/img/base.qcow2";
    const OVERLAY: &str = "/img/vm1.qcow2";

    /// Stages by putting the base into the fake destination.
    struct FakeStager(FakeCluster);
    impl BaseStager for FakeStager {
        async fn stage(&self, base: &str, _: &str, dest: &str) -> Result<StagedBase, StageError> {
            self.0.add_image(dest, base, 1 << 30, None);
            Ok(StagedBase {
                blake3: "x".into(),
                bytes: 1 << 30,
                copied: true,
            })
        }
    }

    #[derive(Default)]
    struct RecordingAnnouncer(Mutex<Vec<String>>);
    impl MoveAnnouncer for Arc<RecordingAnnouncer> {
        async fn expect_move(&self, n: &MoveNotice) -> Result<(), AnnounceError> {
            self.0
                .lock()
                .unwrap()
                .push(format!("expect {} {:?}", n.vm, n.macs));
            Ok(())
        }
        async fn withdraw_move(&self, n: &MoveNotice) -> Result<(), AnnounceError> {
            self.0.lock().unwrap().push(format!("withdraw {}", n.vm));
            Ok(())
        }
    }

    fn setup() -> (
        FakeCluster,
        MigrationDeps<FakeStager, Arc<RecordingAnnouncer>>,
        Arc<RecordingAnnouncer>,
    ) {
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
        let announcer = Arc::new(RecordingAnnouncer::default());
        let deps = MigrationDeps {
            connector: Arc::new(cluster.clone()),
            stager: FakeStager(cluster.clone()),
            announcer: Arc::clone(&announcer),
            poll_interval: Duration::from_millis(5),
            reconnect_timeout: Duration::from_millis(50),
        };
        (cluster, deps, announcer)
    }

    fn plan(timeout_ms: u64) -> MigrationPlan {
        MigrationPlan {
            vm: "vm1".into(),
            source_uri: A.into(),
            dest_uri: B.into(),
            dest_migration_uri: B.into(),
            stage_base: true,
            bandwidth_mib_s: Some(50),
            timeout_ms,
            max_downtime_ms: None,
            compress: false,
        }
    }

    async fn go(
        deps: &MigrationDeps<FakeStager, Arc<RecordingAnnouncer>>,
        plan: MigrationPlan,
        cancel: &CancellationToken,
    ) -> MigrationReport {
        let (tx, _rx) = watch::channel(MigrationStatus::default());
        run_migration(plan, deps, &tx, cancel).await
    }

    #[tokio::test]
    async fn moves_the_vm_with_staged_base_and_cleans_the_source() {
        let (cluster, deps, announcer) = setup();
        let report = go(&deps, plan(10_000), &CancellationToken::new()).await;
        assert_eq!(
            report.outcome,
            Outcome::Migrated {
                storage: StorageCopy::Incremental
            },
            "{:#?}",
            report.records
        );
        assert_eq!(cluster.hosts_running("vm1"), vec![B.to_string()]);
        assert!(cluster.has_image(B, BASE) && cluster.has_image(B, OVERLAY));
        assert!(!cluster.has_image(A, OVERLAY), "source overlay left behind");
        assert!(cluster.has_image(A, BASE), "shared base must stay");
        assert_eq!(
            *announcer.0.lock().unwrap(),
            vec!["expect vm1 [\"52:54:00:00:00:01\"]".to_string()]
        );
        assert!(report.completed.is_some_and(|c| c.downtime_ms.is_some()));
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
        let (cluster, deps, announcer) = setup();
        cluster.set_faults(Faults {
            destination_dies: true,
            migration_duration: Duration::from_millis(40),
            ..Faults::default()
        });
        // The destination's libvirtd comes back shortly (as a supervisor would restart it).
        let c2 = cluster.clone();
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
        let report = go(&deps, plan(10_000), &CancellationToken::new()).await;
        revive.await.unwrap();
        assert!(
            matches!(report.outcome, Outcome::RolledBack { .. }),
            "{:?}",
            report.outcome
        );
        assert_eq!(cluster.hosts_running("vm1"), vec![A.to_string()]);
        assert!(
            !cluster.has_domain(B, "vm1"),
            "incoming domain left at destination"
        );
        assert!(
            !cluster.has_image(B, OVERLAY),
            "pre-created overlay left at destination"
        );
        assert!(
            announcer
                .0
                .lock()
                .unwrap()
                .contains(&"withdraw vm1".to_string())
        );
    }

    #[tokio::test]
    async fn timeout_aborts_and_rolls_back() {
        let (cluster, deps, _) = setup();
        cluster.set_faults(Faults {
            migration_duration: Duration::from_secs(30),
            ..Faults::default()
        });
        let report = go(&deps, plan(60), &CancellationToken::new()).await;
        match &report.outcome {
            Outcome::RolledBack { reason } => assert!(reason.contains("timed out"), "{reason}"),
            o => panic!("{o:?}"),
        }
        assert_eq!(cluster.hosts_running("vm1"), vec![A.to_string()]);
        assert!(!cluster.has_image(B, OVERLAY));
    }

    #[tokio::test]
    async fn cancellation_during_move_aborts() {
        let (cluster, deps, _) = setup();
        cluster.set_faults(Faults {
            migration_duration: Duration::from_secs(30),
            ..Faults::default()
        });
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.cancel();
        });
        let report = go(&deps, plan(60_000), &cancel).await;
        assert!(
            matches!(&report.outcome, Outcome::RolledBack { reason } if reason.contains("cancelled")),
            "{:?}",
            report.outcome
        );
        assert_eq!(cluster.hosts_running("vm1"), vec![A.to_string()]);
    }

    #[tokio::test]
    async fn name_clash_at_destination_is_refused_before_anything_happens() {
        let (cluster, deps, announcer) = setup();
        let b = cluster.host(B);
        b.define(&sample_domain_xml(
            "vm1",
            "/other.qcow2",
            BASE,
            "52:54:00:00:00:09",
        ))
        .unwrap();
        let report = go(&deps, plan(10_000), &CancellationToken::new()).await;
        assert!(matches!(report.outcome, Outcome::RolledBack { .. }));
        assert_eq!(report.records.len(), 1);
        assert!(announcer.0.lock().unwrap().is_empty());
        assert!(
            cluster.has_domain(B, "vm1"),
            "must not touch a domain it did not make"
        );
    }

    #[tokio::test]
    async fn without_staging_a_missing_base_means_full_copy() {
        let (cluster, deps, _) = setup();
        let mut p = plan(10_000);
        p.stage_base = false;
        let report = go(&deps, p, &CancellationToken::new()).await;
        assert_eq!(
            report.outcome,
            Outcome::Migrated {
                storage: StorageCopy::Full
            }
        );
        assert!(!cluster.has_image(B, BASE));
    }

    /// Runs a migration journaling every snapshot; returns the report and the snapshot that
    /// was journaled just before the move (what a manager dying during the move leaves),
    /// passed through JSON as the inventory stores it.
    async fn run_keeping_move_snapshot(
        deps: &MigrationDeps<FakeStager, Arc<RecordingAnnouncer>>,
    ) -> (MigrationReport, MigrationSnapshot) {
        let (tx, _rx) = watch::channel(MigrationStatus::default());
        let mut at_move = None;
        let report = run_journaled(plan(10_000), deps, &tx, &CancellationToken::new(), |s| {
            if s.machine.clone().next(0) == Action::Run(Step::Migrate) {
                at_move = Some(serde_json::to_string(s).unwrap());
            }
        })
        .await;
        let snap = serde_json::from_str(&at_move.expect("a snapshot before the move")).unwrap();
        (report, snap)
    }

    async fn resume(
        deps: &MigrationDeps<FakeStager, Arc<RecordingAnnouncer>>,
        snap: MigrationSnapshot,
    ) -> MigrationReport {
        let (tx, _rx) = watch::channel(MigrationStatus::default());
        resume_migration(snap, deps, &tx, |_| {}).await
    }

    #[tokio::test]
    async fn manager_restarted_during_a_move_that_finished_completes_it() {
        let (cluster, deps, announcer) = setup();
        let (first, snap) = run_keeping_move_snapshot(&deps).await;
        assert!(matches!(first.outcome, Outcome::Migrated { .. }));
        // The manager died after libvirt moved the VM, before it cleaned up the source.
        cluster.add_image(A, OVERLAY, 1 << 30, Some(BASE));
        let report = resume(&deps, snap).await;
        assert_eq!(
            report.outcome,
            Outcome::Migrated {
                storage: StorageCopy::Incremental
            },
            "{:#?}",
            report.records
        );
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
            !announcer
                .0
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with("withdraw")),
            "a finished move must not be withdrawn"
        );
    }

    #[tokio::test]
    async fn manager_restarted_during_a_move_that_did_not_happen_rolls_it_back() {
        let (cluster, deps, announcer) = setup();
        cluster.set_faults(Faults {
            refuse_migration: Some("refused".into()),
            ..Faults::default()
        });
        let (first, snap) = run_keeping_move_snapshot(&deps).await;
        assert!(matches!(first.outcome, Outcome::RolledBack { .. }));
        cluster.set_faults(Faults::default());
        // The manager died during the move: the overlay it pre-created is still at the
        // destination and the VM still runs at the source.
        cluster.add_image(B, OVERLAY, 1 << 30, Some(BASE));
        announcer.0.lock().unwrap().clear();
        let report = resume(&deps, snap).await;
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
        assert_eq!(
            *announcer.0.lock().unwrap(),
            vec!["withdraw vm1".to_string()]
        );
    }
}
