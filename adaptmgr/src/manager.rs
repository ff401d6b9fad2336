//! The live manager: inventory + hypervisors + migrations + host-failure handling, driven by
//! monitor reports and CLI requests arriving at the control endpoint.
//!
//! The policy loop (`crate::policy_loop`, configured by the `[policy]` table) plugs in on top
//! of this: each period it builds the policy's state from the inventory and carries decisions
//! out through [`Manager::resize`] and [`Manager::migrate`], the same calls the CLI makes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::announce::{OverlayAnnouncer, OverlayHost, OverlayLink, QuicOverlayLink};
use crate::ha::{self, FailureDetector, HostEvent};
use crate::history::History;
use crate::inventory::{
    HostRecord, HostState, Inventory, InventoryError, SiteRecord, ViolinRecord, VmRecord,
};
use crate::lifecycle::VmTemplate;
use crate::migration::depot_stage::{DepotHost, DepotLink};
use crate::migration::stage::ImageDirView;
use crate::migration::{
    DepotStager, LocalCopyStager, MigrationDeps, MigrationPlan, MigrationReport, MigrationSnapshot,
    MigrationStatus, MigrationTuning, Outcome, QuicDepotLink, resume_migration, run_journaled,
};
use crate::policy_loop::config::PolicyConfig;
use viola_api::dashboard::MigrationInFlight;
use viola_api::manager::{HostReport, Response, VmMigrate, VmResize};
use viola_hypervisor::{Connector, CpuCap, CpuTuning, HypervisorError, blocking};

/// One host the manager manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    pub name: String,
    pub site: String,
    /// How the manager reaches its libvirtd.
    pub libvirt_uri: String,
    /// How other hosts' libvirtds reach it (defaults to `libvirt_uri`): `qemu+tls://ADDR/system`
    /// with `migration_tls`.
    pub migration_uri: Option<String>,
    /// The name its libvirt certificate carries, when `migration_uri`'s host (and the address
    /// its QEMU receives migrations on) is not among the certificate's names.
    pub migration_tls_name: Option<String>,
    /// Its image directory as the manager sees it, for direct base staging (used when the
    /// destination's site has no depot or the VM runs from no depot image).
    pub images_local: Option<PathBuf>,
    /// Its overlay daemon's address (the daemon's `listen`), for move announcements over QUIC
    /// with the manager's certificate. Without it the host is taken to run no overlay daemon.
    pub overlay_addr: Option<SocketAddr>,
    /// Its own depot agent's staging address: a `viola-depot` running on this host that lays
    /// images down in this host's image directory only (`hosts = [this host]`), fetching the
    /// parts over the network from its peers with verification. When set, every image this
    /// host needs (a migration's base, a new VM's disk) is staged through it instead of the
    /// site's depot, so no process on another machine writes this host's files.
    pub depot_agent: Option<SocketAddr>,
}

/// `f` of each of `hosts`, by libvirt URI (the name migrations and failures give a host).
fn by_libvirt_uri<T>(hosts: &[HostConfig], f: impl Fn(&HostConfig) -> T) -> BTreeMap<String, T> {
    hosts
        .iter()
        .map(|h| (h.libvirt_uri.clone(), f(h)))
        .collect()
}

/// Where the overlay daemon of each of `hosts` is, by libvirt URI, for the move announcer.
pub(crate) fn overlay_hosts(hosts: &[HostConfig]) -> BTreeMap<String, OverlayHost> {
    by_libvirt_uri(hosts, |h| OverlayHost {
        label: format!("{}/{}", h.site, h.name),
        overlay_addr: h.overlay_addr,
    })
}

