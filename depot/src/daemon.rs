//! The depot daemon: serves parts to other depots, stages images for the adaptation manager.
//!
//! Staging a VM: resolve the manifest (locally, else from a peer depot; validated, and its
//! hash checked when asked for by hash), ask every peer which parts it holds, predict the ready
//! time with the planner (answered at once), fetch the missing parts from all holders at once
//! (verified, resumable), assemble the chain in the host's image directory and create the VM's
//! overlay. Jobs run in one supervised task set, bounded in number, cancelled at shutdown.
//!
//! It also lists its images (`images`) and receives images from the adaptation manager
//! (`upload`: [`crate::upload`], bounded in size and in number at once, stopped at shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use viola_common::identity::{self, Identity, alpn};
use viola_common::metrics::SharedRegistry;

use crate::api::{StageRequest, StageState, StageStatus};
use crate::chunker::ChunkerSpec;
use crate::hash::Hash;
use crate::manifest::{self, Manifest};
use crate::planner::{self, LinkSpec, PartSpec, ProgressSpec, Scenario, SiteSpec, VmSpec};
use crate::store::Store;
use crate::transfer::{self, FetchOptions, PathTuning, Services, Source, Stager, transport_config};
use crate::upload::{UploadCounters, UploadLimits, Uploads};

/// A peer depot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub site: String,
    pub addr: SocketAddr,
    /// Expected rate from that depot to us, Mbit/s (for planning); the path default if absent.
    pub rate_mbit: Option<f64>,
}

/// `viola-depot serve` configuration (TOML; unknown keys rejected).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DepotConfig {
    pub site: String,
    pub store: PathBuf,
    pub listen: SocketAddr,
    /// Directory with cert.pem, key.pem, ca.pem (role depot).
    pub identity_dir: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    /// Image directory of a host; `{host}` is replaced by the host name.
    pub image_dir_template: String,
    /// Hosts this depot stages for (empty: any).
    pub hosts: Vec<String>,
    pub peers: Vec<PeerConfig>,
    /// Path properties for flow-control windows and planning.
    pub path: PathTuning,
    pub streams_per_source: usize,
    pub range_chunks: usize,
    /// Local assembly rate for predictions, bytes/s.
    pub assembly_bytes_per_sec: f64,
    pub chunker: ChunkerSpec,
    /// Concurrent staging jobs.
    pub max_jobs: usize,
    /// Largest image accepted by `upload`, bytes (refused before any byte above it).
    pub upload_max_bytes: u64,
    /// Uploads received at once (each holds a temp file in the store until imported).
    pub max_uploads: usize,
}

impl Default for DepotConfig {
    fn default() -> Self {
        Self {
            site: "a".into(),
            store: "/var/lib/viola/depot".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7410)),
            identity_dir: "/etc/viola/depot".into(),
            metrics_listen: None,
            image_dir_template: "/var/lib/viola-lab/images/{host}".into(),
            hosts: Vec::new(),
            peers: Vec::new(),
            path: PathTuning::default(),
            streams_per_source: 8,
            range_chunks: 64,
            assembly_bytes_per_sec: 400e6,
            chunker: ChunkerSpec::default(),
            max_jobs: 16,
            upload_max_bytes: crate::upload::DEFAULT_MAX_BYTES,
            max_uploads: UploadLimits::default().max_concurrent,
        }
    }
}

/// A depot configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "image_dir_template {template:?} has no {{host}}: that is one host's own image directory \
         (a depot agent on that host), so `hosts` must name exactly that host, not {hosts:?}"
    )]
    SharedImageDir {
        template: String,
        hosts: Vec<String>,
    },
}