/// `viola-adaptmgr` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// Where the web dashboard listens (HTTPS, client certificates from the federation CA,
    /// the manager's identity as server certificate); `None`: no dashboard.
    pub dashboard_listen: Option<SocketAddr>,
    pub identity_dir: PathBuf,
    pub inventory: PathBuf,
    /// A host is declared failed after this long without a report.
    pub heartbeat_timeout_s: u64,
    /// Re-instantiate the VMs of failed hosts elsewhere.
    pub restart_on_failure: bool,
    /// The image directory as the hosts' libvirtds see it (same path on every host).
    pub images_host_dir: PathBuf,
    pub migration_bandwidth_mib_s: u64,
    pub migration_timeout_s: u64,
    /// Longest pause allowed at a migration's switchover.
    pub migration_max_downtime_ms: u64,
    /// Compress RAM on the wire during migrations: fewer WAN bytes for two compression threads
    /// on each side (zstd on two multifd channels; needs QEMU built with zstd, as Debian's is).
    pub migration_compress: bool,
    /// Encrypt and authenticate migrations with TLS (libvirt's `VIR_MIGRATE_TLS`: QEMU's TLS
    /// on the memory, device and disk streams) with the hosts' libvirt certificates from the
    /// federation CA (`viola-ca issue-libvirt`). On by default; off only for hosts without
    /// those certificates, whose migrations then cross the network in the clear.
    pub migration_tls: bool,
    pub hosts: Vec<HostConfig>,
    /// The violins and their member VMs (by name): who must be announced to the overlay when
    /// one of them moves.
    pub violins: Vec<ViolinConfig>,
    /// The depot of each site: a migration to a host of that site stages the VM's base through
    /// it (when the VM's domain records the depot image it runs from; see
    /// `migration::depot_stage`).
    pub depots: Vec<DepotSiteConfig>,
    /// The adaptation policy loop: which policy, in which mode, how often.
    pub policy: PolicyConfig,
    /// How `viola vm create` defines a VM's domain.
    pub vm_template: VmTemplate,
    /// The tenants whose users (certificates of role `user`) may make violins and VMs, with
    /// their quotas; a tenant not listed may do nothing.
    pub tenants: Vec<crate::tenants::TenantConfig>,
    pub guest_requests: crate::guest_requests::GuestRequestConfig,
    /// Replicated managers: this one of several sharing their state in etcd, the elected
    /// leader doing the work ([`crate::replication`]); `None`: one manager, the embedded
    /// store at `inventory`.
    pub replication: Option<crate::replication::ReplicationConfig>,
}

/// One site's depot, as the manager reaches its staging API (QUIC, mutual TLS, with the
/// manager's identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepotSiteConfig {
    pub site: String,
    pub addr: SocketAddr,
}

/// One violin the manager knows about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViolinConfig {
    pub name: String,
    /// 24-bit virtual network id, as in the overlay daemons' configuration.
    pub id: u32,
    #[serde(default)]
    pub vms: Vec<String>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9443)),
            dashboard_listen: None,
            identity_dir: PathBuf::from("/etc/viola/adaptmgr"),
            inventory: PathBuf::from("/var/lib/viola/adaptmgr/inventory.redb"),
            heartbeat_timeout_s: 15,
            restart_on_failure: true,
            images_host_dir: PathBuf::from("/var/lib/libvirt/images"),
            migration_bandwidth_mib_s: 100,
            migration_timeout_s: 600,
            migration_max_downtime_ms: 100,
            migration_compress: false,
            migration_tls: true,
            hosts: Vec::new(),
            violins: Vec::new(),
            depots: Vec::new(),
            policy: PolicyConfig::default(),
            vm_template: VmTemplate::default(),
            tenants: Vec::new(),
            guest_requests: crate::guest_requests::GuestRequestConfig::default(),
            replication: None,
        }
    }
}

/// Why a manager request failed.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no VM named {0:?} in the inventory")]
    UnknownVm(String),
    #[error("no host named {0:?}")]
    UnknownHost(String),
    #[error("{0} is already being migrated")]
    Busy(String),
    #[error("nothing to change: give vcpus, memory, cap or shares")]
    NothingToResize,
    #[error("inventory")]
    Inventory(#[from] InventoryError),
    #[error("hypervisor")]
    Hypervisor(#[from] HypervisorError),
    #[error("migration of {vm} ended {outcome}")]
    MigrationFailed { vm: String, outcome: String },
}

/// Prometheus metrics of the manager.
#[derive(Default)]
pub struct ManagerMetrics {
    pub reports: Counter,
    pub migrations: Family<Vec<(String, String)>, Counter>,
    pub resizes: Counter,
    pub host_failures: Counter,
    pub vm_restarts: Family<Vec<(String, String)>, Counter>,
    pub hosts_up: Gauge,
    pub vms: Gauge,
    pub guest_requests: Family<Vec<(String, String)>, Counter>,
}

impl ManagerMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "viola_adaptmgr_reports",
            "Monitor reports received",
            self.reports.clone(),
        );
        registry.register(
            "viola_adaptmgr_migrations",
            "Migrations by outcome",
            self.migrations.clone(),
        );
        registry.register(
            "viola_adaptmgr_resizes",
            "Resize requests carried out",
            self.resizes.clone(),
        );
        registry.register(
            "viola_adaptmgr_host_failures",
            "Hosts declared failed",
            self.host_failures.clone(),
        );
        registry.register(
            "viola_adaptmgr_vm_restarts",
            "VM re-instantiations by result",
            self.vm_restarts.clone(),
        );
        registry.register(
            "viola_adaptmgr_hosts_up",
            "Hosts currently up",
            self.hosts_up.clone(),
        );
        registry.register(
            "viola_adaptmgr_vms",
            "VMs in the inventory",
            self.vms.clone(),
        );
        registry.register(
            "viola_adaptmgr_guest_requests",
            "Requests from guests (their shepherd channel) by operation and outcome",
            self.guest_requests.clone(),
        );
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Locks `m`, also after a thread panicked while holding it (the data are plain records that a
/// panic cannot leave half-written in a way worse than losing the manager).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A migration that runs now: how to cancel it and what the dashboard shows of it.
struct RunningMigration {
    cancel: CancellationToken,
    view: MigrationInFlight,
}

/// The manager.
pub struct Manager {
    pub cfg: ManagerConfig,
    pub inventory: Arc<Inventory>,
    pub metrics: ManagerMetrics,
    pub(crate) connector: Arc<dyn Connector>,
    /// The depots' staging API (VM creates; migrations go through `stager`).
    pub(crate) depot_link: Arc<dyn DepotLink>,
    /// The overlay daemons' control endpoints (violins pushed; moves go through `announcer`).
    pub(crate) overlays: Arc<dyn OverlayLink>,
    stager: DepotStager,
    announcer: OverlayAnnouncer,
    detector: Mutex<FailureDetector>,
    migrations: Mutex<HashMap<String, RunningMigration>>,
    /// What the dashboard plots (kept in the inventory too, so it survives a restart).
    pub(crate) history: Mutex<History>,
    /// Held while a request reads and rewrites the violins' ids and addresses (`lifecycle`),
    /// so two requests at once never hand out the same one or lose each other's.
    pub(crate) allocation: tokio::sync::Mutex<()>,
    pub(crate) shepherd: Mutex<crate::policy::shepherd::Shepherd>,
}

impl Manager {
    /// Builds the manager and registers the configured sites and hosts in the inventory
    /// (keeping what the inventory already knows about them).
    pub fn new(
        cfg: ManagerConfig,
        inventory: Arc<Inventory>,
        connector: Arc<dyn Connector>,
    ) -> Result<Self, InventoryError> {
        let link = Arc::new(QuicDepotLink::new(cfg.identity_dir.clone()));
        Self::with_depot_link(cfg, inventory, connector, link)
    }

    /// Like [`new`](Self::new), reaching the depots through `link`.
    pub fn with_depot_link(
        cfg: ManagerConfig,
        inventory: Arc<Inventory>,
        connector: Arc<dyn Connector>,
        link: Arc<dyn DepotLink>,
    ) -> Result<Self, InventoryError> {
        let overlays = Arc::new(QuicOverlayLink::new(cfg.identity_dir.clone()));
        Self::with_links(cfg, inventory, connector, link, overlays)
    }

    /// Like [`new`](Self::new), reaching the depots through `depots` and the overlay daemons
    /// through `overlays`.
    pub fn with_links(
        cfg: ManagerConfig,
        inventory: Arc<Inventory>,
        connector: Arc<dyn Connector>,
        link: Arc<dyn DepotLink>,
        overlays: Arc<dyn OverlayLink>,
    ) -> Result<Self, InventoryError> {
        let now = now_ms();
        let mut detector = FailureDetector::new(cfg.heartbeat_timeout_s * 1000);
        let mut views = BTreeMap::new();
        for v in &cfg.violins {
            if let Some(old) = inventory.violin(&v.name)?
                && old.managed
            {
                return Err(InventoryError::Conflict(format!(
                    "violin {:?} of the configuration was made with `viola violin create`; rename one",
                    v.name
                )));
            }
            inventory.put_violin(&ViolinRecord {
                name: v.name.clone(),
                vni: v.id,
                vms: v.vms.clone(),
                ..ViolinRecord::default()
            })?;
        }
        for h in &cfg.hosts {
            inventory.put_site(&SiteRecord {
                name: h.site.clone(),
            })?;
            let mut rec = inventory.host(&h.name)?.unwrap_or(HostRecord {
                name: h.name.clone(),
                site: h.site.clone(),
                libvirt_uri: String::new(),
                migration_uri: String::new(),
                cpus: 0,
                memory_kib: 0,
                state: HostState::Unknown,
                last_heartbeat_ms: None,
                last_report_seq: 0,
                usage: None,
            });
            rec.site = h.site.clone();
            rec.libvirt_uri = h.libvirt_uri.clone();
            rec.migration_uri = h
                .migration_uri
                .clone()
                .unwrap_or_else(|| h.libvirt_uri.clone());
            inventory.put_host(&rec)?;
            // A host that never reported (no monitor yet) is not watched: silence from a host
            // that was never heard cannot mean it failed, and restarting its VMs elsewhere would
            // make a second copy. Its first heartbeat arms the detector.
            if rec.state != HostState::Unknown {
                detector.watch(&h.name, now, matches!(rec.state, HostState::Failed { .. }));
            }
            if let Some(local) = &h.images_local {
                views.insert(
                    h.libvirt_uri.clone(),
                    ImageDirView {
                        host_dir: cfg.images_host_dir.clone(),
                        local_dir: local.clone(),
                    },
                );
            }
        }
        let depots = cfg
            .depots
            .iter()
            .map(|d| (d.site.clone(), d.addr))
            .collect();
        let depot_hosts = by_libvirt_uri(&cfg.hosts, |h| DepotHost {
            name: h.name.clone(),
            site: h.site.clone(),
            agent: h.depot_agent,
        });
        Ok(Self {
            announcer: OverlayAnnouncer::new(
                overlay_hosts(&cfg.hosts),
                Arc::clone(&inventory),
                Arc::clone(&overlays),
            ),
            overlays,
            depot_link: Arc::clone(&link),
            stager: DepotStager::new(LocalCopyStager::new(views), depots, depot_hosts, link),
            detector: Mutex::new(detector),
            migrations: Mutex::new(HashMap::new()),
            history: Mutex::new(inventory.load_history()?),
            allocation: tokio::sync::Mutex::new(()),
            shepherd: Mutex::new(crate::policy::shepherd::Shepherd::new()),
            metrics: ManagerMetrics::default(),
            cfg,
            inventory,
            connector,
        })
    }

    /// Hosts and VMs as the inventory has them (what policies read).
    pub fn snapshot(&self) -> Result<(Vec<HostRecord>, Vec<VmRecord>), InventoryError> {
        Ok((self.inventory.hosts()?, self.inventory.vms()?))
    }

    /// Folds in a monitor report (a heartbeat too); fetches the domain XML of VMs seen for the
    /// first time so they can be re-instantiated should their host fail.
    pub async fn handle_report(&self, report: HostReport) -> Result<(), ManagerError> {
        let now = now_ms();
        self.metrics.reports.inc();
        let inv = Arc::clone(&self.inventory);
        let r = report.clone();
        let fresh = tokio::task::spawn_blocking(move || inv.apply_report(&r, now))
            .await
            .map_err(|e| ManagerError::Hypervisor(HypervisorError::Join(e)))??;
        if fresh {
            let write = lock(&self.history).record(now, &report);
            let inv = Arc::clone(&self.inventory);
            tokio::task::spawn_blocking(move || inv.write_history(&write))
                .await
                .map_err(|e| ManagerError::Hypervisor(HypervisorError::Join(e)))??;
        }
        let event = lock(&self.detector).heartbeat(&report.host, now);
        let mut host = self
            .inventory
            .host(&report.host)?
            .ok_or_else(|| ManagerError::UnknownHost(report.host.clone()))?;
        if host.state != HostState::Up {
            host.state = HostState::Up;
            self.inventory.put_host(&host)?;
        }
        if let Some(HostEvent::Recovered {
            host: name,
            down_ms,
        }) = event
        {
            self.inventory.record(
                now,
                "host_recovered",
                &name,
                serde_json::json!({ "down_ms": down_ms }),
            )?;
            if !host.libvirt_uri.is_empty() {
                let vms = self.inventory.vms()?;
                match ha::fence_returned_host(&self.connector, &host, &vms).await {
                    Ok(removed) if !removed.is_empty() => {
                        self.inventory.record(
                            now_ms(),
                            "stale_copies_removed",
                            &name,
                            serde_json::json!({ "vms": removed }),
                        )?;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(host = %name, error = %viola_common::errors::chain(&e), "fencing failed")
                    }
                }
            }
        }
        for vm in &report.vms {
            let missing = self
                .inventory
                .vm(&vm.name)?
                .is_none_or(|r| r.domain_xml.is_none());
            if missing && !host.libvirt_uri.is_empty() {
                self.capture_definition(&host, &vm.name).await;
            }
        }
        self.refresh_gauges()?;
        Ok(())
    }

    async fn capture_definition(&self, host: &HostRecord, vm: &str) {
        let c = Arc::clone(&self.connector);
        let uri = host.libvirt_uri.clone();
        let name = vm.to_owned();
        let got = tokio::task::spawn_blocking(move || {
            let hv = c.open(&uri)?;
            hv.domain_xml(&name)
        })
        .await;
        if let Ok(Ok(xml)) = got
            && let Ok(Some(mut rec)) = self.inventory.vm(vm)
        {
            rec.domain_xml = Some(xml);
            if let Err(e) = self.inventory.put_vm(&rec) {
                tracing::warn!(vm, error = %e, "cannot store domain XML");
            }
        }
    }

    fn refresh_gauges(&self) -> Result<(), InventoryError> {
        let hosts = self.inventory.hosts()?;
        self.metrics
            .hosts_up
            .set(hosts.iter().filter(|h| h.state == HostState::Up).count() as i64);
        self.metrics.vms.set(self.inventory.vms()?.len() as i64);
        Ok(())
    }

    fn host_of(&self, name: &str) -> Result<HostRecord, ManagerError> {
        self.inventory
            .host(name)?
            .filter(|h| !h.libvirt_uri.is_empty())
            .ok_or_else(|| ManagerError::UnknownHost(name.to_owned()))
    }

    /// Removes a VM's CPU cap where it runs (what `cap_percent: None` in the inventory says).
    pub async fn remove_cap(&self, vm: &str) -> Result<(), ManagerError> {
        let rec = self
            .inventory
            .vm(vm)?
            .ok_or_else(|| ManagerError::UnknownVm(vm.to_owned()))?;
        let host = self.host_of(&rec.host)?;
        let c = Arc::clone(&self.connector);
        let uri = host.libvirt_uri.clone();
        let hv = tokio::task::spawn_blocking(move || c.open(&uri))
            .await
            .map_err(|e| ManagerError::Hypervisor(HypervisorError::Join(e)))??;
        let name = vm.to_owned();
        let uncapped = CpuTuning {
            shares: None,
            cap: Some(CpuCap::UNLIMITED),
        };
        blocking(&hv, move |h| h.set_cpu_tuning(&name, uncapped)).await?;
        if let Some(mut now) = self.inventory.vm(vm)? {
            now.cap_percent = None;
            self.inventory.put_vm(&now)?;
        }
        self.inventory
            .record(now_ms(), "vm_uncapped", vm, serde_json::Value::Null)?;
        Ok(())
    }

    /// Resizes a VM where it runs.
    pub async fn resize(&self, req: VmResize) -> Result<(), ManagerError> {
        if req.vcpus.is_none()
            && req.memory_mib.is_none()
            && req.cap_percent.is_none()
            && req.shares.is_none()
        {
            return Err(ManagerError::NothingToResize);
        }
        let vm = self
            .inventory
            .vm(&req.vm)?
            .ok_or_else(|| ManagerError::UnknownVm(req.vm.clone()))?;
        let host = self.host_of(&vm.host)?;
        let c = Arc::clone(&self.connector);
        let uri = host.libvirt_uri.clone();
        let hv = tokio::task::spawn_blocking(move || c.open(&uri))
            .await
            .map_err(|e| ManagerError::Hypervisor(HypervisorError::Join(e)))??;
        if let Some(n) = req.vcpus {
            let name = req.vm.clone();
            blocking(&hv, move |h| h.set_vcpus(&name, n)).await?;
        }
        if let Some(mib) = req.memory_mib {
            let name = req.vm.clone();
            blocking(&hv, move |h| h.set_memory(&name, mib * 1024)).await?;
        }
        if req.cap_percent.is_some() || req.shares.is_some() {
            let tuning = CpuTuning {
                shares: req.shares,
                cap: req.cap_percent.map(CpuCap::percent),
            };
            let name = req.vm.clone();
            blocking(&hv, move |h| h.set_cpu_tuning(&name, tuning)).await?;
            if let Some(cap) = req.cap_percent
                && let Some(mut rec) = self.inventory.vm(&req.vm)?
            {
                // What the policies see as the VM's cap (`observe`).
                rec.cap_percent = Some(cap);
                self.inventory.put_vm(&rec)?;
            }
        }
        self.metrics.resizes.inc();
        self.inventory.record(
            now_ms(),
            "vm_resized",
            &req.vm,
            serde_json::to_value(&req).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// Migrates a VM; progress goes to `progress` (dropped if the receiver is slow or gone).
    pub async fn migrate(
        &self,
        req: VmMigrate,
        progress: mpsc::Sender<Response>,
        cancel: CancellationToken,
    ) -> Result<MigrationReport, ManagerError> {
        let vm = self
            .inventory
            .vm(&req.vm)?
            .ok_or_else(|| ManagerError::UnknownVm(req.vm.clone()))?;
        let from = self.host_of(&vm.host)?;
        let to = self.host_of(&req.to_host)?;
        {
            let mut running = lock(&self.migrations);
            if running.contains_key(&req.vm) {
                return Err(ManagerError::Busy(req.vm.clone()));
            }
            running.insert(
                req.vm.clone(),
                RunningMigration {
                    cancel: cancel.clone(),
                    view: MigrationInFlight {
                        vm: req.vm.clone(),
                        from: from.name.clone(),
                        to: to.name.clone(),
                        started_ms: now_ms(),
                        status: MigrationStatus::default(),
                    },
                },
            );
        }
        let plan = MigrationPlan {
            vm: req.vm.clone(),
            source_uri: from.libvirt_uri.clone(),
            dest_uri: to.libvirt_uri.clone(),
            dest_migration_uri: to.migration_uri.clone(),
            stage_base: req.stage_base,
            timeout_ms: req.timeout_s.unwrap_or(self.cfg.migration_timeout_s) * 1000,
            tuning: MigrationTuning {
                bandwidth_mib_s: Some(
                    req.bandwidth_mib_s
                        .unwrap_or(self.cfg.migration_bandwidth_mib_s),
                ),
                max_downtime_ms: Some(self.cfg.migration_max_downtime_ms),
                compress: self.cfg.migration_compress,
                tls: self.cfg.migration_tls,
                tls_destination: self
                    .cfg
                    .hosts
                    .iter()
                    .find(|h| h.name == req.to_host)
                    .and_then(|h| h.migration_tls_name.clone()),
            },
        };
        let deps = self.migration_deps();
        let (tx, mut rx) = watch::channel(MigrationStatus::default());
        let forward = async {
            while rx.changed().await.is_ok() {
                let status = rx.borrow_and_update().clone();
                if let Some(m) = lock(&self.migrations).get_mut(&req.vm) {
                    m.view.status = status.clone();
                }
                let _ = progress.try_send(Response::Progress(status));
            }
        };
        let vm_name = req.vm.clone();
        let run = async move {
            let report = run_journaled(plan, &deps, &tx, &cancel, |snap| {
                self.journal(&vm_name, snap)
            })
            .await;
            drop(tx); // ends the forwarder
            report
        };
        let (report, ()) = tokio::join!(run, forward);
        lock(&self.migrations).remove(&req.vm);
        self.finish_migration(&req.vm, &report)?;
        Ok(report)
    }

    fn migration_deps(&self) -> MigrationDeps<DepotStager, OverlayAnnouncer> {
        MigrationDeps {
            connector: Arc::clone(&self.connector),
            stager: self.stager.clone(),
            announcer: self.announcer.clone(),
            poll_interval: Duration::from_millis(500),
            reconnect_timeout: Duration::from_secs(60),
        }
    }

    /// Keeps the migration's latest snapshot in the inventory, for [`Self::resume_migrations`].
    fn journal(&self, vm: &str, snapshot: &MigrationSnapshot) {
        if let Err(e) = self.inventory.put_migration(vm, snapshot) {
            tracing::warn!(%vm, error = %viola_common::errors::chain(&e), "cannot journal the migration");
        }
    }

    /// Records a migration's end: event, metrics, the VM's new host, the journal entry gone.
    fn finish_migration(&self, vm: &str, report: &MigrationReport) -> Result<(), ManagerError> {
        let outcome = match &report.outcome {
            Outcome::Migrated { .. } => "migrated",
            Outcome::RolledBack { .. } => "rolled_back",
            Outcome::Stuck { .. } => "stuck",
        };
        self.metrics
            .migrations
            .get_or_create(&vec![("outcome".to_owned(), outcome.to_owned())])
            .inc();
        self.inventory.record(
            now_ms(),
            "migration",
            vm,
            serde_json::to_value(report).unwrap_or_default(),
        )?;
        if let Outcome::Migrated { .. } = report.outcome
            && let Some(mut rec) = self.inventory.vm(vm)?
            && let Some(to) = self
                .inventory
                .hosts()?
                .into_iter()
                .find(|h| h.libvirt_uri == report.plan.dest_uri)
        {
            rec.host = to.name;
            self.inventory.put_vm(&rec)?;
        }
        self.inventory.remove_migration(vm)?;
        Ok(())
    }

    /// Finishes or rolls back the migrations a previous manager left in progress (it stopped
    /// or crashed during them), so that each VM again runs at exactly one place and nothing
    /// half-made stays behind. Call once at start, before serving requests for those VMs.
    pub async fn resume_migrations(&self) -> Result<Vec<MigrationReport>, ManagerError> {
        let pending: Vec<MigrationSnapshot> = self.inventory.migrations()?;
        let mut reports = Vec::new();
        for snap in pending {
            let vm = snap.plan().vm.clone();
            let cancel = CancellationToken::new();
            {
                let mut running = lock(&self.migrations);
                if running.contains_key(&vm) {
                    continue;
                }
                let host_named = |uri: &str| {
                    self.cfg
                        .hosts
                        .iter()
                        .find(|h| h.libvirt_uri == uri)
                        .map_or_else(|| uri.to_owned(), |h| h.name.clone())
                };
                running.insert(
                    vm.clone(),
                    RunningMigration {
                        cancel,
                        view: MigrationInFlight {
                            vm: vm.clone(),
                            from: host_named(&snap.plan().source_uri),
                            to: host_named(&snap.plan().dest_uri),
                            started_ms: now_ms(),
                            status: MigrationStatus {
                                step: "resuming after a manager restart".into(),
                                ..MigrationStatus::default()
                            },
                        },
                    },
                );
            }
            tracing::warn!(%vm, "resuming a migration the previous manager left in progress");
            let deps = self.migration_deps();
            let (tx, _rx) = watch::channel(MigrationStatus::default());
            let report = resume_migration(snap, &deps, &tx, |s| self.journal(&vm, s)).await;
            lock(&self.migrations).remove(&vm);
            tracing::info!(%vm, outcome = ?report.outcome, "interrupted migration resolved");
            self.finish_migration(&vm, &report)?;
            reports.push(report);
        }
        Ok(reports)
    }

    /// The VMs whose migration runs now.
    pub fn migrating_vms(&self) -> BTreeSet<String> {
        lock(&self.migrations).keys().cloned().collect()
    }

    /// Cancels the running migration of `vm`; false if none runs.
    pub fn cancel_migration(&self, vm: &str) -> bool {
        lock(&self.migrations)
            .get(vm)
            .map(|m| m.cancel.cancel())
            .is_some()
    }

    /// The migrations that run now, as the dashboard shows them.
    pub fn migrations_in_flight(&self) -> Vec<MigrationInFlight> {
        let mut out: Vec<MigrationInFlight> = lock(&self.migrations)
            .values()
            .map(|m| m.view.clone())
            .collect();
        out.sort_by_key(|m| m.started_ms);
        out
    }

    /// Declares silent hosts failed and re-instantiates their VMs elsewhere. Call periodically.
    pub async fn ha_tick(&self) -> Result<(), ManagerError> {
        let now = now_ms();
        let events = lock(&self.detector).poll(now);
        for event in events {
            let HostEvent::Failed { host, last_seen_ms } = event else {
                continue;
            };
            self.metrics.host_failures.inc();
            tracing::warn!(%host, last_seen_ms, "host declared failed");
            if let Some(mut rec) = self.inventory.host(&host)? {
                rec.state = HostState::Failed { since_ms: now };
                self.inventory.put_host(&rec)?;
            }
            self.inventory.record(
                now,
                "host_failed",
                &host,
                serde_json::json!({ "last_seen_ms": last_seen_ms }),
            )?;
            if self.cfg.restart_on_failure {
                self.restart_vms_of(&host).await?;
            }
        }
        self.refresh_gauges()?;
        Ok(())
    }

    async fn restart_vms_of(&self, failed: &str) -> Result<(), ManagerError> {
        fn failed_host<'a>(hosts: &'a [HostRecord], name: &str) -> Option<&'a HostRecord> {
            hosts.iter().find(|h| h.name == name)
        }
        let hosts = self.inventory.hosts()?;
        let vms = self.inventory.vms()?;
        let (placed, unplaced) = ha::plan_restarts(failed, &hosts, &vms);
        let live: Vec<HostRecord> = hosts
            .iter()
            .filter(|h| h.state == HostState::Up)
            .cloned()
            .collect();
        for name in unplaced {
            self.inventory.record(
                now_ms(),
                "vm_restart_failed",
                &name,
                serde_json::json!({ "from": failed, "reason": "no host has room" }),
            )?;
        }
        for r in placed {
            let (Some(vm), Some(to)) = (
                vms.iter().find(|v| v.name == r.vm),
                hosts.iter().find(|h| h.name == r.to_host),
            ) else {
                continue;
            };
            // Fencing: a host whose monitor fell silent may still run the VM (the monitor died,
            // or the network to the manager did). Restarting it elsewhere would make two copies.
            match ha::probe_vm_at(&self.connector, failed_host(&hosts, failed), &vm.name).await {
                probe @ (ha::Probe::Running | ha::Probe::Unsure) => {
                    let reason = if probe == ha::Probe::Running {
                        "the silent host's hypervisor answers and the VM runs there"
                    } else {
                        "the silent host's hypervisor answers with an error"
                    };
                    tracing::warn!(vm = %vm.name, host = failed, reason, "VM not restarted");
                    self.inventory.record(
                        now_ms(),
                        "vm_restart_skipped",
                        &vm.name,
                        serde_json::json!({ "from": failed, "reason": reason }),
                    )?;
                    continue;
                }
                ha::Probe::NotRunning | ha::Probe::Unreachable => {}
            }
            // Told before the VM starts, so its first frames from the new host are taken.
            if let Err(reason) = self
                .announcer
                .announce_restart(&vm.name, &vm.macs, &to.libvirt_uri)
                .await
            {
                tracing::warn!(vm = %vm.name, to = %to.name, %reason,
                    "the overlay daemons were not told of the restart");
            }
            let result = ha::restart_vm(&self.connector, &self.stager, vm, to, &live).await;
            let ok = result.is_ok();
            self.metrics
                .vm_restarts
                .get_or_create(&vec![(
                    "result".to_owned(),
                    if ok { "ok" } else { "failed" }.to_owned(),
                )])
                .inc();
            match result {
                Ok(()) => {
                    let mut rec = vm.clone();
                    rec.host = to.name.clone();
                    self.inventory.put_vm(&rec)?;
                    self.inventory.record(
                        now_ms(),
                        "vm_restarted",
                        &vm.name,
                        serde_json::json!({ "from": failed, "to": to.name }),
                    )?;
                    tracing::info!(vm = %vm.name, from = failed, to = %to.name, "VM re-instantiated");
                }
                Err(e) => {
                    let reason = viola_common::errors::chain(&e);
                    tracing::warn!(vm = %vm.name, %reason, "re-instantiation failed");
                    self.inventory.record(
                        now_ms(),
                        "vm_restart_failed",
                        &vm.name,
                        serde_json::json!({ "from": failed, "to": to.name, "reason": reason }),
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn violins_and_their_members_come_from_the_config_and_typos_are_refused() {
        let cfg: ManagerConfig = viola_common::config::parse(
            "heartbeat_timeout_s = 6\n[[violins]]\nname = \"demo\"\nid = 1\nvms = [\"g1\", \"g2\"]\n",
        )
        .unwrap();
        assert_eq!(
            cfg.violins,
            vec![ViolinConfig {
                name: "demo".into(),
                id: 1,
                vms: vec!["g1".into(), "g2".into()],
            }]
        );
        assert_eq!(cfg.heartbeat_timeout_s, 6);
        let err = viola_common::config::parse::<ManagerConfig>(
            "[[violins]]\nname = \"demo\"\nid = 1\nmembers = [\"g1\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("members"), "{err}");
    }

    #[test]
    fn depots_per_site_come_from_the_config_and_typos_are_refused() {
        let cfg: ManagerConfig =
            viola_common::config::parse("[[depots]]\nsite = \"b\"\naddr = \"198.18.2.11:7410\"\n")
                .unwrap();
        assert_eq!(
            cfg.depots,
            vec![DepotSiteConfig {
                site: "b".into(),
                addr: "198.18.2.11:7410".parse().unwrap(),
            }]
        );
        assert!(ManagerConfig::default().depots.is_empty());
        let err = viola_common::config::parse::<ManagerConfig>(
            "[[depots]]\nsite = \"b\"\naddress = \"198.18.2.11:7410\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("address"), "{err}");
    }
}

/// Host failure and fencing, on the fake hypervisor: a restart must never make a second copy.
#[cfg(test)]
mod ha_tests {
    use super::*;
    use viola_hypervisor::fake::FakeCluster;

    const HOSTS: [&str; 3] = ["a1", "a2", "b1"];

    async fn report(m: &Manager, host: &str, seq: u64, vms: &[&str]) {
        m.handle_report(crate::fixtures::host_report(host, seq, vms))
            .await
            .unwrap();
    }

    /// vm1 runs on a1; a1 and a2 have reported once, b1 never (it has no monitor).
    async fn federation(dir: &std::path::Path) -> (FakeCluster, Manager, Arc<Inventory>) {
        let (cluster, _) = crate::fixtures::federation_with_vm1_on_a1();
        let cfg = ManagerConfig {
            hosts: HOSTS
                .iter()
                .map(|h| crate::fixtures::fake_host(h, &h[..1]))
                .collect(),
            heartbeat_timeout_s: 1,
            ..ManagerConfig::default()
        };
        let inventory = Arc::new(Inventory::open(&dir.join("inv.redb")).unwrap());
        let m = Manager::new(cfg, Arc::clone(&inventory), Arc::new(cluster.clone())).unwrap();
        report(&m, "a1", 1, &["vm1"]).await;
        report(&m, "a2", 1, &[]).await;
        (cluster, m, inventory)
    }

    /// a1 falls silent (a2 keeps reporting); the next HA tick after the timeout.
    async fn a1_falls_silent(m: &Manager) {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        report(m, "a2", 2, &[]).await;
        m.ha_tick().await.unwrap();
    }

    fn events(inventory: &Inventory, kind: &str) -> Vec<String> {
        inventory
            .events_after(0)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.subject)
            .collect()
    }

    #[tokio::test]
    async fn a_silent_host_whose_hypervisor_still_runs_the_vm_keeps_the_only_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, m, inventory) = federation(dir.path()).await;
        a1_falls_silent(&m).await;
        // a1 is declared failed, but its libvirt answers that vm1 runs there: no restart.
        assert_eq!(events(&inventory, "host_failed"), vec!["a1".to_owned()]);
        assert_eq!(
            events(&inventory, "vm_restart_skipped"),
            vec!["vm1".to_owned()]
        );
        assert_eq!(cluster.hosts_running("vm1"), vec!["fake://a1".to_owned()]);
        assert_eq!(inventory.vm("vm1").unwrap().unwrap().host, "a1");
    }

    #[tokio::test]
    async fn a_dead_host_s_vm_is_restarted_once_and_a_host_never_heard_from_is_not_failed() {
        let dir = tempfile::tempdir().unwrap();
        let (cluster, m, inventory) = federation(dir.path()).await;
        cluster.set_host_up("fake://a1", false);
        a1_falls_silent(&m).await;
        // b1 never reported: silence from it means nothing, so it is not declared failed.
        assert_eq!(events(&inventory, "host_failed"), vec!["a1".to_owned()]);
        assert_eq!(events(&inventory, "vm_restarted"), vec!["vm1".to_owned()]);
        let now_at = inventory.vm("vm1").unwrap().unwrap().host;
        assert_ne!(now_at, "a1");
        assert!(
            cluster
                .hosts_running("vm1")
                .contains(&format!("fake://{now_at}"))
        );
    }
}