impl DepotConfig {
    /// Checks what parsing cannot: a template without `{host}` is a host-local depot agent's
    /// own image directory, which must serve exactly one host (else two hosts' images would
    /// land in one directory, or an agent would write for a host it does not run on).
    pub fn check(&self) -> Result<(), ConfigError> {
        if !self.image_dir_template.contains("{host}") && self.hosts.len() != 1 {
            return Err(ConfigError::SharedImageDir {
                template: self.image_dir_template.clone(),
                hosts: self.hosts.clone(),
            });
        }
        Ok(())
    }
}

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("configuration")]
    Config(#[from] ConfigError),
    #[error("identity")]
    Identity(#[from] identity::LoadError),
    #[error("TLS configuration")]
    Tls(#[from] identity::TlsConfigError),
    #[error("store")]
    Store(#[from] crate::store::StoreError),
    #[error("listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics endpoint")]
    Metrics(#[from] viola_common::metrics::MetricsError),
}

#[derive(Default, Clone)]
struct Metrics {
    bytes_fetched: Counter,
    bad_chunks: Counter,
    stage_requests: Counter,
    stages_ready: Counter,
    stages_failed: Counter,
    jobs_running: Gauge,
    uploads: UploadCounters,
}

impl Metrics {
    fn register(&self, reg: &SharedRegistry) {
        let mut r = reg.lock().unwrap_or_else(|p| p.into_inner());
        r.register(
            "viola_depot_bytes_fetched",
            "Verified bytes fetched from other depots",
            self.bytes_fetched.clone(),
        );
        r.register(
            "viola_depot_bad_chunks",
            "Chunks discarded because they failed verification",
            self.bad_chunks.clone(),
        );
        r.register(
            "viola_depot_stage_requests",
            "Staging requests received",
            self.stage_requests.clone(),
        );
        r.register(
            "viola_depot_stages_ready",
            "Staging requests completed",
            self.stages_ready.clone(),
        );
        r.register(
            "viola_depot_stages_failed",
            "Staging requests failed",
            self.stages_failed.clone(),
        );
        r.register(
            "viola_depot_jobs_running",
            "Staging jobs in progress",
            self.jobs_running.clone(),
        );
        r.register(
            "viola_depot_uploads_ok",
            "Uploads imported and named",
            self.uploads.ok.clone(),
        );
        r.register(
            "viola_depot_uploads_refused",
            "Uploads refused (role, name, size, space, busy, or the image itself)",
            self.uploads.refused.clone(),
        );
        r.register(
            "viola_depot_uploads_failed",
            "Uploads that failed otherwise (stream broken or short, import error, shutdown)",
            self.uploads.failed.clone(),
        );
        r.register(
            "viola_depot_bytes_uploaded",
            "Bytes of uploads imported",
            self.uploads.bytes.clone(),
        );
    }
}

struct Inner {
    cfg: DepotConfig,
    store: Store,
    endpoint: quinn::Endpoint,
    stages: Mutex<HashMap<String, StageStatus>>,
    jobs: mpsc::Sender<(String, StageRequest)>,
    metrics: Metrics,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct StagerImpl(Arc<Inner>);

impl Stager for StagerImpl {
    fn stage(&self, req: StageRequest) -> StageStatus {
        let inner = &self.0;
        inner.metrics.stage_requests.inc();
        let mut st = StageStatus {
            stage_id: format!("{}-{:08x}", req.vm, rand::random::<u32>()),
            state: StageState::Resolving,
            accepted: false,
            predicted_ready_unix_ms: None,
            ready_unix_ms: None,
            deadline_unix_ms: req.deadline_unix_ms,
            bytes_total: 0,
            bytes_done: 0,
            overlay: None,
            chain: Vec::new(),
            message: String::new(),
        };
        let bad = manifest::validate_name(&req.vm)
            .err()
            .map(|e| e.to_string())
            .or_else(|| {
                identity::PeerIdentity::new(identity::Role::Depot, "x", &req.host)
                    .err()
                    .map(|_| format!("bad host name {:?}", req.host))
            })
            .or_else(|| {
                (!inner.cfg.hosts.is_empty() && !inner.cfg.hosts.contains(&req.host)).then(|| {
                    format!(
                        "host {} is not served by depot {}",
                        req.host, inner.cfg.site
                    )
                })
            });
        if let Some(msg) = bad {
            st.state = StageState::Rejected;
            st.message = msg;
            return st;
        }
        // Recorded before the job is queued: a job that plans at once updates this entry, and
        // an insert after it would put back `resolving`, not accepted (a staging that worked
        // then looked refused).
        if let Ok(mut m) = inner.stages.lock() {
            m.insert(st.stage_id.clone(), st.clone());
        }
        if let Err(e) = inner.jobs.try_send((st.stage_id.clone(), req)) {
            st.state = StageState::Rejected;
            st.message = format!("depot busy: {e}");
            if let Ok(mut m) = inner.stages.lock() {
                m.insert(st.stage_id.clone(), st.clone());
            }
            return st;
        }
        st
    }

    fn status(&self, stage_id: &str) -> Option<StageStatus> {
        self.0
            .stages
            .lock()
            .ok()
            .and_then(|m| m.get(stage_id).cloned())
    }
}

fn update(inner: &Inner, id: &str, f: impl FnOnce(&mut StageStatus)) {
    if let Ok(mut m) = inner.stages.lock()
        && let Some(st) = m.get_mut(id)
    {
        f(st);
    }
}

/// Runs the daemon until `token` is cancelled.
pub async fn run(
    cfg: DepotConfig,
    identity: Identity,
    registry: SharedRegistry,
    token: CancellationToken,
) -> Result<(), DaemonError> {
    cfg.check()?;
    let store = Store::open(&cfg.store)?;
    let mut server = identity.server_config(&[alpn::DEPOT])?;
    let transport = Arc::new(transport_config(cfg.path));
    server.transport_config(transport.clone());
    let mut endpoint =
        transfer::endpoint(cfg.listen, Some(server), cfg.path).map_err(|source| {
            DaemonError::Listen {
                addr: cfg.listen,
                source,
            }
        })?;
    let mut client = identity.client_config(alpn::DEPOT)?;
    client.transport_config(transport);
    endpoint.set_default_client_config(client);
    tracing::info!(site = %cfg.site, listen = %cfg.listen, store = %cfg.store.display(), "depot serving");
    let metrics = Metrics::default();
    metrics.register(&registry);
    let (jobs_tx, mut jobs_rx) = mpsc::channel(cfg.max_jobs.max(1) * 4);
    let inner = Arc::new(Inner {
        cfg: cfg.clone(),
        store: store.clone(),
        endpoint: endpoint.clone(),
        stages: Mutex::new(HashMap::new()),
        jobs: jobs_tx,
        metrics,
    });
    let uploads = Uploads::new(
        store.clone(),
        cfg.chunker,
        UploadLimits {
            max_bytes: cfg.upload_max_bytes,
            max_concurrent: cfg.max_uploads,
            ..UploadLimits::default()
        },
        token.clone(),
        inner.metrics.uploads.clone(),
    );
    let services = Services {
        stager: Some(Arc::new(StagerImpl(inner.clone()))),
        uploads: Some(Arc::new(uploads)),
    };
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = cfg.metrics_listen {
        let (bound, fut) =
            viola_common::metrics::serve(addr, registry.clone(), token.clone()).await?;
        tracing::info!(%bound, "metrics endpoint");
        tasks.spawn(fut);
    }
    let mut conns = tokio::task::JoinSet::new();
    let mut jobs = tokio::task::JoinSet::new();
    let job_limit = Arc::new(tokio::sync::Semaphore::new(cfg.max_jobs.max(1)));
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            inc = endpoint.accept() => {
                let Some(inc) = inc else { break };
                let (store, services) = (store.clone(), services.clone());
                let identity = identity.clone();
                conns.spawn(async move {
                    match inc.await {
                        Ok(conn) => tokio::select! {
                            () = transfer::serve_connection(store, conn.clone(), services) => {}
                            () = identity.until_revoked(&conn) => {
                                conn.close(identity::CLOSE_REVOKED.into(), b"revoked");
                            }
                        },
                        Err(e) => tracing::debug!(error = %viola_common::errors::chain(&e), "handshake failed"),
                    }
                });
            }
            job = jobs_rx.recv() => {
                let Some((id, req)) = job else { break };
                let inner = inner.clone();
                let permit = job_limit.clone();
                jobs.spawn(async move {
                    let Ok(_permit) = permit.acquire_owned().await else { return };
                    inner.metrics.jobs_running.inc();
                    let result = stage_job(&inner, &id, &req).await;
                    inner.metrics.jobs_running.dec();
                    match result {
                        Ok(()) => { inner.metrics.stages_ready.inc(); }
                        Err(msg) => {
                            inner.metrics.stages_failed.inc();
                            tracing::warn!(stage = %id, error = %msg, "staging failed");
                            update(&inner, &id, |st| { st.state = StageState::Failed; st.message = msg; });
                        }
                    };
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
        }
    }
    endpoint.close(0u32.into(), b"shutting down");
    jobs.shutdown().await;
    conns.shutdown().await;
    token.cancel();
    while tasks.join_next().await.is_some() {}
    endpoint.wait_idle().await;
    tracing::info!("depot stopped");
    Ok(())
}

/// Connections to every reachable peer (unreachable peers are logged and skipped).
async fn peer_sources(inner: &Inner) -> Vec<(PeerConfig, Source)> {
    let mut out = Vec::new();
    for p in &inner.cfg.peers {
        match crate::client::connect_on(&inner.endpoint, p.addr).await {
            Ok((conn, peer)) if peer.site == p.site => {
                let name = format!("{}/{}", peer.site, peer.host);
                out.push((p.clone(), Source { name, conn }))
            }
            Ok((_, peer)) => {
                tracing::warn!(expected = %p.site, site = %peer.site, addr = %p.addr, "peer certificate names another site; skipped")
            }
            Err(e) => {
                tracing::warn!(peer = %p.site, error = %viola_common::errors::chain(&e), "peer unreachable")
            }
        }
    }
    out
}

async fn stage_job(inner: &Inner, id: &str, req: &StageRequest) -> Result<(), String> {
    let chain = |e: &(dyn std::error::Error + 'static)| viola_common::errors::chain(e);
    let peers = peer_sources(inner).await;
    // 1. The manifest.
    let m: Manifest = match inner.store.resolve(&req.image) {
        Ok((_, m)) => m,
        Err(_) => {
            let mut found = None;
            for (_, s) in &peers {
                match transfer::fetch_manifest(&s.conn, &req.image).await {
                    Ok(m) => {
                        if let Ok(h) = req.image.parse::<Hash>()
                            && m.hash() != h
                        {
                            tracing::warn!(peer = %s.name, "manifest does not match the requested hash");
                            continue;
                        }
                        found = Some(m);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(peer = %s.name, error = %chain(&e), "no manifest there")
                    }
                }
            }
            let m = found
                .ok_or_else(|| format!("image {:?} is not known here or at any peer", req.image))?;
            inner.store.put_manifest(&m).map_err(|e| chain(&e))?;
            m
        }
    };
    // 2. Who holds what.
    let missing: Vec<Hash> = m
        .parts
        .iter()
        .map(|p| p.id)
        .filter(|p| !inner.store.has_part(p))
        .collect();
    let mut holders: HashMap<Hash, Vec<Source>> = HashMap::new();
    for (_, s) in &peers {
        if missing.is_empty() {
            break;
        }
        match transfer::have(&s.conn, &missing).await {
            Ok(v) => {
                for (p, yes) in missing.iter().zip(v) {
                    if yes {
                        holders.entry(*p).or_default().push(s.clone());
                    }
                }
            }
            Err(e) => tracing::warn!(peer = %s.name, error = %chain(&e), "have query failed"),
        }
    }
    // 3. Prediction.
    let bytes_total: u64 = m
        .parts
        .iter()
        .filter(|p| missing.contains(&p.id))
        .map(|p| p.size)
        .sum();
    let sc = single_vm_scenario(inner, req, &m, &missing, &holders, &peers);
    let predicted = planner::plan(&sc).ok().and_then(|p| p.vms.first().cloned());
    let accepted = predicted.as_ref().is_some_and(|v| v.meets_deadline);
    let predicted_ms = predicted
        .as_ref()
        .and_then(|v| v.ready_at)
        .map(|t| (t * 1000.0) as u64);
    update(inner, id, |st| {
        st.accepted = accepted;
        st.predicted_ready_unix_ms = predicted_ms;
        st.bytes_total = bytes_total;
        st.state = StageState::Fetching;
        st.message = predicted
            .as_ref()
            .map(|v| v.reason.clone())
            .unwrap_or_default();
    });
    if req.reject_if_late && !accepted {
        update(inner, id, |st| st.state = StageState::Rejected);
        return Ok(());
    }
    // 4. Fetch every missing part from all its holders.
    let progress = Arc::new(AtomicU64::new(0));
    let opts = FetchOptions {
        range_chunks: inner.cfg.range_chunks,
        streams_per_source: inner.cfg.streams_per_source,
    };
    for p in &missing {
        let sources = holders.get(p).cloned().unwrap_or_default();
        if sources.is_empty() {
            return Err(format!("no peer holds part {p}"));
        }
        let fetch = transfer::fetch_part(&inner.store, *p, &sources, opts, progress.clone());
        tokio::pin!(fetch);
        let report = loop {
            tokio::select! {
                r = &mut fetch => break r.map_err(|e| chain(&e))?,
                () = tokio::time::sleep(Duration::from_millis(250)) => {
                    let done = progress.load(Ordering::Relaxed);
                    update(inner, id, |st| st.bytes_done = done);
                }
            }
        };
        inner.metrics.bytes_fetched.inc_by(report.bytes_fetched);
        inner.metrics.bad_chunks.inc_by(report.bad_chunks as u64);
        if !report.lying_sources.is_empty() {
            tracing::warn!(part = %p, lying = ?report.lying_sources, "discarded data from lying sources");
        }
        tracing::info!(part = %p, fetched = report.bytes_fetched, resumed_chunks = report.chunks_already_present, by_source = ?report.bytes_by_source, "part fetched");
    }
    update(inner, id, |st| {
        st.bytes_done = st.bytes_total;
        st.state = StageState::Assembling;
    });
    // 5. Assemble (blocking file I/O and qemu-img).
    let dir = PathBuf::from(inner.cfg.image_dir_template.replace("{host}", &req.host));
    let (store, vm) = (
        inner.store.clone(),
        (!req.chain_only).then(|| req.vm.clone()),
    );
    let assembled = tokio::task::spawn_blocking(move || {
        crate::image::assemble(&store, &m, &dir, vm.as_deref(), &mut |_, _| {})
    })
    .await
    .map_err(|e| format!("assembly task: {e}"))?
    .map_err(|e| chain(&e))?;
    update(inner, id, |st| {
        st.state = StageState::Ready;
        st.ready_unix_ms = Some(now_ms());
        st.overlay = assembled.overlay.clone();
        st.chain = assembled.chain.clone();
    });
    tracing::info!(stage = %id, overlay = ?assembled.overlay, "staged");
    Ok(())
}

fn single_vm_scenario(
    inner: &Inner,
    req: &StageRequest,
    m: &Manifest,
    missing: &[Hash],
    holders: &HashMap<Hash, Vec<Source>>,
    peers: &[(PeerConfig, Source)],
) -> Scenario {
    let bps = |mbit: f64| mbit * 1e6 / 8.0;
    let me = inner.cfg.site.clone();
    let mut sites = vec![SiteSpec {
        name: me.clone(),
        egress_bps: bps(inner.cfg.path.rate_mbit),
        ingress_bps: bps(inner.cfg.path.rate_mbit),
    }];
    let mut links = Vec::new();
    for (p, s) in peers {
        let rate = bps(p.rate_mbit.unwrap_or(inner.cfg.path.rate_mbit));
        sites.push(SiteSpec {
            name: s.name.clone(),
            egress_bps: rate,
            ingress_bps: rate,
        });
        links.push(LinkSpec {
            from: s.name.clone(),
            to: me.clone(),
            bytes_per_sec: rate,
        });
    }
    let parts = m
        .parts
        .iter()
        .map(|p| PartSpec {
            name: p.id.to_hex(),
            bytes: p.size,
            holders: if missing.contains(&p.id) {
                holders
                    .get(&p.id)
                    .map(|v| v.iter().map(|s| s.name.clone()).collect())
                    .unwrap_or_default()
            } else {
                vec![me.clone()]
            },
        })
        .collect();
    let progress = missing
        .iter()
        .filter_map(|p| {
            let idx = inner.store.partial_index(p).ok().flatten()?;
            let done: u64 = idx
                .chunks
                .iter()
                .filter(|c| !c.zero && inner.store.has_chunk(&c.hash))
                .map(|c| u64::from(c.len))
                .sum();
            Some(ProgressSpec {
                part: p.to_hex(),
                site: me.clone(),
                bytes_done: done,
            })
        })
        .collect();
    let total: u64 = m.parts.iter().map(|p| p.size).sum();
    let now = now_ms() as f64 / 1000.0;
    Scenario {
        now,
        sites,
        links,
        parts,
        vms: vec![VmSpec {
            name: req.vm.clone(),
            site: me,
            parts: m.parts.iter().map(|p| p.id.to_hex()).collect(),
            deadline: req.deadline_unix_ms as f64 / 1000.0,
            assembly_secs: 0.5 + total as f64 / inner.cfg.assembly_bytes_per_sec.max(1.0),
        }],
        progress,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_dir_without_a_host_placeholder_serves_exactly_one_host() {
        let site_depot = DepotConfig::default();
        assert_eq!(site_depot.check(), Ok(()));
        let agent = |hosts: &[&str]| DepotConfig {
            image_dir_template: "/var/lib/viola/images".into(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            ..DepotConfig::default()
        };
        assert_eq!(agent(&["a1"]).check(), Ok(()));
        for hosts in [&[][..], &["a1", "a2"][..]] {
            let err = agent(hosts).check().unwrap_err();
            assert!(err.to_string().contains("exactly that host"), "{err}");
        }
    }
}
